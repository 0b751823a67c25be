"""KV caches: every cache gives the logits of recomputing without one; the paged allocator never
leaks or double-uses a block; overflow and bad input are clear errors; compression is measured."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.generate import generate, make_cache
from minillm.kv_cache import ConcatCache, QuantizedCache, StaticCache, dequantize_int8, kv_bytes_per_token, quantize_int8
from minillm.kv_compress import EvictingCache, greedy_prefix_agreement, teacher_forced
from minillm.model import Transformer, attention_ref, smollm2_135m, tiny
from minillm.paged import PAD_POSITION, BlockAllocator, PagedCache, generate_batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(tiny(vocab_size=97)).eval()


def ids_of(n, batch=1, seed=0):
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def paged(config, batch, num_blocks=32, block_size=4):
    cache = PagedCache(config, num_blocks, block_size)
    for _ in range(batch):
        cache.add_sequence()
    return cache


CACHES = {
    "concat": lambda c, B: ConcatCache(c),
    "static": lambda c, B: StaticCache(c, B, 64),
    "paged": lambda c, B: paged(c, B),
    "evicting, budget not reached": lambda c, B: EvictingCache(c, B, budget=64),
}


def chunked_logits(model, ids, cache, cuts=(7, 8, 13)):
    """Feed ids in pieces through one cache: a prefill, a single token, then more."""
    bounds = [0, *cuts, ids.shape[1]]
    with torch.inference_mode():
        return torch.cat([model(ids[:, a:b], cache=cache) for a, b in zip(bounds, bounds[1:])], dim=1)


@pytest.mark.parametrize("kind", CACHES)
def test_cache_equals_recomputation(model, kind):
    ids = ids_of(20, batch=2)
    with torch.inference_mode():
        full = model(ids)
    torch.testing.assert_close(chunked_logits(model, ids, CACHES[kind](model.config, 2)), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", CACHES)
def test_truncate_then_redo_equals_recomputation(model, kind):
    ids = ids_of(20, batch=2)
    cache = CACHES[kind](model.config, 2)
    with torch.inference_mode():
        full = model(ids)
        model(ids[:, :15], cache=cache)
        model(ids[:, 15:18], cache=cache)
        cache.truncate(12)  # roll back 6 entries (a rejected speculation)
        assert cache.length == 12
        redo = model(ids[:, 12:], cache=cache)
    torch.testing.assert_close(redo, full[:, 12:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(cache.length + 1)


def test_int8_quantization_matches_reference_and_error_bound():
    x = torch.randn(2, 3, 5, 64, generator=torch.Generator().manual_seed(1)) * torch.tensor([1, 10, 0.01])[:, None, None]
    codes, scale = quantize_int8(x)
    # the slow reference: one vector at a time
    for vec, c, s in zip(x.reshape(-1, 64), codes.reshape(-1, 64), scale.reshape(-1)):
        ref_scale = vec.abs().max() / 127
        assert torch.equal(c, torch.tensor([round(float(v / ref_scale)) for v in vec], dtype=torch.int8))
        torch.testing.assert_close(s, ref_scale)
    err = (dequantize_int8(codes, scale) - x).abs()
    assert (err <= scale / 2 + 1e-7).all()  # rounding error at most half a step, per (token, head)
    assert quantize_int8(torch.tensor([0.5, -1.0, 0.25]))[0].tolist() == [64, -127, 32]  # the docstring example


def test_int8_cache_is_close_and_smaller(model):
    ids = ids_of(20, batch=2)
    with torch.inference_mode():
        full = model(ids)
    cache = QuantizedCache(model.config, 2, 64)
    got = chunked_logits(model, ids, cache)
    assert (got - full).abs().max() < 0.02 * full.abs().max()
    assert got.argmax(-1).eq(full.argmax(-1)).float().mean() > 0.9
    hd = model.config.head_dim
    assert cache.nbytes() / StaticCache(model.config, 2, 64).nbytes() == (hd + 4) / (4 * hd)


@pytest.mark.parametrize("kind", ["none", "static", "paged"])
def test_generate_cache_kinds_agree(model, kind):
    ids = ids_of(9, batch=2, seed=3)
    ref = generate(model, ids, 24, cache="none", eos_token_id=None)
    assert torch.equal(generate(model, ids, 24, cache=kind, eos_token_id=None), ref)


def test_overflow_is_a_clear_error(model):
    ids = ids_of(10)
    with torch.inference_mode():
        for cache in (StaticCache(model.config, 1, 12), ConcatCache(model.config, 12)):
            model(ids, cache=cache)
            with pytest.raises(ValueError, match="overflow: holds 10 of 12 tokens, cannot add 3"):
                model(ids[:, :3], cache=cache)
        cache = paged(model.config, 1, num_blocks=3, block_size=4)
        model(ids, cache=cache)
        with pytest.raises(ValueError, match="overflow: the paged cache has 0 free blocks of 4 tokens"):
            model(ids[:, :3], cache=cache)
        assert cache.lengths == [10] and cache.allocator.num_used == 3  # refused before changing anything
        model(ids[:, :2], cache=cache)  # what still fits still works


def test_bad_input_is_a_clear_error(model):
    ids = ids_of(4)
    with pytest.raises(ValueError, match="cache must be one of"):
        generate(model, ids, 2, cache="dynamic")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        StaticCache(model.config, 1, model.config.max_seq_len + 1)
    with pytest.raises(ValueError, match="batch has 1 rows but the paged cache holds 2 sequences"):
        model(ids, cache=paged(model.config, 2))
    with pytest.raises(ValueError, match="policy must be"):
        EvictingCache(model.config, 1, 16, policy="lru")
    with pytest.raises(ValueError, match="budget"):
        EvictingCache(model.config, 1, 4, policy="streaming", n_sink=4)
