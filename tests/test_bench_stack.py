"""Chapter 8's race, run small: the bench's bookkeeping, the lossless check and the llama.cpp peer."""
import json
from pathlib import Path

import pytest
import torch

from minillm.bench.stack import STEP_TECHNIQUES, STEPS, bench_stack, predict, where_time_goes
from minillm.backends.stack import NATIVE_STEPS
from minillm.model import Transformer, tiny

RESULTS = json.loads((Path(__file__).resolve().parents[1] / "data" / "stack_results.json").read_text())


def test_predict_reads_the_committed_steps_and_refuses_nonsense():
    assert [r["label"] for r in RESULTS["rows"]] == [s[0] for s in STEPS] and len(STEPS) == len(STEP_TECHNIQUES)
    for techniques, row in zip(STEP_TECHNIQUES, RESULTS["rows"]):
        assert predict(techniques, RESULTS)["measured_tok_s"] == row["grounded"]["decode_tok_s"]
    plain, spec = predict(STEP_TECHNIQUES[5], RESULTS), predict(STEP_TECHNIQUES[6], RESULTS)
    assert spec["limit_tok_s"] == pytest.approx(plain["limit_tok_s"] * spec["tokens_per_forward"])
    assert predict(["kv_cache", "int4"], RESULTS)["measured_tok_s"] is None   # not a step: predicted only
    assert predict([], RESULTS)["limit_tok_s"] is None                         # no cache: not a bytes-read bound
    for bad, message in ((["kv_cache", "warp"], "unknown technique"), (["int8", "int4", "kv_cache"], "choose one"),
                         (["compiled"], "need the KV cache")):
        with pytest.raises(ValueError, match=message):
            predict(bad, RESULTS)


def test_where_time_goes_adds_up():
    torch.manual_seed(0)
    profile = where_time_goes(Transformer(tiny()).eval(), torch.randint(0, 512, (1, 8)), steps=4)
    assert profile["matmul"] > 0 and profile["wall"] > 0
    parts = sum(v for k, v in profile.items() if k != "wall")
    assert parts == pytest.approx(profile["wall"], rel=0.05) or parts >= profile["wall"]


@pytest.mark.slow
def test_a_short_race_reports_every_figure_and_llama_cpp():
    steps = [STEPS[1], ("+ prompt lookup", {}, "ngram", "static")]   # float32: prompt lookup is lossless here
    result = bench_stack(new_tokens=12, threads=2, repeats=1, eval_tokens=64, out=None, steps=steps)
    plain, spec = result["rows"]
    from minillm.cache.kv_compress import greedy_prefix_agreement as leading_agreement

    assert leading_agreement([5, 6, 7], [5, 6, 9]) == 2
    for name in ("grounded", "open-ended"):
        assert plain[name]["agree_with_float32"] == 12 and plain[name]["tokens_per_forward"] == 1
        assert spec[name]["same_as_plain"] == 3                       # identical tokens on all three prompts
        assert spec[name]["tokens_per_forward"] >= 1 and spec[name]["decode_tok_s"] > 0
        assert spec[name]["bytes_per_token"] <= plain[name]["bytes_per_token"]
    assert plain["peak_rss_mb"] > plain["model_bytes"] / 2 ** 20       # the weights are resident while it decodes
    peer = result["llama_cpp"]
    assert peer["available"], peer.get("reason")
    for name in ("grounded", "open-ended"):
        assert peer[name]["decode_tok_s"] > 0 and peer[name]["prefill_tok_s"] > 0
        assert peer[name]["agree_with_float32"] >= 1   # the same model (its Q4_1 weights), greedy: it starts alike
        assert peer["by_threads"]["2"][name] == peer[name]["decode_tok_s"] and peer["by_threads"]["1"][name] > 0


