"""KV caches: every cache gives the logits of recomputing without one; the paged allocator never
leaks or double-uses a block; overflow and bad input are clear errors; compression is measured."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.decoding import decode, generate, make_cache
from minillm.cache.kv_cache import (ConcatCache, QuantizedCache, StaticCache, dequantize_int8, kv_bytes_per_token,
    quantize_int8)
from minillm.cache.kv_compress import EvictingCache, greedy_prefix_agreement, teacher_forced
from minillm.model import Transformer, attention_ref, smollm2_135m, tiny
from minillm.cache.paged import BlockAllocator, PagedCache


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


def test_generate_accepts_a_cache_object(model):
    ids = ids_of(9, batch=2, seed=4)
    ref = generate(model, ids, 16, cache="none", eos_token_id=None)
    assert torch.equal(generate(model, ids, 16, cache=EvictingCache(model.config, 2, budget=32), eos_token_id=None), ref)
    streamed = generate(model, ids, 16, cache=EvictingCache(model.config, 2, budget=12), eos_token_id=None)
    # tokens 1..5 come from forwards that started with at most 12 stored: nothing evicted yet, exact
    assert torch.equal(streamed[:, :9 + 5], ref[:, :9 + 5]) and streamed.shape == ref.shape


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


def test_paged_mixed_lengths_equal_each_alone(model):
    prompts = [ids_of(n, seed=n)[0] for n in (3, 11, 6, 17)]
    cache = paged(model.config, len(prompts), num_blocks=32, block_size=4)
    batch = decode(model, prompts, 12, cache=cache, eos_token_id=None).rows
    for prompt, got in zip(prompts, batch):
        alone = generate(model, prompt[None], 12, cache="none", eos_token_id=None)[0, len(prompt):]
        assert got == alone.tolist()


def test_shared_prefix_continuations_equal_independent_runs(model):
    prefix, suffixes = ids_of(10, seed=5)[0], [ids_of(n, seed=10 + n)[0] for n in (1, 3, 2)]
    cache = paged(model.config, 1, num_blocks=16, block_size=4)
    with torch.inference_mode():
        model(prefix[None], cache=cache)                  # the prefix once: blocks 0, 1 full, block 2 half
    for _ in suffixes[1:]:
        cache.fork(0)
    assert cache.allocator.num_used == 3 and cache.allocator.refcount[:3] == [3, 3, 3]
    shared = decode(model, suffixes, 8, cache=cache, continue_cache=True, eos_token_id=None).rows
    # copy on write: the half-full block was copied for the first two writers; the full ones stay shared
    assert cache.allocator.refcount[:2] == [3, 3]
    assert cache.block_tables[0][:2] == cache.block_tables[1][:2] == cache.block_tables[2][:2]
    assert len({table[2] for table in cache.block_tables}) == 3
    for suffix, got in zip(suffixes, shared):
        alone = generate(model, torch.cat([prefix, suffix])[None], 8, cache="none", eos_token_id=None)
        assert got == alone[0, -8:].tolist()


# -- property test of the paged allocator: random allocate/append/fork/free/truncate ---------------
OPS = st.lists(st.tuples(st.sampled_from(["add", "append", "fork", "free", "truncate"]),
                         st.integers(0, 7), st.integers(0, 9)), max_size=40)


def check_invariants(cache):
    a = cache.allocator
    references = [0] * a.num_blocks
    for table, length in zip(cache.block_tables, cache.lengths):
        assert len(table) == math.ceil(length / cache.block_size)  # no block held beyond need
        for block in table:
            references[block] += 1
    assert a.refcount == references                               # counts are exact: no leak
    assert sorted(a.free) == [b for b in range(a.num_blocks) if references[b] == 0]  # free == unreferenced, once each


@settings(max_examples=60, deadline=None)
@given(OPS)
def test_paged_allocator_never_leaks_or_double_uses(ops):
    cache = PagedCache(tiny(n_layers=1, dim=8, n_heads=2, n_kv_heads=1), num_blocks=12, block_size=3)
    expected = {}  # handle -> what that sequence must read back: its own token history
    counter = 0
    for op, seq, n in ops:
        if op == "add" or not expected:
            expected[cache.add_sequence()] = []
            continue
        seq = list(expected)[seq % len(expected)]
        if op == "append":
            try:
                rows = cache.append_slots(seq, n)
            except ValueError as e:
                assert "overflow" in str(e)
                continue
            for row in rows.tolist():  # a write only ever lands in a block this sequence owns alone
                assert cache.allocator.refcount[row // cache.block_size] == 1
            cache.slot_positions[rows] = torch.arange(counter, counter + n)
            expected[seq] += list(range(counter, counter + n))
            counter += n
        elif op == "fork":
            expected[cache.fork(seq)] = list(expected[seq])
        elif op == "free":
            cache.free_sequence(seq)
            del expected[seq]
            with pytest.raises(ValueError, match="not in this cache"):   # a double free names the problem
                cache.free_sequence(seq)
        else:
            keep = min(n, cache.lengths[cache.row(seq)])
            cache.truncate_sequence(seq, keep)
            expected[seq] = expected[seq][:keep]
        check_invariants(cache)
        assert cache.handles == list(expected)          # rows in the order the sequences were added
        for s, history in expected.items():
            assert cache.sequence_positions(s).tolist() == history
    for s in list(expected):
        cache.free_sequence(s)
    assert cache.allocator.refcount == [0] * 12 and len(cache.allocator.free) == 12


def test_sequence_handles_are_stable():
    cache = PagedCache(tiny(n_layers=1, dim=8, n_heads=2, n_kv_heads=1), num_blocks=8, block_size=2)
    a, b, c = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    cache.append_slots(c, 3)
    cache.free_sequence(a)
    assert cache.row(c) == 1 and cache.lengths[cache.row(c)] == 3   # c moved up a row, kept its handle
    with pytest.raises(ValueError, match="sequence 0 is not in this cache"):
        cache.free_sequence(a)                                       # freeing a again never frees b
    assert cache.handles == [b, c] and cache.add_sequence() == 3     # handles are never reused
    for bad in (-1, 8, 1.0, True):
        with pytest.raises(ValueError, match="is not a block of this pool"):
            cache.allocator.release(bad)
    assert sorted(cache.allocator.free) == [b for b in range(8) if cache.allocator.refcount[b] == 0]


def test_allocator_refuses_double_release():
    a = BlockAllocator(2)
    block = a.allocate()
    a.release(block)
    with pytest.raises(ValueError, match="double release"):
        a.release(block)


# -- eviction -------------------------------------------------------------------------------------
def keep_ref(policy, scores, budget, n_sink=4):
    """The slow reference of which slots survive, one sequence at a time, in plain Python."""
    S = len(scores)
    if policy == "streaming":
        return list(range(n_sink)) + list(range(S - (budget - n_sink), S))
    recent = budget // 2
    older = sorted(range(S - recent), key=lambda i: -scores[i])[:budget - recent]
    return sorted(older + list(range(S - recent, S)))


@pytest.mark.parametrize("policy", ["streaming", "h2o"])
def test_eviction_keeps_what_the_policy_says(model, policy):
    ids = ids_of(30, batch=2)
    cache = EvictingCache(model.config, 2, budget=12, policy=policy)
    with torch.inference_mode(), cache.observe(model):
        model(ids[:, :20], cache=cache)
        scores = [cache.score[1][b].tolist() for b in range(2)]
        model(ids[:, 20:21], cache=cache)  # evicts down to 12, then adds 1
    assert model.layers[0].attn.attn_fn.__name__ == "attention_sdpa"  # observe() put the fast path back
    for b in range(2):
        assert cache.pos[1][b, :12].tolist() == keep_ref(policy, scores[b], 12)
    assert [len(p[0]) for p in cache.pos] == [13, 13]


def test_attention_scores_match_reference_attention(model):
    """add_attention's weights equal attention_ref's softmax: with v = identity, attention returns the weights."""
    q, k, v = (torch.randn(2, 4, 5, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    cache = EvictingCache(model.config, 2, budget=8)
    cache.score = [torch.zeros(2, 5)] * 2
    cache.add_attention(0, q, k, mask)
    weights = attention_ref(q, k, torch.eye(5).expand(2, 4, 5, 5), mask)  # (B, h, T, S)
    expected = weights.sum(dim=(1, 2))                                    # attention each key received
    torch.testing.assert_close(cache.score[0], expected)


def test_evicting_truncate_refuses_when_tokens_were_evicted(model):
    cache = EvictingCache(model.config, 1, budget=8)
    with torch.inference_mode():
        model(ids_of(10), cache=cache)
        model(ids_of(1), cache=cache)  # keeps 4 sinks + 4 recent (positions 6..9), adds position 10
    cache.truncate(9)                  # positions 9 and 10 are still there: fine
    with pytest.raises(ValueError, match="already evicted"):
        cache.truncate(5)


def test_greedy_prefix_agreement():
    assert greedy_prefix_agreement([5, 6, 7], [5, 6, 9]) == 2
    assert greedy_prefix_agreement([1, 2], [1, 2]) == 2


def test_memory_per_token_arithmetic():
    c = smollm2_135m()
    assert kv_bytes_per_token(c, 4) == 2 * 30 * 3 * 64 * 4 == 46_080
    assert kv_bytes_per_token(c.with_(n_kv_heads=9), 4) == 3 * 46_080  # what GQA saves: 3x
    cache = StaticCache(tiny(), 2, 10)
    assert cache.nbytes() == 2 * 10 * kv_bytes_per_token(tiny(), 4)


# -- the real model ----------------------------------------------------------------------------
PROMPTS = ["The history of the printing press begins",
           "def fibonacci(n):",
           "Once upon a time, in a small village by the sea, there lived"]


@torch.inference_mode()
def greedy_with_logits(model, ids, n, kind):
    """Greedy decoding that also returns each step's logits (n, V): the reference loop, cache or none."""
    cache = make_cache(kind, model.config, 1, ids.shape[1] + n, dtype=next(model.parameters()).dtype)
    seq, step, tokens, logits = ids, ids, [], []
    for _ in range(n):
        last = model(step if cache is not None else seq, cache=cache)[0, -1]
        logits.append(last)
        tokens.append(int(last.argmax()))
        seq = torch.cat([seq, torch.tensor([[tokens[-1]]])], dim=1)
        step = seq[:, -1:]
    return tokens, torch.stack(logits)


