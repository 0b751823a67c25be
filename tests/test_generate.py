"""Generation on a tiny random model: input checks, greedy vs cached, sampling controls."""
import pytest
import torch

import minillm
from minillm.decoding.sampling import probs_from_logits, sample_next


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return minillm.Transformer(minillm.tiny()).eval()


def prompt(n=5, vocab=512):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(1))


def test_returns_prompt_plus_new_tokens(model):
    ids = prompt()
    out = minillm.generate(model, ids, max_new_tokens=7)
    assert out.shape == (1, 12) and torch.equal(out[:, :5], ids)


def test_cached_equals_uncached(model):
    ids = prompt(9)
    a = minillm.generate(model, ids, max_new_tokens=20, cache="static")
    b = minillm.generate(model, ids, max_new_tokens=20, cache="none")
    assert a.tolist() == b.tolist()


def test_greedy_is_argmax_of_full_forward(model):
    ids = prompt(6)
    out = minillm.generate(model, ids, max_new_tokens=1)
    with torch.no_grad():
        assert out[0, -1] == model(ids)[0, -1].argmax()


def test_seeded_sampling_is_reproducible(model):
    ids = prompt()
    a = minillm.generate(model, ids, max_new_tokens=16, temperature=1.0, seed=123)
    b = minillm.generate(model, ids, max_new_tokens=16, temperature=1.0, seed=123)
    c = minillm.generate(model, ids, max_new_tokens=16, temperature=1.0, seed=124)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    ids = prompt()
    greedy = minillm.generate(model, ids, max_new_tokens=10)
    assert minillm.generate(model, ids, max_new_tokens=10, temperature=1.0, top_k=1, seed=0).tolist() == greedy.tolist()
    assert minillm.generate(model, ids, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=0).tolist() == greedy.tolist()


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert (probs_from_logits(logits, top_k=2) > 0).tolist() == [[True, True, False, False]]
    assert (probs_from_logits(logits, top_p=0.8) > 0).tolist() == [[True, True, False, False]]
    assert (probs_from_logits(logits, top_p=0.81) > 0).tolist() == [[True, True, True, False]]
    torch.testing.assert_close(probs_from_logits(logits), torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(20000, 3)
    draws = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3) / 20000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)


def test_stops_at_eos(model):
    ids = prompt()
    first = minillm.generate(model, ids, max_new_tokens=1)[0, -1].item()
    out = minillm.generate(model, ids, max_new_tokens=10, eos_token_id=first)
    assert out.shape[1] == ids.shape[1] + 1


def test_batch_pads_finished_sequences_with_eos(model):
    ids = torch.cat([prompt(), prompt() + 1], dim=0)
    free = minillm.generate(model, ids, max_new_tokens=6, eos_token_id=None)
    eos = free[0, 6].item()  # the first sequence's second new token
    out = minillm.generate(model, ids, max_new_tokens=6, eos_token_id=eos)
    row = out[0, 5:].tolist()
    assert row[: row.index(eos) + 1] == free[0, 5: 5 + row.index(eos) + 1].tolist()
    assert all(t == eos for t in row[row.index(eos):])


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[1.0, 2.0]]), "integer tensor"),
    (torch.tensor(3), r"shape \(batch, tokens\)"),
    (torch.zeros(1, 2, 3, dtype=torch.long), r"shape \(batch, tokens\)"),
    (torch.tensor([[1, 600]]), "token id 600 is outside the vocabulary"),
    (torch.tensor([[-1, 2]]), "token id -1 is outside the vocabulary"),
    (torch.zeros(1, 300, dtype=torch.long), "prompt has 300 tokens; the model's context is 256"),
    (torch.zeros(1, 0, dtype=torch.long), "prompt is empty"),
    ("1 2 3", "a text prompt needs the model's tokenizer"),
    ({"ids": [1]}, "must be a torch.Tensor"),
    ([[1.5, 2.0]], "integer token ids"),
    ([[1, 2], []], "each of at least one token"),
])
def test_bad_input_is_a_clear_error(model, bad, message):
    with pytest.raises(ValueError, match=message):
        minillm.generate(model, bad, max_new_tokens=4)


