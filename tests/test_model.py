"""Tiny-config checks of model/llama.py: shapes, causality, attention implementations agree, GQA extremes."""
import pytest
import torch

from minillm.model import Config, Transformer, tiny


def make_model(**changes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny(**changes)).eval()


def test_shapes():
    model = make_model()
    idx = torch.randint(0, model.config.vocab_size, (3, 11))
    logits, hidden = model(idx, return_hidden=True)
    assert logits.shape == (3, 11, model.config.vocab_size)
    assert hidden.shape == (3, 11, model.config.dim)


def test_tied_embeddings_share_storage_and_count_once():
    tied, untied = make_model(), make_model(tie_embeddings=False)
    assert tied.output.weight is tied.tok_embeddings.weight
    vocab_by_dim = tied.config.vocab_size * tied.config.dim
    assert untied.num_params() - tied.num_params() == vocab_by_dim


@pytest.mark.parametrize("impl", ["sdpa", "ref"])
def test_causal_a_future_token_does_not_change_earlier_logits(impl):
    model = make_model().set_attention(impl)
    idx = torch.randint(0, 512, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % 512
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=0)  # exactly, not approximately
    assert not torch.allclose(before[:, 10:], after[:, 10:])                   # and later positions do see it


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # multi-head (no sharing), grouped, multi-query
def test_ref_and_sdpa_attention_agree(n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads)
    idx = torch.randint(0, 512, (2, 37))  # an odd length, not a multiple of any block size
    with torch.no_grad():
        fast = model.set_attention("sdpa")(idx)
        ref = model.set_attention("ref")(idx)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)  # float32: only summation order differs


def test_gqa_with_one_kv_head_equals_full_mha_with_copied_kv():
    """n_kv_heads=1 (multi-query) is multi-head attention whose k/v heads are all the same head."""
    mqa = make_model(n_kv_heads=1)
    mha = Transformer(mqa.config.with_(n_kv_heads=mqa.config.n_heads)).eval()
    state = mqa.state_dict()
    for layer in range(mqa.config.n_layers):
        for name in ("wk", "wv"):
            key = f"layers.{layer}.attn.{name}.weight"
            state[key] = state[key].repeat(mqa.config.n_heads, 1)  # (hd, dim) -> (nh * hd, dim)
    mha.load_state_dict(state)
    idx = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(mqa(idx), mha(idx), rtol=1e-5, atol=1e-5)


def test_explicit_positions_and_mask_match_defaults():
    model = make_model()
    idx = torch.randint(0, 512, (2, 8))
    positions = torch.arange(8).expand(2, 8)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()[None, None]  # (1, 1, T, S)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model(idx, positions=positions, mask=mask), rtol=0, atol=0)


def test_bad_configs_and_impls_raise():
    with pytest.raises(ValueError, match="n_kv_heads"):
        Config(n_heads=4, n_kv_heads=3, dim=64)
    with pytest.raises(ValueError, match="attention impl"):
        make_model().set_attention("flash")
