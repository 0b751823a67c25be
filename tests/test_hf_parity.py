"""minillm's SmolLM2 against HF transformers reading the same GGUF: logits and greedy tokens."""
import pytest
import torch

import minillm

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1969, Neil Armstrong became the first person to",
    "Les fleurs du jardin sont",
]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_hf(smollm2, hf_smollm2, prompt):
    model, tok = smollm2
    hf_model, _ = hf_smollm2
    ids = torch.tensor([tok.encode(prompt)])
    with torch.inference_mode():
        ours, theirs = model(ids), hf_model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def hf_greedy(hf_model, ids, n):
    """Greedy decoding driven by hand through HF's own forward and KV cache, never stopping at EOS
    (HF's generate(min_new_tokens=...) would instead forbid EOS, changing the argmax)."""
    with torch.inference_mode():
        out = hf_model(ids, use_cache=True)
        new = []
        for _ in range(n):
            next_id = out.logits[:, -1:].argmax(-1)
            new.append(next_id)
            out = hf_model(next_id, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat([ids, *new], dim=1)


def test_greedy_64_tokens_match_hf(smollm2, hf_smollm2):
    model, tok = smollm2
    hf_model, _ = hf_smollm2
    for prompt in PROMPTS[:2]:
        ids = torch.tensor([tok.encode(prompt)])
        ours = minillm.generate(model, ids, max_new_tokens=64, eos_token_id=None)
        assert ours.shape == (1, ids.shape[1] + 64)
        assert ours.tolist() == hf_greedy(hf_model, ids, 64).tolist()


def test_batched_forward_matches_one_by_one(smollm2):
    model, tok = smollm2
    a, b = tok.encode("The quick brown fox"), tok.encode("A slow green turtle")
    n = min(len(a), len(b))
    ids = torch.tensor([a[:n], b[:n]])
    with torch.inference_mode():
        both = model(ids)
        torch.testing.assert_close(both[1:], model(ids[1:]), atol=1e-4, rtol=0)