def test_prompt_plus_new_tokens_over_context(model):
    with pytest.raises(ValueError, match=r"exceeds the model's context of 256"):
        minillm.generate(model, prompt(200), max_new_tokens=100)


def test_bad_sampling_settings(model):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        minillm.generate(model, prompt(), max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match="top_p must be in"):
        minillm.generate(model, prompt(), max_new_tokens=2, temperature=1, top_p=1.5)


# ----------------------------------------------------------------------------- one loop, more shapes
@pytest.fixture(scope="module")
def lively():
    """A tiny model with larger weights, whose greedy tokens vary (a too-quiet one repeats a token)."""
    torch.manual_seed(0)
    m = minillm.Transformer(minillm.tiny()).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return m


def ragged_prompts():
    return [prompt(n, 512)[0] + i for i, n in enumerate((3, 9, 6))]


@pytest.mark.parametrize("cache", ["static", "none", "paged"])
def test_prompts_of_different_lengths_equal_each_alone(lively, cache):
    prompts = ragged_prompts()
    run = minillm.decode(lively, prompts, 12, cache=cache, eos_token_id=None, keep_hidden=True)
    for b, p in enumerate(prompts):
        alone = minillm.decode(lively, p[None], 12, eos_token_id=None, keep_hidden=True)
        assert run.rows[b] == alone.tokens
        T = len(p) + 11                       # every token that entered the cache, after the row's padding
        torch.testing.assert_close(run.hidden[b, -T:], alone.hidden[0], atol=1e-5, rtol=1e-5)
    assert len(set(map(tuple, run.rows))) == 3 and len(set(run.rows[1])) > 3  # the rows say different things


def test_attention_mask_left_padding_as_transformers_takes_it(lively):
    prompts = ragged_prompts()
    T = max(len(p) for p in prompts)
    ids = torch.full((3, T), 7)                             # any id under the padding
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    out = minillm.generate(lively, ids, 10, attention_mask=mask, eos_token_id=None)
    assert out.shape == (3, T + 10)
    listed = minillm.generate(lively, prompts, 10, eos_token_id=None)
    for b, p in enumerate(prompts):
        assert out[b, T:].tolist() == listed[b][len(p):].tolist() == \
            minillm.generate(lively, p[None], 10, eos_token_id=None)[0, len(p):].tolist()
    one = minillm.generate(lively, ids[:1], 10, attention_mask=mask[:1], eos_token_id=None)  # padding dropped
    assert one[0, T:].tolist() == out[0, T:].tolist()


def test_list_of_prompts_stops_each_at_eos(lively):
    prompts = ragged_prompts()
    free = minillm.generate(lively, prompts, 8, eos_token_id=None)
    eos = free[1][len(prompts[1]) + 2].item()             # the second prompt's third new token
    out = minillm.generate(lively, prompts, 8, eos_token_id=eos)
    assert out[1].tolist() == free[1][:len(prompts[1]) + 3].tolist()


def test_one_prompt_as_a_list_of_ints_or_a_1d_tensor_is_one_prompt_not_a_batch(lively):
    """tokenizer.encode gives a list of ints: that is one prompt, not len(list) one-token prompts."""
    p = prompt(6)[0]
    want = minillm.generate(lively, p[None], 8, eos_token_id=None)[0]
    assert minillm.generate(lively, p.tolist(), 8, eos_token_id=None).tolist() == want.tolist()
    assert minillm.generate(lively, p, 8, eos_token_id=None).tolist() == want.tolist()
    eos = want[6 + 2].item()                               # stops at its EOS, like a list of prompts
    assert minillm.generate(lively, p.tolist(), 8, eos_token_id=eos).tolist() == want[:6 + 3].tolist()


