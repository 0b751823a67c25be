"""Prepacked linears (backends/prepack.py) against F.linear, their reference, and grouped attention against attention_ref."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm import compile_decode
from minillm.cache.kv_cache import StaticCache
from minillm.model import Transformer, attention_grouped, attention_ref, tiny
from minillm.backends.prepack import PACK_CHOICES, PackedLinear, available, packed_count, pays, prepack_linears

needs_bf16 = pytest.mark.skipif(available(torch.bfloat16) is not None, reason=str(available(torch.bfloat16)))


def _linear(out_f, in_f, dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=False).to(dtype).requires_grad_(False)


@needs_bf16
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
def test_prepacked_bfloat16_linear_is_bit_equal_to_f_linear(rows):
    """Same kernel, same blocks: the reorder done once gives the bits the per-call reorder gives."""
    linear = _linear(96, 64, torch.bfloat16)
    packed = PackedLinear.from_linear(linear, rows=8, gemv=False)    # the prepacked copy alone (one row too)
    x = torch.randn(2, rows, 64).bfloat16()
    assert packed.kernel() == "onednn-prepacked" and "onednn-prepacked" in repr(packed)
    assert torch.equal(packed(x), F.linear(x, linear.weight)) and torch.equal(packed(x), packed.forward_ref(x))


@pytest.mark.skipif(available(torch.float32) is not None, reason=str(available(torch.float32)))
def test_prepacked_float32_linear_agrees_with_f_linear():
    linear = _linear(96, 64, torch.float32, seed=1)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(5, 64)
    torch.testing.assert_close(packed(x), packed.forward_ref(x), rtol=1e-5, atol=1e-5)


@needs_bf16
def test_a_weight_changed_after_packing_runs_the_plain_kernel_not_the_stale_copy():
    linear = _linear(32, 64, torch.bfloat16, seed=2)
    packed = PackedLinear.from_linear(linear, gemv=False)       # gemv: cpu_gemv's kernel, which keeps no copy
    x = torch.randn(4, 64).bfloat16()
    with torch.no_grad():
        packed.weight.mul_(2)                       # in place: the packed copy is stale now
    assert packed.kernel().startswith("plain") and torch.equal(packed(x), F.linear(x, packed.weight))
    square = PackedLinear.from_linear(_linear(64, 64, torch.bfloat16, seed=4), gemv=False)
    square.weight = nn.Parameter(square.weight.t(), requires_grad=False)     # same storage and shape, transposed
    assert square.kernel().startswith("plain") and torch.equal(square(x), F.linear(x, square.weight))
    packed.weight = nn.Parameter(packed.weight.float(), requires_grad=False)   # another tensor altogether
    assert torch.equal(packed(x.float()), F.linear(x.float(), packed.weight))


@needs_bf16
def test_training_through_a_packed_linear_gets_gradients():
    """The op has no backward, so with gradients on the module takes F.linear: nothing silently detached."""
    linear = nn.Linear(64, 32, bias=False).bfloat16()
    packed = PackedLinear.from_linear(linear)
    packed(torch.randn(3, 64).bfloat16()).float().sum().backward()
    assert packed.weight.grad is not None and packed.weight.grad.shape == (32, 64)


@needs_bf16
def test_prepacking_a_model_keeps_its_tied_head_its_state_dict_and_its_logits():
    torch.manual_seed(0)
    model = Transformer(tiny()).bfloat16().eval()
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    before, state = model(ids), {k: v.clone() for k, v in model.state_dict().items()}
    n = prepack_linears(model, measure=False)
    assert n == 7 * model.config.n_layers + 1 == packed_count(model)        # 7 per block + the output head
    assert model.output.weight is model.tok_embeddings.weight                 # still tied
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(model(ids), before)


@needs_bf16
def test_whether_packing_pays_is_measured_per_shape_and_kept():
    linear = _linear(48, 64, torch.bfloat16, seed=3)
    answer = pays(linear, rows=8, repeats=3)
    key = (48, 64, "bfloat16", torch.get_num_threads(), 8)
    assert set(PACK_CHOICES[key]) == {"plain", "prepacked"}
    assert answer == (PACK_CHOICES[key]["prepacked"] < PACK_CHOICES[key]["plain"])


def test_packing_refuses_what_onednn_cannot_take():
    with pytest.raises(ValueError, match="cannot prepack a torch.float16 weight"):
        PackedLinear.from_linear(nn.Linear(8, 8, bias=False).half())
    with pytest.raises(ValueError, match="without a bias"):
        PackedLinear.from_linear(nn.Linear(8, 8))


@needs_bf16
@torch.inference_mode()
def test_compiled_steps_run_the_packed_linears_and_match_eager():
    """compile_decode prepacks (prepack=True, unmeasured here via measure in pays: whatever it chose) and its
    graphs call the op with each layer's own weight; prepack=False leaves plain nn.Linears."""
    torch.manual_seed(0)
    model = Transformer(tiny()).bfloat16().eval()
    plain = compile_decode(Transformer(tiny()).bfloat16().eval(), widths=(4,), prepack=False)
    assert plain.prepacked == 0 and not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    prepack_linears(model, measure=False)
    fast = compile_decode(model, widths=(4,))
    assert fast.prepacked == packed_count(model) == 4 * model.config.n_layers + 1   # 7 a block, fused into 4
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    caches = [StaticCache(model.config, 1, fast.cache_len(9), dtype=torch.bfloat16) for _ in range(2)]
    fast(ids[:, :6], cache=caches[0]), model(ids[:, :6], cache=caches[1])
    compiled, eager = fast(ids[:, 6:9], cache=caches[0]), model(ids[:, 6:9], cache=caches[1])
    assert fast.compiled_calls == 1
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("T, S", [(1, 12), (5, 12), (8, 40)])
def test_grouped_attention_equals_attention_on_repeated_kv_heads(T, S):
    """Query heads h = j * g .. j * g + g - 1 share kv head j, as repeat_interleave pairs them."""
    torch.manual_seed(T)
    B, nh, nkv, d = 2, 9, 3, 16
    q, k, v = torch.randn(B, nh, T, d), torch.randn(B, nkv, S, d), torch.randn(B, nkv, S, d)
    mask = torch.rand(B, 1, T, S) < 0.7
    mask[..., 0] = True
    expected = attention_ref(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), mask)
    torch.testing.assert_close(attention_grouped(q, k, v, mask), expected, rtol=1e-5, atol=1e-5)


def test_a_model_attending_grouped_gives_the_logits_of_sdpa():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids)
        for layer in model.layers:
            layer.attn.attn_fn = attention_grouped
        torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-4)
