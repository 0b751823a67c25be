"""compile_decode: the static-shape compiled step gives the eager model's logits and tokens, compiles
each width bucket once, and runs eager wherever it cannot compile. On the tiny config, so CI stays fast."""
import warnings

import pytest
import torch
import torch._dynamo.utils

from minillm.backends import compiled
from minillm.native import attention as cpu_attention, gemv as cpu_gemv
from minillm.backends.compiled import compile_decode
from minillm.decoding import decode, generate
from minillm.cache.kv_cache import StaticCache
from minillm.model import Transformer, tiny
from minillm.backends.prepack import PackedLinear

WIDTHS = (1, 4)  # two buckets: enough to test bucketing, few enough to compile in seconds


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Transformer(tiny()).eval()


@pytest.fixture(scope="module")
def fast(tiny_model):
    return compile_decode(tiny_model, widths=WIDTHS)


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@torch.inference_mode()
def test_compiled_steps_give_the_eager_logits_and_compile_each_bucket_once(tiny_model, fast):
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(1))
    for round_ in range(2):
        eager_cache, fast_cache = StaticCache(tiny_model.config, 1, 64), StaticCache(tiny_model.config, 1, 64)
        start = 0
        for width in (4, 1, 3, 2, 1, 4, 1):             # widths 3 and 2 are padded up to the 4 bucket
            chunk = ids[:, start:start + width]
            expected = tiny_model(chunk, cache=eager_cache)
            calls = fast.compiled_calls
            torch.testing.assert_close(fast(chunk, cache=fast_cache), expected, atol=1e-4, rtol=1e-4)
            assert fast.compiled_calls == calls + 1 and fast_cache.length == eager_cache.length
            start += width
        if round_ == 0:
            compiled_graphs = graphs()
    assert graphs() == compiled_graphs  # the second pass, with new cache objects, compiled nothing new


def test_greedy_tokens_equal_eager_plain_speculative_and_tree(tiny_model, fast):
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    expected = generate(tiny_model, ids, 24, eos_token_id=None)
    assert torch.equal(generate(fast, ids, 24, eos_token_id=None), expected)
    for drafter in ("ngram", "recycling"):              # verify widths 1-4 through the compiled buckets
        result = decode(fast, ids, 24, drafter=drafter, draft_len=3, eos_token_id=None)
        assert result.tokens == expected[0, 9:].tolist()


def test_the_rope_table_gives_rope_cos_sin_bit_for_bit(fast):
    from minillm.model import rope_cos_sin

    c = fast.config
    for positions in (torch.tensor([[0]]), torch.tensor([[37, 38, 39, 40, 41, 42, 43, 44]]),
                      torch.tensor([[5, 9, 2, 60], [0, 1, 1, 3]]), torch.tensor([[c.max_seq_len + 3]])):
        want = rope_cos_sin(positions, c.head_dim, c.rope_theta)     # the last: past the table, computed
        got = fast._rope(positions, 64)
        assert all(torch.equal(g, w) and g.shape == w.shape for g, w in zip(got, want))
        if int(positions.max()) < c.max_seq_len:       # forward's own positions: read off the table unchecked
            assert all(torch.equal(g, w) for g, w in zip(fast._rope(positions, 64, checked=False), want))
    assert len(fast._rope_table[0]) == max(64, c.max_seq_len)


def test_a_second_model_compiles_its_own_graphs(tiny_model, fast):
    """dynamo keeps graphs per code object and runs eager, without a word, past its recompile limit:
    each wrapper compiles its own copies of the functions, so a quantized model still compiles."""
    from minillm.quant import quantize
    import copy

    q = quantize(copy.deepcopy(tiny_model), "int8")
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(6))
    before = graphs()
    generate(compile_decode(q, widths=WIDTHS), ids, 3, eos_token_id=None)
    assert graphs() > before and torch._dynamo.config.recompile_limit >= compiled.RECOMPILE_LIMIT


def test_what_cannot_be_compiled_runs_eager(tiny_model, fast):
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(3))
    expected = generate(tiny_model, ids, 6, eos_token_id=None)
    for cache in ("paged", "none"):
        eager = fast.eager_calls
        assert torch.equal(generate(fast, ids, 6, eos_token_id=None, cache=cache), expected)
        assert fast.eager_calls == eager + 6
    wide = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(4))  # wider than any bucket
    eager = fast.eager_calls
    torch.testing.assert_close(fast(wide), tiny_model(wide))
    assert fast.eager_calls == eager + 1
    assert fast.layers is tiny_model.layers and fast.cache_len(9) == 256  # 9 + 4, rounded up to 256 (the max)


def test_without_a_compiler_it_says_so_and_runs_eager(tiny_model, monkeypatch):
    monkeypatch.setattr(compiled, "_compiler_missing", lambda: "no C++ compiler found")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found; running eager"):
        slow = compile_decode(tiny_model)
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(generate(slow, ids, 4, eos_token_id=None), generate(tiny_model, ids, 4, eos_token_id=None))
    assert slow.compiled_calls == 0


def test_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="widths must be ints in \\[1, 64\\]"):
        compile_decode(tiny_model, widths=(0, 2))
    with pytest.raises(ValueError, match="takes a minillm Transformer"):
        compile_decode(torch.nn.Linear(2, 2))


def test_stack_names_what_it_builds():
    from minillm.backends.stack import describe, load_stack

    assert describe() == "float32"
    assert describe("bfloat16", "int4", 64, "int8", True) == "bfloat16, int4 g64 + int8 head, compiled"
    assert describe("bfloat16", compile=True, fixed_width=8) == "bfloat16, compiled (fixed width 8)"
    assert describe("bfloat16", compile=True, consistent=True) == "bfloat16, compiled (consistent)"
    with pytest.raises(ValueError, match="give compile=True"):
        load_stack(consistent=True)
    with pytest.raises(ValueError, match="give compile=True"):
        load_stack(fixed_width=8)
    assert describe(quant="int8") == "float32, int8"
    assert describe("bfloat16", "int4", 64, "int8", native=True) == "bfloat16, int4 g64 + int8 head, native step"
    with pytest.raises(ValueError, match="choose one"):
        load_stack(compile=True, native=True)