@pytest.fixture(scope="module")
def smol(smollm2):
    model, tok = smollm2
    return model, [torch.tensor([tok.encode(p)]) for p in PROMPTS]


@pytest.mark.slow
def test_smollm2_static_and_paged_equal_no_cache(smol):
    """96 greedy tokens static vs paged on every prompt (each sequence spans 6+ blocks of 16); none
    vs static on 32 tokens (without a cache each step recomputes the whole sequence: minutes on 2
    cores for long runs).

    Static and paged read the same numbers: logits within 1e-5. Without a cache the matmuls have
    other shapes, so float32 rounds differently: within 1e-5 of the logits' scale (max |logit|),
    and the float64 test below shows the gap is rounding, not the algorithm."""
    model, prompts = smol
    for i, ids in enumerate(prompts):
        static_tokens, static_logits = greedy_with_logits(model, ids, 96, "static")
        paged_tokens, paged_logits = greedy_with_logits(model, ids, 96, "paged")
        assert paged_tokens == static_tokens
        torch.testing.assert_close(paged_logits, static_logits, atol=1e-5, rtol=0)
        if i == 0:  # generate() itself, not only the loop above (64 tokens: the loop covers 96)
            assert generate(model, ids, 64, cache="paged", eos_token_id=None)[0, ids.shape[1]:].tolist() == static_tokens[:64]
        none_tokens, none_logits = greedy_with_logits(model, ids, 32, "none")
        assert none_tokens == static_tokens[:32]
        assert none_logits.sub(static_logits[:32]).abs().max() <= 1e-5 * static_logits.abs().max()


