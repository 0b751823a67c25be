"""The serving engine: batching never changes a request's output (chapter 9's promise)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from minillm.decoding import generate
from minillm.model import Transformer, tiny
from minillm.cache.paged import PagedCache
from minillm.serving import Engine, QueueFull, generate_many
from minillm.serving.blocks import BlockManager, block_hashes, packed_forward

NEW = 12


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(tiny(eos_token_id=None)).eval()


@pytest.fixture(scope="module")
def prompts():
    """Ten prompts, three of them sharing a 21-token prefix (prefix caching has something to find)."""
    g = torch.Generator().manual_seed(1)
    own = [torch.randint(0, 512, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (7,), generator=g)]
    shared = torch.randint(0, 512, (21,), generator=g).tolist()
    return own + [shared + [5, 6], shared + [7], shared[:16]]


@pytest.fixture(scope="module")
def alone(model, prompts):
    """Each prompt decoded on its own by the one decoding loop: what the engine must reproduce."""
    return [generate(model, torch.tensor([p]), NEW)[0, len(p):].tolist() for p in prompts]


def test_block_hashes_chain_full_blocks_only():
    a, b = block_hashes([1, 2, 3, 4, 5], 2), block_hashes([1, 2, 3, 4], 2)
    assert len(a) == 2 and a == b
    assert block_hashes([9, 2, 3, 4], 2)[1] != a[1]     # same block, other prefix: another hash


def test_packed_forward_equals_each_sequence_alone(model):
    """Chunks of three sequences in one packed row == each whole sequence run without a cache."""
    cache = PagedCache(model.config, 32, 4)
    handles = [cache.add_sequence() for _ in range(3)]
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (9, 3, 14)]
    packed_forward(model, cache, handles, [s[:5] for s in seqs])     # a first piece of each
    logits = packed_forward(model, cache, handles, [s[5:] or [1] for s in seqs[:1]] + [[4], seqs[2][5:]])
    full = [seqs[0], seqs[1][:5] + [4], seqs[2]]
    for i, s in enumerate(full):
        torch.testing.assert_close(logits[i], model(torch.tensor([s]))[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("settings_", [dict(), dict(max_batch_tokens=5, max_seqs=3), dict(policy="serial"),
                                       dict(max_batch_tokens=40, prefill_chunk=3),
                                       dict(policy="static", max_seqs=4), dict(block_size=4, num_blocks=16)])
def test_engine_greedy_equals_generate_alone(model, prompts, alone, settings_):
    engine = Engine(model, **settings_)
    requests = generate_many(engine, prompts, max_tokens=NEW)
    assert [r.output for r in requests] == alone
    assert all(r.finish_reason == "length" for r in requests)
    assert engine.blocks_in_use == engine.blocks.evictable()          # only the prefix table holds blocks


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrivals=st.lists(st.integers(0, 30), min_size=10, max_size=10), budget=st.integers(1, 48),
       max_seqs=st.integers(1, 6), chunk=st.one_of(st.none(), st.integers(1, 16)),
       block_size=st.sampled_from([1, 3, 4, 16]), spare=st.integers(0, 40),
       policy=st.sampled_from(["continuous", "static"]), prefix=st.booleans())
def test_any_arrival_schedule_leaves_outputs_unchanged(model, prompts, alone, arrivals, budget, max_seqs, chunk,
                                                       block_size, spare, policy, prefix):
    """Requests arrive at random steps into a pool that may be just big enough for the largest one
    (preemptions); budget, chunking, batch size and prefix reuse vary: every output is unchanged."""
    least = max(-(-(len(p) + NEW) // block_size) for p in prompts)
    engine = Engine(model, num_blocks=least + spare, block_size=block_size, max_batch_tokens=budget,
                    max_seqs=max_seqs, policy=policy, prefix_caching=prefix, prefill_chunk=chunk)
    requests, step = [None] * len(prompts), 0
    while step <= max(arrivals) or engine.has_work:
        for i, at in enumerate(arrivals):
            if at == step:
                requests[i] = engine.add(prompts[i], max_tokens=NEW)
        engine.step()
        step += 1
    assert [r.output for r in requests] == alone
    assert engine.stats["decode_tokens"] + engine.stats["prefill_tokens"] == engine.stats["tokens_computed"]


def test_sampling_with_a_seed_is_reproducible_and_equals_generate(model, prompts):
    kwargs = dict(max_tokens=NEW, temperature=0.8, top_k=50, seed=7)
    solo = [generate(model, torch.tensor([p]), NEW, temperature=0.8, top_k=50, seed=7)[0, len(p):].tolist()
            for p in prompts[:4]]
    for settings_ in (dict(), dict(max_batch_tokens=3, max_seqs=2)):
        requests = generate_many(Engine(model, **settings_), prompts[:4], **kwargs)
        assert [r.output for r in requests] == solo


def test_prefix_caching_reuses_blocks_and_counts_hits(model, prompts, alone):
    engine = Engine(model, block_size=4, max_seqs=1)            # one at a time: each finds the last one's blocks
    requests = generate_many(engine, prompts[-3:], max_tokens=NEW)
    assert [r.output for r in requests] == alone[-3:]
    # the second and third prompt find the first's 20 (5 blocks) and 15 (16 - 1, its last token recomputed)
    assert engine.blocks.hit_tokens == 20 + 15
    assert engine.blocks.query_tokens == sum(len(p) for p in prompts[-3:])


def test_eviction_frees_cached_blocks_when_the_pool_is_full(model, prompts):
    blocks = BlockManager(model.config, 4, 4)
    handle, found = blocks.open(prompts[-3])                    # nothing cached yet; its first 16 tokens fill the pool
    assert found == 0
    blocks.cache._append_row(blocks.cache.row(handle), 16)
    blocks.register(handle, prompts[-3])
    blocks.close(handle)
    assert blocks.evictable() == 4 and len(blocks.allocator.free) == 0 and blocks.available() == 4
    blocks.make_room(3)
    assert len(blocks.allocator.free) == 3 and len(blocks.cached) == 1


class CharTokenizer:
    def decode(self, ids):
        return "".join(chr(97 + t % 26) for t in ids)


def test_stop_strings_and_eos(model, prompts, alone):
    text = CharTokenizer().decode(alone[0])
    stop = text[3:5]
    engine = Engine(model, CharTokenizer())
    request = engine.add(prompts[0], max_tokens=NEW, stop=[stop, "zzzzzz"])
    engine.run()
    cut = text.index(stop)
    assert request.finish_reason == "stop" and request.text == text[:cut]
    assert request.output == alone[0][:cut + len(stop)]
    eos_model = Transformer(model.config.with_(eos_token_id=alone[1][2]))
    eos_model.load_state_dict(model.state_dict())
    request = generate_many(Engine(eos_model.eval()), [prompts[1]], max_tokens=NEW)[0]
    assert request.output == alone[1][:alone[1].index(alone[1][2]) + 1] and request.finish_reason == "stop"


def test_visible_text_holds_back_a_possible_stop_string(model):
    engine = Engine(model, CharTokenizer())
    request = engine.add([1, 2], max_tokens=4, stop=["cdx"])
    request.output = [0, 1, 2, 3]                                  # "abcd": "cd" may become "cdx"
    assert engine.visible_text(request) == "ab"


def test_abort_frees_blocks_and_queue_is_bounded(model, prompts):
    engine = Engine(model, max_waiting=2, prefix_caching=False)
    a, b = engine.add(prompts[0], max_tokens=NEW), engine.add(prompts[1], max_tokens=NEW)
    with pytest.raises(QueueFull, match="queue is full"):
        engine.add(prompts[2], max_tokens=NEW)
    engine.step()
    assert engine.blocks_in_use > 0
    engine.abort(a)
    engine.abort(b)
    assert engine.blocks_in_use == 0 and not engine.has_work and a.finish_reason == "abort"
    assert engine.stats["aborted"] == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[], max_tokens=4), "empty"),
    (dict(prompt=[1, 600], max_tokens=4), "outside the vocabulary"),
    (dict(prompt=[1], max_tokens=0), "max_tokens must be >= 1"),
    (dict(prompt=[1], max_tokens=300), "exceeds the model's context"),
    (dict(prompt=[1], max_tokens=4, temperature=-1.0), "temperature"),
    (dict(prompt=[1], max_tokens=4, seed=-3), "seed"),
    (dict(prompt=[1], max_tokens=4, stop=["x"]), "tokenizer"),
    (dict(prompt=[1], max_tokens=4, stop=[""]), "non-empty string"),
    (dict(prompt=[[1, 2], [3]], max_tokens=4), "one prompt"),
])
def test_bad_requests_get_one_clear_error(model, kwargs, message):
    engine = Engine(model)
    with pytest.raises(ValueError, match=message):
        engine.add(**kwargs)
    assert not engine.has_work


def test_engine_settings_are_checked(model):
    for bad, message in ((dict(policy="fifo"), "policy"), (dict(max_seqs=0), "max_seqs"),
                         (dict(prefill_chunk=0), "prefill_chunk"), (dict(max_batch_tokens=True), "max_batch_tokens")):
        with pytest.raises(ValueError, match=message):
            Engine(model, **bad)


def test_request_larger_than_the_pool_is_refused(model):
    with pytest.raises(ValueError, match="KV blocks; the pool has 2"):
        Engine(model, num_blocks=2, block_size=4).add(list(range(10)), max_tokens=4)


@pytest.mark.slow
def test_smollm2_engine_equals_generate_alone(smollm2):
    """Real prompts through the engine with small chunks and a pool small enough to preempt."""
    model, tok = smollm2
    messages = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primes.",
                "Explain a KV cache in one sentence."]
    prompts = [tok.encode_chat([{"role": "user", "content": m}], add_generation_prompt=True) for m in messages]
    alone = [generate(model, torch.tensor([p]), 16)[0, len(p):].tolist() for p in prompts]
    alone = [a[:a.index(2) + 1] if 2 in a else a for a in alone]
    engine = Engine(model, tok, num_blocks=12, block_size=8, max_batch_tokens=24, max_seqs=4)
    requests = generate_many(engine, prompts, max_tokens=16)
    assert [r.output for r in requests] == alone
    assert engine.stats["preemptions"] > 0 and engine.blocks.hit_tokens > 0   # the chat template is a shared prefix
    assert requests[0].text == tok.decode([t for t in alone[0] if t != 2])
