"""backends/fuse.py: one matmul for q/k/v and one for gate/up give the separate projections' outputs (the quantized
ones bit for bit: the same integers and scales, stacked), leave what they cannot fuse alone, and
compile_decode fuses by default."""
import copy

import pytest
import torch
import torch.nn as nn

from minillm.backends.compiled import compile_decode
from minillm.backends.fuse import fuse_linears, fuse_projections, fused_count
from minillm.cache.kv_cache import StaticCache
from minillm.model import Transformer, tiny
from minillm.backends.prepack import PackedLinear, available
from minillm.quant.formats import Int4Linear, Int8Linear


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Transformer(tiny()).eval()


def parts(outs=(64, 32, 32), k=64, seed=0):
    torch.manual_seed(seed)
    return [nn.Linear(k, n, bias=False) for n in outs]


@torch.inference_mode()
@pytest.mark.parametrize("rows", [1, 8])
def test_fused_linear_computes_the_parts_side_by_side(rows):
    linears = parts()
    x = torch.randn(rows, 64)
    fused = fuse_linears(linears)
    assert type(fused) is nn.Linear and fused.out_features == 128
    torch.testing.assert_close(fused(x), torch.cat([m(x) for m in linears], -1), atol=1e-6, rtol=1e-6)


@torch.inference_mode()
@pytest.mark.parametrize("kind,impl", [("int4", "ref"), ("int4", "packed"), ("int8", "ref"), ("int8", "packed")])
def test_fused_quantized_linear_is_bit_equal_to_the_parts(kind, impl):
    make = ((lambda m: Int4Linear.from_linear(m, group_size=32, impl=impl)) if kind == "int4"
            else (lambda m: Int8Linear.from_linear(m, impl=impl)))
    quantized = [make(m) for m in parts()]
    fused = fuse_linears(quantized)
    assert type(fused) is type(quantized[0]) and fused.kernel() == quantized[0].kernel()  # the parts' kernel
    for rows in (1, 5):
        x = torch.randn(rows, 64)
        assert torch.equal(fused(x), torch.cat([m(x) for m in quantized], -1))
    assert torch.equal(fused.dequantize(), torch.cat([m.dequantize() for m in quantized]))


def test_what_cannot_be_fused_is_left_alone(tiny_model):
    a, b = parts((32, 32))
    assert fuse_linears([a, Int8Linear.from_linear(b)]) is None                     # mixed kinds
    assert fuse_linears([Int4Linear.from_linear(a, group_size=32), Int4Linear.from_linear(b, group_size=64)]) is None
    assert fuse_linears([a, nn.Linear(64, 32, bias=True)]) is None                   # a bias
    assert fuse_linears([a, nn.Linear(48, 32, bias=False)]) is None                  # another input width
    model = copy.deepcopy(tiny_model)
    model.layers[0].attn.wk = Int8Linear.from_linear(model.layers[0].attn.wk)
    assert fuse_projections(model) == 2 * len(model.layers) - 1
    assert model.layers[0].attn.wqkv is None and isinstance(model.layers[0].attn.wk, Int8Linear)
    assert model.layers[0].ffn.w13 is not None and not hasattr(model.layers[0].ffn, "w1")


@torch.inference_mode()
@pytest.mark.parametrize("quantized", [False, True])
def test_fused_model_gives_the_unfused_logits(tiny_model, quantized):
    model = copy.deepcopy(tiny_model)
    if quantized:
        for layer in model.layers:
            for name in ("wq", "wk", "wv"):
                # one kernel, not measured: "auto" may measure the parts and the wider fused layer onto different
                # few-row kernels (x rounded to bfloat16 or not), which differ by more than this test's 1e-5
                setattr(layer.attn, name, Int4Linear.from_linear(getattr(layer.attn, name), group_size=32, impl="ref"))
    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == 2 * len(model.layers) and fused_count(fused) == 2 * len(model.layers)
    assert fuse_projections(fused) == 0                                             # fused once only
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fused(ids), model(ids), atol=1e-5, rtol=1e-5)
    c1, c2 = StaticCache(model.config, 2, 32), StaticCache(model.config, 2, 32)     # the cached path too
    for chunk in (ids[:, :7], ids[:, 7:8], ids[:, 8:]):
        torch.testing.assert_close(fused(chunk, cache=c1), model(chunk, cache=c2), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(available(torch.bfloat16) is not None, reason="oneDNN cannot prepack bfloat16 here")
@torch.inference_mode()
def test_prepacked_parts_fuse_into_a_prepacked_linear():
    linears = [PackedLinear.from_linear(m) for m in (p.bfloat16() for p in parts())]
    fused = fuse_linears(linears)
    assert type(fused) is PackedLinear and fused.kernel().startswith("onednn-prepacked") and fused.weight.dtype == torch.bfloat16
    assert not fused.gemv or any(m.gemv for m in linears)             # measured again, never taken unasked
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(fused(x), torch.cat([m(x) for m in linears], -1))


@torch.inference_mode()
def test_compile_decode_fuses_unless_told_not_to(tiny_model):
    fast = compile_decode(copy.deepcopy(tiny_model), widths=(1,))
    assert fast.fused == 2 * len(tiny_model.layers) and "fused projections=4" in repr(fast)
    plain = compile_decode(copy.deepcopy(tiny_model), widths=(1,), fuse=False)
    assert plain.fused == 0 and plain.layers[0].attn.wqkv is None
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(2))
    c1, c2 = StaticCache(tiny_model.config, 1, 64), StaticCache(tiny_model.config, 1, 64)
    fast(ids[:, :5], cache=c1), tiny_model(ids[:, :5], cache=c2)
    torch.testing.assert_close(fast(ids[:, 5:], cache=c1), tiny_model(ids[:, 5:], cache=c2), atol=1e-4, rtol=1e-4)