def test_text_prompts_give_text_back():
    model = ByteCycle(b"abc")
    assert minillm.generate(model, "xc", 4, tokenizer=Bytes(), cache="none") == "xcabca"
    assert minillm.generate(model, ["c", "ab"], 2, tokenizer=Bytes(), cache="none") == ["cab", "abca"]
    with pytest.raises(ValueError, match="a text prompt needs the model's tokenizer"):
        minillm.generate(model, "c", 2)
    with pytest.raises(ValueError, match="all text or all token ids, not a mix"):
        minillm.generate(model, ["c", [97]], 2, tokenizer=Bytes())


def test_text_prompt_on_smollm2_equals_ids_and_refuses_special_tokens(smollm2):
    model, tok = smollm2
    text = "The capital of France is"
    ids = minillm.generate(model, torch.tensor([tok.encode(text)]), 6)[0, len(tok.encode(text)):]
    assert minillm.generate(model, text, 6, tokenizer=tok) == text + tok.decode(ids.tolist())
    with pytest.raises(ValueError, match="special"):
        minillm.generate(model, "<|im_start|>system", 2, tokenizer=tok)


@pytest.mark.parametrize("mask, message", [
    (torch.tensor([[1, 1, 0]]), "padding after a token: pad on the left"),
    (torch.tensor([[0, 0, 0]]), "row 0 of|row 0 has no tokens"),
    (torch.tensor([[2, 1, 1]]), "1 for a token and 0 for padding"),
    (torch.ones(1, 4, dtype=torch.long), "tensor of the ids' shape"),
])
def test_bad_attention_mask(model, mask, message):
    with pytest.raises(ValueError, match=message):
        minillm.generate(model, prompt(3), 4, attention_mask=mask)


@pytest.mark.parametrize("draft", [None, "ngram", "recycling"])
def test_chunked_prefill_gives_the_same_tokens(lively, draft):
    ids = prompt(21)
    whole = minillm.decode(lively, ids, 12, draft, eos_token_id=None)
    for chunk in (1, 4, 50):
        run = minillm.decode(lively, ids, 12, draft, eos_token_id=None, prefill_chunk=chunk)
        assert run.tokens == whole.tokens
    pieces = minillm.decode(lively, ids, 12, eos_token_id=None, prefill_chunk=4)
    assert pieces.target_forwards == 12 + 5   # 20 prompt tokens: 4+4+4+4+4, then the last with each new one
    with pytest.raises(ValueError, match="prefill_chunk must be an int >= 1"):
        minillm.decode(lively, ids, 4, prefill_chunk=0)


def test_keep_hidden_equals_one_forward_over_the_text(lively):
    ids = prompt(7)
    run = minillm.decode(lively, ids, 9, eos_token_id=None, keep_hidden=True)
    text = torch.cat([ids, torch.tensor([run.tokens])], dim=1)
    with torch.no_grad():
        _, hidden = lively(text[:, :-1], return_hidden=True)  # the last new token never entered the cache
    torch.testing.assert_close(run.hidden, hidden, atol=1e-5, rtol=1e-5)
    spec = minillm.decode(lively, ids, 9, "ngram", eos_token_id=None, keep_hidden=True)
    torch.testing.assert_close(spec.hidden, hidden, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="keep_hidden=True"):
        _ = minillm.decode(lively, ids, 2).hidden


def test_continue_a_cache_that_holds_a_prefix(lively):
    ids = prompt(12)
    whole = minillm.decode(lively, ids, 10, eos_token_id=None)
    cache = minillm.StaticCache(lively.config, 1, 64)
    with torch.inference_mode():
        lively(ids[:, :5], cache=cache)
    rest = minillm.decode(lively, ids[:, 5:], 10, cache=cache, continue_cache=True, eos_token_id=None)
    assert rest.tokens == whole.tokens and cache.length == 12 + 9


