"""Chapter 8's race, run small: the bench's bookkeeping, the lossless check and the llama.cpp peer."""
import pytest

from minillm.bench.stack import STEPS, bench_stack, leading_agreement

pytestmark = pytest.mark.slow


def test_leading_agreement():
    assert leading_agreement([5, 6, 7], [5, 6, 9]) == 2 and leading_agreement([], [1]) == 0


def test_a_short_race_reports_every_figure_and_llama_cpp():
    steps = [STEPS[1], ("+ prompt lookup", {}, "ngram", "static")]   # float32: prompt lookup is lossless here
    result = bench_stack(new_tokens=12, threads=2, repeats=1, eval_tokens=64, out=None, steps=steps)
    plain, spec = result["rows"]
    for name in ("grounded", "open-ended"):
        assert plain[name]["agree_with_float32"] == 12 and plain[name]["tokens_per_forward"] == 1
        assert spec[name]["same_as_plain"] == 3                       # identical tokens on all three prompts
        assert spec[name]["tokens_per_forward"] >= 1 and spec[name]["decode_tok_s"] > 0
        assert spec[name]["bytes_per_token"] <= plain[name]["bytes_per_token"]
    peer = result["llama_cpp"]
    assert peer["available"], peer.get("reason")
    for name in ("grounded", "open-ended"):
        assert peer[name]["decode_tok_s"] > 0 and peer[name]["prefill_tok_s"] > 0
        assert peer[name]["agree_with_float32"] >= 1   # the same model (its Q4_1 weights), greedy: it starts alike
