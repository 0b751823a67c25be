"""Speculative decoding: lossless (greedy token-exact, sampled distribution-exact), cache rollback, drafters."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from minillm.decoding.drafters import (ModelDrafter, NgramDrafter, early_exit_model, layer_skip_drafter,
    load_draft_model)
from minillm.decoding import generate, make_drafter, speculative_generate
from minillm.decoding.sampling import probs_from_logits
from minillm.cache.kv_cache import StaticCache
from minillm.model import Transformer, tiny
from minillm.decoding.speculative import accept_chain as verify, expected_speedup, expected_tokens_per_forward

DRAFT_CKPT = Path(__file__).resolve().parent.parent / "minillm" / "assets" / "smollm2_draft.safetensors"


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models run ~30x faster on one thread than on two contended ones; SmolLM2 tests keep the default."""
    if "smollm2" in request.fixturenames:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed, **changes):
    torch.manual_seed(seed)
    return Transformer(tiny(**changes)).eval()


@pytest.fixture(scope="module")
def target():
    return make_model(0, n_layers=4)


def drafters_for(target):
    other = make_model(1, n_layers=1)
    return {"ngram": NgramDrafter(), "layerskip:1": layer_skip_drafter(target, 1),
            "layerskip:3": layer_skip_drafter(target, 3), "model": ModelDrafter(other),
            "model-adaptive": ModelDrafter(other, stop_below=0.3)}


_plain = {}


def plain_greedy(target, ids):
    key = tuple(ids[0].tolist())
    if key not in _plain:
        _plain[key] = generate(target, ids, 128, eos_token_id=None)
    return _plain[key]


def prompts():
    g = torch.Generator().manual_seed(0)
    repetitive = torch.tensor([[7, 8, 9, 10, 11] * 4])  # gives the n-gram drafter matches
    return [repetitive] + [torch.randint(0, 512, (1, n), generator=g) for n in (1, 17)]


@pytest.mark.parametrize("name", ["ngram", "layerskip:1", "layerskip:3", "model", "model-adaptive"])
def test_greedy_speculative_equals_plain_greedy(target, name):
    drafter = drafters_for(target)[name]
    for ids, k in itertools.product(prompts(), (1, 4)):
        plain = plain_greedy(target, ids)
        spec = generate(target, ids, 128, draft=drafter, draft_len=k, eos_token_id=None)
        assert torch.equal(spec, plain), (name, ids.shape, k)


def test_some_drafts_are_accepted(target):
    """Not only correct but useful: the layer-skip drafter shares the target's weights and wins tokens."""
    ids = prompts()[0]
    for drafter in (NgramDrafter(), layer_skip_drafter(target, 3)):
        result = speculative_generate(target, ids, 64, drafter, 4, eos_token_id=None)
        assert result.target_forwards < 64 and result.accepted > 0
        assert len(result.tokens) == 64 and sum(result.from_draft) == result.accepted


def test_cache_after_rollback_equals_plain_run(target):
    ids = prompts()[2]
    cache = StaticCache(target.config, 1, ids.shape[1] + 40 + 5)
    result = speculative_generate(target, ids, 40, ModelDrafter(make_model(1, n_layers=1)), 5,
                                  eos_token_id=None, cache=cache)
    assert result.drafted > result.accepted > 0  # there were rejections to roll back
    seq = torch.cat([ids, torch.tensor([result.tokens])], dim=1)
    plain = StaticCache(target.config, 1, seq.shape[1])
    with torch.inference_mode():
        for t in range(seq.shape[1] - 1):  # token by token, as plain decoding fills it
            target(seq[:, t:t + 1], cache=plain)
    n = seq.shape[1] - 1  # the last token is fed with the next round's drafts
    assert cache.length == plain.length == n
    torch.testing.assert_close(cache.k[:, :, :, :n], plain.k[:, :, :, :n], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cache.v[:, :, :, :n], plain.v[:, :, :, :n], atol=1e-5, rtol=1e-4)
    assert torch.equal(cache.positions[:, :n], plain.positions[:, :n])


