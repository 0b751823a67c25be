import time

import pytest

from minillm.bench.timing import median_of_rounds, median_seconds, sandwiched


def test_median_seconds_counts_warmups_and_resets():
    calls, resets = [], []
    seconds = median_seconds(lambda: calls.append(1), repeats=3, warmup=2, reset=lambda: resets.append(1))
    assert len(calls) == 5 and len(resets) == 5   # 2 untimed + 3 timed, each followed by a reset
    assert 0 <= seconds < 0.1


def test_median_seconds_is_the_median_of_the_timed_calls(monkeypatch):
    import minillm.bench.timing as timing

    clock = iter([0.0, 1.0,  0.0, 5.0,  0.0, 3.0])   # the timed calls take 1, 5, 3 s; the warm-up reads no clock
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    assert median_seconds(lambda: None, repeats=3, warmup=1) == 3.0


def test_median_of_rounds_takes_turns_and_drops_the_warmup_rounds():
    calls = []
    figures = {"a": iter([100, 1, 5, 3]), "b": iter([200, 2, 2, 9])}     # round 0 is the warm-up
    medians = median_of_rounds({k: lambda k=k: calls.append(k) or next(figures[k]) for k in "ab"}, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4                   # one call of each key per round, in turn
    assert medians == {"a": 3, "b": 2}


def test_sandwiched_times_the_baseline_around_every_measure():
    calls = []
    base_seconds = iter([2.0, 4.0, 2.0])                 # a slow spell around "a": the baseline slows down too
    seconds = {"a": 1.5, "b": 4.0}

    def baseline():
        calls.append("base")
        return next(base_seconds)

    base, out = sandwiched(baseline, {k: lambda k=k: calls.append(k) or seconds[k] for k in "ab"})
    assert calls == ["base", "a", "base", "b", "base"]
    assert base == [2.0, 4.0, 2.0]
    assert out == {"a": (1.5, 2.0), "b": (4.0, 0.75)}    # (seconds, mean of the baseline runs beside it / seconds)


def test_median_seconds_needs_a_timed_call():
    with pytest.raises(ValueError, match="repeats"):
        median_seconds(lambda: None, repeats=0)


def test_peak_rss_sees_memory_held_inside_the_block_only():
    import torch

    from minillm.bench.timing import PeakRSS

    with PeakRSS(interval=0.001) as before:
        pass
    with PeakRSS(interval=0.001) as held:
        block = torch.ones(64 * 2 ** 20)                     # 256 MB, touched
        time.sleep(0.05)
        del block
    assert held.peak_mb > before.peak_mb + 200
    assert held._thread is not None and not held._thread.is_alive()   # the sampler stopped with the block


def test_the_machine_line_names_the_cpu_and_its_bfloat16_instructions(monkeypatch):
    from minillm import timing

    zen4 = ("processor\t: 0\nmodel name\t: AMD EPYC 9R14 96-Core Processor\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
            "processor\t: 1\nmodel name\t: AMD EPYC 9R14 96-Core Processor\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert timing.cpu_info(zen4) == ("AMD EPYC 9R14 96-Core Processor", ["avx512_bf16"])
    assert timing.cpu_info("model name : Xeon\nflags : avx512_bf16 amx_tile amx_bf16\n") == \
        ("Xeon", ["avx512_bf16", "amx_bf16"])
    assert timing.cpu_info("flags : avx2 fma\n")[1] == []          # an AVX2 CPU: no bfloat16 instructions
    monkeypatch.setattr(timing, "cpu_info", lambda: ("AMD EPYC 9R14 96-Core Processor", []))
    line = timing.machine_line()
    assert line.startswith("CPU AMD EPYC 9R14 96-Core Processor (") and "no bf16 instructions" in line
    assert "capability" in line and "thread(s)" in line
    settings = timing.machine_settings()
    assert settings["cpu"] == "AMD EPYC 9R14 96-Core Processor" and settings["bf16_instructions"] == []