def test_prompts_of_different_lengths_run_compiled_as_eager(tiny_model, fast):
    """Left-padded rows pass explicit positions; the compiled step takes them as the eager one does."""
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 7, 5)]
    expected = decode(tiny_model, prompts, 6, eos_token_id=None).rows
    calls = fast.compiled_calls
    assert decode(fast, prompts, 6, eos_token_id=None).rows == expected
    assert fast.compiled_calls == calls + 6      # every new token: the prompt goes in a forward of its own


@torch.inference_mode()
def test_the_graphs_attend_with_the_math_and_the_slot_is_left_as_it_was(tiny_model, fast):
    """Inside the graphs the layers attend with attention_grouped (fusable; SDPA's CPU kernel was slow for one query
    over a masked cache); after each call every layer's attn_fn is the one it had, and a kernel someone put in
    the slot is kept, not replaced."""
    from minillm.model import attention_ref, attention_sdpa

    seen = []
    spy = lambda q, k, v, mask: (seen.append(q.shape[-2]), attention_ref(q, k, v, mask))[1]  # noqa: E731
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(4))
    cache = StaticCache(tiny_model.config, 1, 64)
    fast(ids[:, :4], cache=cache)
    assert all(layer.attn.attn_fn is attention_sdpa for layer in tiny_model.layers)
    own = compile_decode(tiny_model, widths=(1,))
    tiny_model.layers[0].attn.attn_fn = spy
    try:
        own(ids[:, 4:5], cache=cache)                      # compiled: the spy is traced into the graph
        assert own.compiled_calls == 1 and seen == [1] and tiny_model.layers[0].attn.attn_fn is spy
        assert tiny_model.layers[1].attn.attn_fn is attention_sdpa
    finally:
        tiny_model.layers[0].attn.attn_fn = attention_sdpa


def test_one_fixed_width_makes_speculative_and_tree_decoding_bit_equal_to_plain_in_bfloat16(tiny_model):
    """widths=(8,): a plain step pads its token to the verify's width, so every token's logits come from one
    graph on one shape, whichever way it was reached: bit-equal in bfloat16 (where a 1-row and an 8-row
    matmul may round differently), so greedy speculative and tree decoding give plain decoding's tokens."""
    import copy

    from minillm.bench.speculative import verify_agreement

    fixed = compile_decode(copy.deepcopy(tiny_model).to(torch.bfloat16), widths=(8,))
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(7))
    plain = decode(fixed, ids, 24, eos_token_id=None).tokens
    agreement = verify_agreement(fixed, ids, plain, width=5)       # the same tokens, 1 vs 5 per forward
    assert agreement["positions"] == 24 and agreement["max_logit_gap"] == 0.0
    eager = fixed.eager_calls
    for drafter in ("ngram", "recycling", "recycling-pairs"):       # recycling's 10-node tree: cut to 8
        assert decode(fixed, ids, 24, drafter=drafter, draft_len=12, eos_token_id=None).tokens == plain
    assert fixed.eager_calls == eager + 3                            # the three prompts; no step ran eager


needs_kernels = pytest.mark.skipif(cpu_gemv.available() is not None or cpu_attention.available(16, torch.bfloat16) is not None,
                                   reason=f"{cpu_gemv.available()} / {cpu_attention.available(16, torch.bfloat16)}")


@needs_kernels
@torch.inference_mode()
def test_consistent_steps_give_a_token_the_same_logits_at_every_width():
    """consistent=True: linears on cpu_gemv and attention on cpu_attention at every width, so a verify step's row
    is bit-equal to the decode step that would have computed it (greedy speculation stays exact in bfloat16)."""
    torch.manual_seed(3)
    model = Transformer(tiny()).eval().bfloat16()
    fast = compile_decode(model, widths=(1, 4), consistent=True)
    assert "consistent" in repr(fast) and all(m.gemv_rows == 16 for m in model.modules() if isinstance(m, PackedLinear))
    ids = torch.randint(0, 512, (1, 14), generator=torch.Generator().manual_seed(4))
    one, wide = StaticCache(model.config, 1, 64, dtype=torch.bfloat16), StaticCache(model.config, 1, 64, dtype=torch.bfloat16)
    fast(ids[:, :7], cache=one), fast(ids[:, :7], cache=wide)         # the prompt: eager, the same in both
    rows = torch.cat([fast(ids[:, t:t + 1], cache=one) for t in range(7, 14)], dim=1)
    together = torch.cat([fast(ids[:, 7:11], cache=wide), fast(ids[:, 11:14], cache=wide)], dim=1)   # 4, then 3 padded to 4
    assert fast.compiled_calls == 9 and torch.equal(rows, together)
    plain = compile_decode(Transformer(tiny()).eval().bfloat16(), widths=(1, 4), attention="inductor")
    assert not plain.consistent


def test_consistent_refuses_what_it_cannot_make_consistent():
    model = Transformer(tiny()).eval()                                # float32 weights: not cpu_gemv's
    why = cpu_gemv.available()
    with pytest.raises(ValueError, match=why or "float32"):
        compile_decode(model, widths=(1, 4), consistent=True)
    with pytest.raises(ValueError, match="widths up to 16|not 'inductor'"):
        compile_decode(model, widths=(1, 32), consistent=True, attention="auto" if why is None else "inductor")