def chi_square_p_value(counts, probs):
    """Pearson's goodness of fit: P(chi2_{df} >= statistic), df = bins - 1 (bins with expected >= 5)."""
    if counts[probs == 0].sum() > 0:
        return 0.0  # an outcome the target can never produce
    counts, probs = counts[probs > 0], probs[probs > 0]
    expected = probs * counts.sum()
    keep = expected >= 5
    other = torch.stack([counts[~keep].sum(), expected[~keep].sum()])  # pool the rare bins into one
    obs = torch.cat([counts[keep], other[:1]]) if (~keep).any() else counts[keep]
    exp = torch.cat([expected[keep], other[1:]]) if (~keep).any() else expected[keep]
    statistic = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64),
                                         statistic.double() / 2))


def exact_two_token_probs(model, ids, temperature, top_k=None):
    """P(x1, x2 | ids) under the target alone, by enumeration: (V * V,)."""
    V = model.config.vocab_size
    with torch.inference_mode():
        p1 = probs_from_logits(model(ids)[0, -1:], temperature, top_k)[0].double()              # (V,)
        both = torch.cat([ids.expand(V, -1), torch.arange(V)[:, None]], dim=1)                   # (V, T+1)
        p2 = probs_from_logits(model(both)[:, -1], temperature, top_k).double()                  # (V, V)
    return (p1[:, None] * p2).flatten()


def distribution_models():
    """A 6-token vocabulary, untied heads scaled up: target and draft disagree a lot (p and q far apart)."""
    target = make_model(0, vocab_size=6, n_layers=2, tie_embeddings=False)
    draft = make_model(5, vocab_size=6, n_layers=1, tie_embeddings=False)
    with torch.no_grad():
        target.output.weight.mul_(10), draft.output.weight.mul_(10)
    return target, draft


@pytest.mark.parametrize("temperature,top_k,drafter_name", [(1.0, None, "model"), (0.6, 3, "model"),
                                                              (1.0, None, "ngram")])
def test_sampled_speculative_matches_target_distribution(temperature, top_k, drafter_name):
    """Lossless in distribution: 2-token continuations, 6-token vocabulary, chi-square against the exact
    target probabilities. Fixed seeds make the test deterministic; the threshold 0.001 is not a coin flip."""
    target, draft = distribution_models()
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    drafter = ModelDrafter(draft) if drafter_name == "model" else NgramDrafter()
    counts = torch.zeros(36, dtype=torch.float64)
    drafted = accepted = 0
    for seed in range(800):
        r = speculative_generate(target, ids, 2, drafter, 2, temperature=temperature, top_k=top_k, seed=seed,
                                 eos_token_id=None)
        counts[r.tokens[0] * 6 + r.tokens[1]] += 1
        drafted, accepted = drafted + r.drafted, accepted + r.accepted
    assert 0 < accepted < drafted  # both the accept and the resample branch were exercised
    assert chi_square_p_value(counts, exact_two_token_probs(target, ids, temperature, top_k)) > 1e-3


def test_chi_square_rejects_a_wrong_distribution():
    """The test above can fail: the draft's own distribution is told apart from the target's."""
    target, draft = distribution_models()
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    g = torch.Generator().manual_seed(0)
    probs = exact_two_token_probs(draft, ids, 1.0)
    counts = torch.bincount(torch.multinomial(probs.float(), 800, replacement=True, generator=g), minlength=36)
    assert chi_square_p_value(counts.double(), exact_two_token_probs(target, ids, 1.0)) < 1e-6


def test_verify_greedy_and_bonus():
    logits = torch.tensor([[0., 5, 0], [0, 0, 5], [5, 0, 0]])  # argmax 1, 2, 0
    assert verify([1, 2], None, logits) == (2, 0)   # both accepted, bonus = argmax of the last row
    assert verify([1, 0], None, logits) == (1, 2)   # second rejected, replaced by the target's 2
    assert verify([], None, logits[:1]) == (0, 1)   # no draft: plain decoding


def test_ngram_drafter():
    assert NgramDrafter(max_n=2).propose([5, 6, 7, 9, 5, 6], 3).tokens == [6, 7, 9, 5]
    assert NgramDrafter(max_n=2).lookup([5, 6, 7, 5, 8, 5, 6], 2) == [7, 5]  # (5, 6) beats later 5
    assert NgramDrafter().lookup([1, 2, 3], 4) == []
    assert NgramDrafter().propose([4], 4).tokens == [4]
    with pytest.raises(ValueError, match="min_n"):
        NgramDrafter(max_n=1, min_n=2)