@pytest.mark.slow
def test_smollm2_float64_no_cache_equals_cache_to_1e_10(smol):
    import copy

    model, prompts = smol
    model64 = copy.deepcopy(model).double()
    none_tokens, none_logits = greedy_with_logits(model64, prompts[1], 12, "none")
    static_tokens, static_logits = greedy_with_logits(model64, prompts[1], 12, "static")
    assert none_tokens == static_tokens
    torch.testing.assert_close(none_logits, static_logits, atol=1e-10, rtol=0)


@pytest.mark.slow
def test_smollm2_batch_and_shared_prefix_equal_alone(smol):
    model, prompts = smol
    batch = decode(model, [p[0] for p in prompts], 24, cache="paged", eos_token_id=None).rows
    for ids, got in zip(prompts, batch):
        assert got == generate(model, ids, 24, eos_token_id=None)[0, ids.shape[1]:].tolist()
    prefix = prompts[2][0]
    suffixes = [torch.tensor(s) for s in ([11], [351, 1130], [260])]  # ",", " a little", " an"
    cache = paged(model.config, 1, num_blocks=20, block_size=16)
    with torch.inference_mode():
        model(prefix[None], cache=cache)
    for _ in suffixes[1:]:
        cache.fork(0)
    shared = decode(model, suffixes, 16, cache=cache, continue_cache=True, eos_token_id=None).rows
    for suffix, got in zip(suffixes, shared):
        alone = generate(model, torch.cat([prefix, suffix])[None], 16, eos_token_id=None)
        assert got == alone[0, -16:].tolist()


