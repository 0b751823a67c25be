"""The hand-written CPU attention kernel (native/attention.py, csrc/attention.cpp) against attention_ref, its
reference, and inside the compiled decode step."""
import copy

import pytest
import torch

from minillm.backends import compiled
from minillm.native import attention as cpu_attention, build as native
from minillm.backends.compiled import compile_decode
from minillm.native.attention import attention_cpu, available
from minillm.decoding import decode, generate
from minillm.cache.kv_cache import StaticCache
from minillm.model import Transformer, attention_ref, tiny

pytestmark = pytest.mark.skipif(available(64) is not None, reason=f"no attention kernel here: {available(64)}")


def inputs(B, nh, nkv, d, T, S, dtype, seed=0, mask_kind="causal", filled=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, T, d, generator=gen).to(dtype)
    k, v = (torch.randn(B, nkv, S, d, generator=gen).to(dtype) for _ in range(2))
    filled = S - T if filled is None else filled
    positions = torch.arange(filled, filled + T)
    mask = (torch.arange(S) <= positions[:, None]).expand(B, 1, T, S).clone()
    if mask_kind == "tree":      # each query sees the prefix and a random subset of the other new slots, itself too
        new = torch.rand(B, 1, T, T, generator=gen) < 0.5
        mask[..., filled:filled + T] = new | torch.eye(T, dtype=torch.bool)
    elif mask_kind == "random":
        mask = torch.rand(B, 1, T, S, generator=gen) < 0.3
        mask[..., 0] = True
    return q, k, v, mask


def reference(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    return attention_ref(q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1), mask)


CASES = [  # B, nh, nkv, d, T, S, mask, filled
    (1, 9, 3, 64, 8, 512, "causal", 256),     # SmolLM2's heads: an 8-token verify step, half the cache in view
    (1, 9, 3, 64, 1, 512, "causal", 300),     # a 1-token decode step
    (2, 4, 2, 16, 3, 100, "tree", 40),        # the tiny config's heads, batch 2, a tree mask, S not a multiple of 16
    (1, 9, 3, 64, 16, 256, "tree", 200),
    (2, 8, 8, 32, 5, 700, "random", None),    # no grouping, arbitrary masks over many 64-key chunks
    (1, 4, 1, 128, 2, 70, "causal", 10),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_the_kernel_equals_attention_ref(case, dtype):
    B, nh, nkv, d, T, S, kind, filled = case
    q, k, v, mask = inputs(B, nh, nkv, d, T, S, dtype, mask_kind=kind, filled=filled)
    got = attention_cpu(q, k, v, mask)
    assert got.shape == q.shape and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), reference(q, k, v, mask), atol=2e-6, rtol=1e-5)
    else:   # bfloat16 in and out, float32 inside: one rounding of the output (2^-8 relative) and the inputs' own
        torch.testing.assert_close(got.double(), reference(q, k, v, mask), atol=1e-2, rtol=1.6e-2)
        ours = (got.double() - reference(q, k, v, mask)).abs().max()
        theirs = (attention_ref(q, k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1), mask)
                  .double() - reference(q, k, v, mask)).abs().max()
        assert ours <= theirs      # no worse than PyTorch's bfloat16 math (which rounds the weights to bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_the_other_rows_of_the_call(dtype):
    """What keeps speculative decoding through one graph bit-equal to plain decoding: row t of an 8-row call
    equals the same row called alone, with its own mask row."""
    q, k, v, mask = inputs(1, 9, 3, 64, 8, 512, dtype, seed=1, mask_kind="tree", filled=250)
    together = attention_cpu(q, k, v, mask)
    for t in range(8):
        alone = attention_cpu(q[:, :, t:t + 1], k, v, mask[:, :, t:t + 1])
        assert torch.equal(alone[:, :, 0], together[:, :, t])


def test_keys_no_row_may_see_are_never_read_and_a_row_seeing_none_gets_zeros():
    q, k, v, mask = inputs(1, 4, 2, 16, 4, 300, torch.float32, seed=2, filled=100)
    expected = attention_cpu(q, k, v, mask)
    k[:, :, 104:], v[:, :, 104:] = float("nan"), float("inf")     # past every row's view
    assert torch.equal(attention_cpu(q, k, v, mask), expected)
    mask[:, :, 2] = False
    out = attention_cpu(q, k, v, mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2])) and torch.equal(out[:, :, 3], expected[:, :, 3])