def test_fastest_lossless_skips_drafters_that_changed_tokens():
    import copy

    from minillm.backends.stack import STEPS, fastest_lossless

    results = RESULTS
    best = fastest_lossless(results)
    row = results["rows"][[s[0] for s in STEPS].index(best["label"])]
    assert best["drafter"] is None or all(row[n]["same_as_plain"] == 3 for n in ("grounded", "open-ended"))
    faster = copy.deepcopy(results)                      # a drafter that kept every token and is fastest wins
    lookup = [s[0] for s in STEPS].index("+ prompt lookup")
    for name in ("grounded", "open-ended"):
        faster["rows"][lookup][name].update(same_as_plain=3, decode_tok_s=1e6)
    assert fastest_lossless(faster)["drafter"] == "ngram"
    faster["rows"][lookup]["open-ended"]["same_as_plain"] = 2   # one prompt changed: not lossless
    assert fastest_lossless(faster)["label"] == best["label"] != "+ prompt lookup"


def test_fast_refuses_options_it_would_override(capsys):
    from minillm.cli.main import main

    assert main(["generate", "--prompt", "hi", "--fast", "--cache", "none", "--dtype", "bfloat16"]) == 2
    assert "--fast chooses the stack itself: drop --dtype, --cache" in capsys.readouterr().err


def test_bench_json_puts_the_results_on_stdout_and_the_tables_on_stderr(monkeypatch, capsys):
    import minillm.bench.stack
    from minillm.cli.main import main

    def fake_bench_stack(new_tokens, threads, repeats):
        print("the table a person reads")
        return dict(rows=[], settings=dict(new_tokens=new_tokens, threads=threads, repeats=repeats))

    monkeypatch.setattr(minillm.bench.stack, "bench_stack", fake_bench_stack)
    assert main(["bench", "stack", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == dict(rows=[], settings=dict(new_tokens=128, threads=2, repeats=3))  # stack's defaults
    assert "the table a person reads" in err
    assert main(["bench", "tokenizer", "--json"]) == 2                  # a bench without results to print
    out, err = capsys.readouterr()
    assert json.loads(out) == {"error": "--json is for bench stack, serve and quant; bench tokenizer prints tables only"}


def test_on_one_compiled_width_a_drafter_fills_the_width_and_keeps_plain_tokens():
    """The race's drafter steps (STEPS: fixed_width=8): timed_decode asks the drafter for width - 1 tokens a
    step, and the tokens equal plain decoding's on the same compiled model."""
    from minillm.bench.stack import timed_decode
    from minillm.backends.compiled import compile_decode
    from minillm.decoding.drafters import NgramDrafter

    assert all(s[1].get("fixed_width") == 8 for s in STEPS if s[2])
    asked = []

    class Spy(NgramDrafter):
        def propose(self, context, k, hidden=None, **sampling):
            asked.append(k)
            return super().propose(context, k, hidden, **sampling)

    torch.manual_seed(0)
    fast = compile_decode(Transformer(tiny()).eval(), widths=(4,))
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    with torch.inference_mode():
        plain = timed_decode(fast, ids, 12, None, "static")
        spec = timed_decode(fast, ids, 12, Spy(), "static")
    assert asked[0] == max(asked) == 3                 # 3 drafted + the root = the width (fewer near the end)
    assert spec["tokens"] == plain["tokens"] and len(plain["tokens"]) == 12


def test_the_native_race_is_the_race_with_the_native_step_in_the_compiled_ones_place():
    assert NATIVE_STEPS[:6] == STEPS[:6]
    for (label, stack, drafter, cache), (_, compiled, drafter_c, _) in zip(NATIVE_STEPS[6:], STEPS[5:]):
        assert stack == {k: v for k, v in compiled.items() if k not in ("compile", "fixed_width")} | {"native": True}
        assert label.startswith("native") and cache == "static" and drafter == drafter_c
    assert [s[2] for s in NATIVE_STEPS[6:]] == [None, "ngram", "recycling"]


@pytest.mark.slow
def test_a_short_native_race_is_lossless():
    from minillm.backends.native_step import available

    if why := available():
        pytest.skip(why)
    result = bench_stack(new_tokens=12, threads=2, repeats=1, eval_tokens=64, out=None, steps=NATIVE_STEPS[6:8])
    plain, lookup = result["rows"]
    assert plain["stack"].endswith("native step") and "int8 head" in plain["stack"]
    for name in ("grounded", "open-ended"):
        assert plain[name]["tokens_per_forward"] == 1 and lookup[name]["same_as_plain"] == 3