@pytest.mark.slow
def test_smollm2_cache_holds_what_hf_caches(smol, hf_smollm2):
    """Outside reference: after a prefill our static cache holds HF transformers' past keys and values."""
    model, prompts = smol
    hf_model, _ = hf_smollm2
    ids = prompts[0]
    cache = StaticCache(model.config, 1, 32)
    with torch.inference_mode():
        model(ids, cache=cache)
        past = hf_model(ids, use_cache=True).past_key_values
    for layer in (0, 15, 29):
        torch.testing.assert_close(cache.k[layer, :, :, :ids.shape[1]], past.layers[layer].keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cache.v[layer, :, :, :ids.shape[1]], past.layers[layer].values, atol=1e-4, rtol=1e-4)
    hf_bytes = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in past.layers)
    assert hf_bytes / ids.shape[1] == kv_bytes_per_token(model.config, 4) == 46_080


@pytest.mark.slow
def test_smollm2_compressed_caches_stay_close(smol):
    """int8 keeps the perplexity within 2%; eviction at half the context stays within 25%."""
    model, prompts = smol
    ids = torch.cat([p[0] for p in prompts] * 4)[None]  # ~100 tokens
    L = ids.shape[1]
    full, full_argmax, _ = teacher_forced(model, ids, lambda: StaticCache(model.config, 1, L))
    int8, int8_argmax, _ = teacher_forced(model, ids, lambda: QuantizedCache(model.config, 1, L))
    assert abs(int8 / full - 1) < 0.02 and (int8_argmax == full_argmax).float().mean() > 0.95
    for policy in ("streaming", "h2o"):
        ppl, _, cache = teacher_forced(model, ids, lambda: EvictingCache(model.config, 1, L // 2, policy), chunk=L // 2)
        assert ppl < 1.25 * full and cache.nbytes() == (L // 2 + 1) * kv_bytes_per_token(model.config, 4)


def test_bench_cache_speed_and_batch_throughput_report_every_row(capsys):
    """The two speed tables of `bench kv` (chapter 2) run every cache and batch size, on a tiny model."""
    from minillm.bench.kv import bench_batch_throughput, bench_cache_speed

    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    ids = torch.randint(0, 512, (1, 400), generator=torch.Generator().manual_seed(0))
    speeds = bench_cache_speed(model, ids, context=24, steps=4)
    assert set(speeds) == {"static float32", "paged", "int8", "streaming 24"} and min(speeds.values()) > 0
    batch = bench_batch_throughput(model, ids, sizes=(1, 2), context=8, steps=3)
    assert set(batch) == {1, 2} and min(batch.values()) > 0
    out = capsys.readouterr().out
    assert "capability" in out and "B = 2" in out