def test_a_mask_shared_by_the_batch_and_strided_caches():
    q, k, v, mask = inputs(2, 4, 2, 16, 3, 96, torch.float32, seed=3, filled=50)
    shared = mask[:1]
    torch.testing.assert_close(attention_cpu(q, k, v, shared).double(), reference(q, k, v, shared.expand(2, -1, -1, -1)),
                               atol=2e-6, rtol=1e-5)
    big = torch.randn(3, 2, 2, 96, 16)        # a cache slice: (layers, B, nkv, S, d)[1] is a strided view
    big[1] = k
    torch.testing.assert_close(attention_cpu(q, big[1], v, mask), attention_cpu(q, k, v, mask), atol=0, rtol=0)


def test_bad_input_says_what_is_wrong():
    q, k, v, mask = inputs(1, 4, 2, 16, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        attention_cpu(q.half(), k.half(), v.half(), mask)
    with pytest.raises(ValueError, match="bool"):
        attention_cpu(q, k, v, mask.float())
    with pytest.raises(ValueError, match="k and v must be"):
        attention_cpu(q, k[:, :, :16], v, mask)
    with pytest.raises(ValueError, match="1-16 query positions"):
        attention_cpu(*inputs(1, 4, 2, 16, 17, 64, torch.float32)[:3], inputs(1, 4, 2, 16, 17, 64, torch.float32)[3])
    with pytest.raises(ValueError, match="do not share"):
        attention_cpu(torch.randn(1, 3, 2, 16), k, v, mask)
    assert "multiple of 16" in available(40)
    assert "float32 or bfloat16" in available(64, torch.float16)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_attention.build(40)


def test_without_a_compiler_it_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "find_compiler", lambda: None)
    monkeypatch.setattr(native, "_LOADED", {})
    assert available(48) == "no C++ compiler found ($CXX, g++ or clang++) to build the attention kernel"
    with pytest.raises(ValueError, match="no C\\+\\+ compiler"):
        compile_decode(Transformer(tiny()), widths=(1,), attention="kernel")


def test_the_build_is_cached_by_source_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_LOADED", {})
    lib = cpu_attention.build(32)
    (built,) = tmp_path.glob("attention_hd32_*.so")
    assert cpu_attention.build(32) is lib and lib.minillm_attention_head_dim() == 32
    monkeypatch.setattr(native, "_LOADED", {})
    cpu_attention.build(32)                              # a new process: loads the cached library, builds nothing
    assert list(tmp_path.glob("attention_hd32_*")) == [built]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Transformer(tiny()).eval()


@torch.inference_mode()
@pytest.mark.parametrize("attention", ["kernel", "inductor"])
def test_the_compiled_step_on_either_attention_gives_the_eager_logits(tiny_model, attention):
    fast = compile_decode(tiny_model, widths=(1, 4), attention=attention)
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(1))
    eager_cache, fast_cache = StaticCache(tiny_model.config, 1, 64), StaticCache(tiny_model.config, 1, 64)
    start = 0
    for width in (4, 1, 3, 1, 4):
        chunk = ids[:, start:start + width]
        torch.testing.assert_close(fast(chunk, cache=fast_cache), tiny_model(chunk, cache=eager_cache),
                                   atol=1e-4, rtol=1e-4)
        start += width
    assert fast.attention == {1: attention, 4: attention} and f"attention={attention}" in repr(fast)
    expected = generate(tiny_model, ids[:, :9], 16, eos_token_id=None)
    assert decode(fast, ids[:, :9], 16, drafter="ngram", draft_len=3, eos_token_id=None).tokens == expected[0, 9:].tolist()


def test_auto_measures_both_and_takes_the_faster(tiny_model):
    fast = compile_decode(copy.deepcopy(tiny_model).to(torch.bfloat16), widths=(1, 8))
    with torch.inference_mode():
        fast(torch.tensor([[1, 2, 3]]), cache=StaticCache(tiny_model.config, 1, 64, dtype=torch.bfloat16))
        fast(torch.tensor([[4]]), cache=StaticCache(tiny_model.config, 1, 64, dtype=torch.bfloat16))
    c = tiny_model.config
    for rows in (1, 8):
        t = compiled.ATTENTION_CHOICES[c.n_heads, c.n_kv_heads, c.head_dim, torch.bfloat16, torch.get_num_threads(), rows]
        assert set(t) == {"inductor", "kernel"} and all(us > 0 for us in t.values())
        assert fast.attention[rows] == min(t, key=t.get)
    with pytest.raises(ValueError, match="attention must be one of"):
        compile_decode(tiny_model, attention="sdpa")