@pytest.mark.parametrize("setup, message", [
    (lambda m: dict(cache="static", continue_cache=True), "continue_cache needs a cache object"),
    (lambda m: dict(cache=minillm.StaticCache(m.config, 2, 32)), "holds 2 sequences, the prompt has 1 rows"),
    (lambda m: dict(cache=minillm.StaticCache(m.config, 2, 32), continue_cache=True), "holds 2 sequences"),
    (lambda m: dict(seed=1.5), "seed must be an int"),
    (lambda m: dict(cache="none", prefill_chunk=2), "prefill_chunk needs a KV cache"),
])
def test_bad_loop_settings(lively, setup, message):
    with pytest.raises(ValueError, match=message):
        minillm.decode(lively, prompt(4), 3, **setup(lively))


def test_a_generator_seed_is_drawn_from_across_calls(lively):
    ids = prompt(4)
    g = torch.Generator().manual_seed(5)
    first = minillm.decode(lively, ids, 8, temperature=1.0, seed=g).tokens
    second = minillm.decode(lively, ids, 8, temperature=1.0, seed=g).tokens
    assert first == minillm.decode(lively, ids, 8, temperature=1.0, seed=5).tokens
    assert second != first



class ByteCycle(torch.nn.Module):
    """A stand-in model over bytes: after byte b it predicts the byte that follows b in `cycle`."""

    def __init__(self, cycle: bytes):
        super().__init__()
        self.config = minillm.tiny(vocab_size=256, eos_token_id=None)
        self.after = {a: b for a, b in zip(cycle, cycle[1:] + cycle[:1])}
        self.first = cycle[0]
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, positions=None, mask=None, cache=None, return_hidden=False):
        logits = torch.full((*idx.shape, 256), -1e9)
        for b, t in torch.cartesian_prod(torch.arange(idx.shape[0]), torch.arange(idx.shape[1])).tolist():
            logits[b, t, self.after.get(int(idx[b, t]), self.first)] = 0.0
        return (logits, torch.zeros(*idx.shape, 4)) if return_hidden else logits


class Bytes:
    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def encode(self, text):
        return list(text.encode("utf-8"))


def test_stream_text_yields_whole_characters():
    """"é" is 2 bytes and "😀" 4: one token per byte, and each piece waits for its character's last byte."""
    from minillm import stream_text

    model = ByteCycle("é😀".encode())
    pieces = list(stream_text(model, Bytes(), "hi", 12, cache="none"))
    assert pieces == ["é", "😀", "é", "😀"]
    assert list(stream_text(model, Bytes(), "hi", 3, cache="none")) == ["é", "\ufffd"]   # cut mid-character: shown at the end
    with pytest.raises(ValueError, match="chat=True takes the user's message as a string"):
        list(stream_text(model, Bytes(), [1, 2], 4, chat=True))



def test_stream_text_stops_at_a_stop_string_and_holds_back_what_may_become_one():
    """After "hi" the cycle "abcabc..." follows; stop "ca" ends it, and "c" is held until "a" decides."""
    from minillm import stream_text
    from minillm.decoding import visible_text

    model = ByteCycle(b"abc")
    assert "".join(stream_text(model, Bytes(), "c", 12, cache="none", stop="ca")) == "ab"
    assert "".join(stream_text(model, Bytes(), "c", 12, cache="none", stop=["zz", "bc"])) == "a"
    assert "".join(stream_text(model, Bytes(), "c", 5, cache="none", stop="cb")) == "abcab"   # never met: all of it
    assert visible_text("abc", ["cd"]) == ("ab", False)          # "c" may still become "cd"
    assert visible_text("abc", ["cd"], finished=True) == ("abc", False)
    assert visible_text("abcd e", ["cd", "e"]) == ("ab", True)
    with pytest.raises(ValueError, match="stop must be a non-empty string"):
        list(stream_text(model, Bytes(), "c", 4, stop=[""]))
