"""Generation on a tiny random model: input checks, greedy vs cached, sampling controls."""
import pytest
import torch

import minillm
from minillm.sampling import probs_from_logits, sample_next


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
    (torch.tensor([1, 2, 3]), r"shape \(batch, tokens\)"),
    (torch.tensor([[1, 600]]), "token id 600 is outside the vocabulary"),
    (torch.tensor([[-1, 2]]), "token id -1 is outside the vocabulary"),
    (torch.zeros(1, 300, dtype=torch.long), "prompt has 300 tokens; the model's context is 256"),
    (torch.zeros(1, 0, dtype=torch.long), "prompt is empty"),
    ([[1, 2, 3]], "must be a torch.Tensor"),
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