def test_early_exit_model_shares_weights_and_matches_manual_forward(target):
    early = early_exit_model(target, 2)
    assert early.layers[1] is target.layers[1] and early.output.weight is target.tok_embeddings.weight
    ids = prompts()[2]
    with torch.inference_mode():
        x = target.tok_embeddings(ids)
        from minillm.model import rope_cos_sin

        pos = torch.arange(ids.shape[1])[None]
        cos, sin = rope_cos_sin(pos, target.config.head_dim, target.config.rope_theta)
        mask = pos[:, None, None, :] <= pos[:, None, :, None]
        for layer in target.layers[:2]:
            x = layer(x, cos, sin, mask)
        torch.testing.assert_close(early(ids), target.output(target.norm(x)))
    with pytest.raises(ValueError, match="n_layers"):
        early_exit_model(target, 5)


def test_formulas():
    assert expected_tokens_per_forward(0.0, 4) == 1.0 and expected_tokens_per_forward(1.0, 4) == 5.0
    assert abs(expected_tokens_per_forward(0.5, 2) - 1.75) < 1e-12  # 1 + 0.5 + 0.25
    assert abs(expected_speedup(0.5, 2, 0.1) - 1.75 / 1.2) < 1e-12
    with pytest.raises(ValueError, match="acceptance"):
        expected_tokens_per_forward(1.5, 2)


def test_bad_inputs(target):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_generate(target, ids.expand(2, -1), 4, NgramDrafter())
    with pytest.raises(ValueError, match="draft_len"):
        speculative_generate(target, ids, 4, NgramDrafter(), draft_len=-1)
    with pytest.raises(ValueError, match="layerskip"):
        make_drafter("layerskip:x", target)
    with pytest.raises(ValueError, match="existing checkpoint"):
        make_drafter("no/such/file.safetensors", target)
    with pytest.raises(ValueError, match="stop_below"):
        ModelDrafter(target, stop_below=2.0)
    with pytest.raises(ValueError, match="cache"):
        generate(target, ids, 4, tree="recycling", cache="none")  # a tree needs a cache to compact
    # one loop: chains now run with any cache, and still equal plain greedy
    for cache in ("none", "paged"):
        assert torch.equal(generate(target, ids, 12, draft="ngram", cache=cache, eos_token_id=None),
                           generate(target, ids, 12, eos_token_id=None))


@pytest.mark.slow
def test_smollm2_greedy_speculative_equals_plain(smollm2):
    model, tok = smollm2
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n")])
    plain = generate(model, ids, 128, eos_token_id=None)
    drafts = ["ngram", "layerskip:8"] + ([str(DRAFT_CKPT)] if DRAFT_CKPT.exists() else [])
    for draft in drafts:
        assert torch.equal(generate(model, ids, 128, draft=draft, draft_len=4, eos_token_id=None), plain), draft


@pytest.mark.slow
@pytest.mark.skipif(not DRAFT_CKPT.exists(), reason="the distilled draft checkpoint is not built")
def test_distilled_draft_checkpoint(smollm2):
    model, tok = smollm2
    draft = load_draft_model(DRAFT_CKPT)
    assert draft.config.vocab_size == model.config.vocab_size and draft.num_params() < 8_000_000
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Germany is")])
    r = speculative_generate(model, ids, 32, ModelDrafter(draft), 4, eos_token_id=None)
    torch.manual_seed(0)
    untrained = Transformer(draft.config).eval()
    baseline = speculative_generate(model, ids, 32, ModelDrafter(untrained), 4, eos_token_id=None)
    assert r.accepted > baseline.accepted  # it learned something beyond an untrained model of its shape


def test_bad_draft_files_give_one_clear_error(tmp_path):
    import dataclasses
    import json
    import pickle

    from safetensors.torch import save_file

    from minillm.decoding import make_drafter
    from minillm.model import Transformer, tiny

    target = Transformer(tiny())
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(DRAFT_CKPT.read_bytes()[:5000])
    wrong = tmp_path / "wrong.safetensors"
    config = json.dumps(dataclasses.asdict(tiny()))
    save_file({"tok_embeddings.weight": torch.zeros(3, 3)}, str(wrong), metadata={"config": config})
    for path, message in ((tmp_path, "is not 'ngram'"), (text, "is corrupt or not a minillm draft checkpoint"),
                          (pickled, "not a minillm draft checkpoint"), (truncated, "not a minillm draft checkpoint"),
                          (wrong, "does not match its config")):
        with pytest.raises(ValueError, match=message):
            make_drafter(str(path), target)
