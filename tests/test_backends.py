"""The backend choice: what auto measures and remembers, what it says, and what it refuses."""
import json

import pytest
import torch

from minillm import tiny
from minillm.backends import native_step as cpu_step
from minillm.cli.main import main, split_timings
from minillm.backends import autotune, choice, choose, unavailable
from minillm.decoding import decode
from minillm.model import Transformer
from minillm.quant import quantize


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))
    threads = torch.get_num_threads()
    yield tmp_path / "choices.json"
    torch.set_num_threads(threads)          # choose() sets the thread count it chose


def test_remembered_measures_once_per_machine_and_key(cache):
    calls = []
    assert autotune.remembered("k", lambda: calls.append(1) or {"a": 1}) == ({"a": 1}, False)
    assert autotune.remembered("k", lambda: calls.append(1) or {"a": 2}) == ({"a": 1}, True)
    assert calls == [1]
    data = json.loads(cache.read_text())
    assert list(data) == [autotune.machine_key()] and data[autotune.machine_key()] == {"k": {"a": 1}}
    assert "torch " + torch.__version__ in autotune.machine_key()


def test_a_broken_or_unwritable_cache_is_measured_over(cache, tmp_path, monkeypatch):
    cache.write_text("{not json")
    assert autotune.remembered("k", lambda: 3) == (3, False)
    assert autotune.recall("k") == 3                      # the broken file was replaced by a whole one
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MINILLM_CACHE", str(blocker / "below"))   # a directory that cannot be made
    assert autotune.remembered("k", lambda: 4) == (4, False)


def _bf16_tiny():
    torch.manual_seed(0)
    return Transformer(tiny()).to(torch.bfloat16).eval()


def test_what_each_backend_needs():
    model = Transformer(tiny()).eval()
    assert unavailable("eager", model) is None
    assert "float32 weights have no few-row kernel" in unavailable("native", model)
    assert "static KV cache" in unavailable("native", model, cache="paged")
    assert "one batch" in unavailable("compiled", model, batch=2)
    assert "Triton" in unavailable("native", model, kernels="triton")
    with pytest.raises(ValueError, match="--backend native cannot run here: float32 weights"):
        choose(model, "native")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        unavailable("fast", model)


def test_auto_with_one_candidate_measures_nothing(cache):
    model = Transformer(tiny()).eval()
    c = choose(model, "auto", weights="tiny float32", threads=1)
    assert (c.backend, c.threads, c.model) == ("eager", 1, model)
    assert c.line.startswith("backend: eager, 1 thread(s) (auto: native unavailable: float32 weights")
    assert not cache.exists()


@pytest.mark.skipif(cpu_step.unavailable(_bf16_tiny()) is not None, reason=str(cpu_step.unavailable(_bf16_tiny())))
def test_auto_measures_then_remembers_and_runs_the_fastest(cache, monkeypatch):
    model = _bf16_tiny()
    ids = torch.tensor([[1, 5, 9, 3]])
    expected = model(ids)
    first = choose(model, "auto", weights="tiny bf16", threads=1)
    figures = autotune.recall(next(iter(json.loads(cache.read_text())[autotune.machine_key()])))
    backends = ["eager"] + ([] if cpu_step.unavailable(model) else ["native"])
    assert set(figures) == {f"{b} 1" for b in backends} and all(v > 0 for v in figures.values())
    assert first.backend == max(figures, key=figures.get).split()[0] and "measured on this CPU" in first.line
    monkeypatch.setattr(choice, "_measure", lambda *a: pytest.fail("measured again"))
    second = choose(_bf16_tiny(), "auto", weights="tiny bf16", threads=1)
    assert second.backend == first.backend and "remembered on this CPU" in second.line
    from minillm.cache.kv_cache import StaticCache  # whichever won, its logits are the eager model's to a bf16 rounding
    got = second.model(ids, cache=StaticCache(model.config, 1, 8, dtype=torch.bfloat16))
    torch.testing.assert_close(got.float(), expected.float(), atol=0.1, rtol=0.05)


@pytest.mark.skipif(cpu_step.unavailable(quantize(_bf16_tiny(), "int8")) is not None,
                    reason=str(cpu_step.unavailable(quantize(_bf16_tiny(), "int8"))))
def test_native_is_measured_on_a_copy_so_a_losing_native_leaves_the_model_eager(cache, monkeypatch):
    model = quantize(_bf16_tiny(), "int8")
    layers_before = [type(m).__name__ for m in model.layers[0].modules()]
    monkeypatch.setattr(choice, "step_seconds", lambda m: 1.0 if isinstance(m, cpu_step.NativeDecoder) else 0.5)
    c = choose(model, "auto", weights="tiny int8, native slower", threads=1)
    assert c.backend == "eager" and c.model is model
    assert [type(m).__name__ for m in model.layers[0].modules()] == layers_before   # not fused, not rewired
    assert isinstance(choose(model, "native", threads=1).model, cpu_step.NativeDecoder)


def test_prefill_and_decode_are_reported_apart():
    model = Transformer(tiny()).eval()
    result = decode(model, torch.tensor([[1, 2, 3]]), 5, eos_token_id=None)
    assert result.prefill_seconds > 0 and result.first_tokens == 1
    split = split_timings(result, 3, result.prefill_seconds + 0.5)
    assert split["decode_tokens"] == 4 and split["decode_seconds"] == pytest.approx(0.5, abs=1e-3)
    assert split["decode_tokens_per_second"] == pytest.approx(8.0, rel=1e-2)


def test_cli_backend_flags_say_what_they_mean(capsys):
    assert main(["generate", "--prompt", "hi", "--backend", "native"]) == 2
    assert "--backend native needs bfloat16 or quantized weights" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--native", "--backend", "eager", "--quant", "int8"]) == 2
    assert "--native and --backend eager say two things: drop --native" in capsys.readouterr().err
    assert main(["generate", "--prompt", "a", "--prompt", "b", "--backend", "native", "--quant", "int8"]) == 2
    assert "which --backend native cannot" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--fast", "--backend", "eager"]) == 2
    assert "--fast chooses the stack itself: drop --backend" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--backend", "compiled", "--cache", "paged"]) == 2
    assert "--backend compiled needs --cache static" in capsys.readouterr().err
    assert main(["generate", "--prompt", "a", "--prompt", "b", "--compile"]) == 2
    assert "which --compile cannot: give one prompt or drop --compile\n" in capsys.readouterr().err
    assert main(["generate", "--model", "data/moe/dense.safetensors", "--prompt", "hi", "--backend", "native"]) == 2
    assert "drop --backend" in capsys.readouterr().err


def test_probe_says_which_kernels_run_here_and_why_not():
    from minillm.native import gemv as cpu_gemv, logits as cpu_logits
    from minillm.backends import native_step as cpu_step
    from minillm.backends.choice import KERNELS, probe

    line = probe()
    assert line.startswith("C++ kernels: ") and "\n" not in line
    for name, why in (("logits", cpu_logits.available()), ("gemv", cpu_gemv.available()),
                      ("tiles", cpu_gemv.tiles_available()), ("native step", cpu_step.available())):
        assert (f"{name} yes" in line) == (why is None) and (f"{name} no (" in line) == (why is not None), (name, line)
    assert all(name in line for name in KERNELS)


def test_info_prints_the_machine_the_kernels_and_the_cache(capsys):
    from minillm.cli.main import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("CPU ") and out[1].startswith("C++ kernels: ") and "choices.json" in out[2]
