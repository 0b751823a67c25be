"""cpu_step's native step (csrc/step.cpp): every block in one C++ call gives the eager model's logits (same kernels,
float rounding apart), a token the same logits at every width, plain, speculative and tree decoding the same tokens,
runs eager whatever it cannot take, and says why where it cannot run at all. On tiny configs, so CI stays fast."""
import copy

import pytest
import torch

from minillm.native import gemv as cpu_gemv
from minillm.backends import native_step as cpu_step
from minillm.backends.native_step import native_decode
from minillm.decoding import decode, generate
from minillm.cache.kv_cache import ConcatCache, StaticCache
from minillm.model import Transformer, tiny
from minillm.quant import quantize

needs_step = pytest.mark.skipif(cpu_step.available(16) is not None, reason=str(cpu_step.available(16)))
CONFIG = tiny(hidden_dim=192)          # every width a multiple of 64: int4's gemv takes it
# (name, dtype, quantize options): a bfloat16 model, and float32 ones whose linears are quantized
MODELS = [("bf16", torch.bfloat16, dict(method="none")),
          ("int8 + int8 head", torch.float32, dict(method="int8", head="int8")),
          ("int4 g32 asym", torch.float32, dict(method="int4", group_size=32, symmetric=False)),
          ("bf16 int4 g64 + int8 head", torch.bfloat16, dict(method="int4", group_size=64, head="int8"))]


def _model(dtype, options, seed=0):
    torch.manual_seed(seed)
    return quantize(Transformer(CONFIG).eval().to(dtype), **options)


def _ids(n, seed):
    return torch.randint(0, CONFIG.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


@needs_step
@pytest.mark.parametrize("name,dtype,options", MODELS, ids=[m[0] for m in MODELS])
@torch.inference_mode()
def test_native_steps_give_the_eager_models_logits(name, dtype, options):
    """The eager model on the same kernels (the wrapped model, copied) against the native step, over steps of
    several widths. Not bit-equal: the norms, attention and SwiGLU sum in another order, and the kernels round their
    input to bfloat16, where a float32 ulp apart can land on two bfloat16 values; so equal to a few bfloat16 roundings."""
    fast = native_decode(_model(dtype, options))
    eager = copy.deepcopy(fast.model)
    ids = _ids(24, 1)
    caches = [StaticCache(CONFIG, 1, 64, dtype=dtype) for _ in range(2)]
    start = 0
    for width in (5, 1, 3, 8, 1, 6):
        chunk = ids[:, start:start + width]
        want, got = eager(chunk, cache=caches[0]), fast(chunk, cache=caches[1])
        assert got.shape == want.shape and got.dtype == want.dtype
        tol = 1e-2 if dtype == torch.float32 else 3e-2
        assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max(), (name, width)
        start += width
    assert fast.native_calls == 6 and fast.eager_calls == 0
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):      # the keys and values it wrote
        assert (a.float() - b.float()).abs().max() <= 3e-2 * a.float().abs().max()


@needs_step
@pytest.mark.parametrize("kernel", [True, "gemv", "tiles"])
@torch.inference_mode()
def test_a_token_gets_the_same_logits_at_every_width(kernel):
    """Every row computed from its own inputs alone, on one kernel at every width: 1-row steps and 4- and 3-row
    steps over the same tokens give bit-equal logits and caches."""
    if kernel == "tiles" and cpu_gemv.tiles_available() is not None:
        pytest.skip(cpu_gemv.tiles_available())
    fast = native_decode(_model(torch.bfloat16, dict(method="int4", group_size=32, head="int8")), kernel=kernel)
    assert f"1-16 rows: {'gemv' if kernel == 'gemv' else 'tiles' if kernel == 'tiles' else ''}" in repr(fast)
    ids = _ids(14, 2)
    one, wide = (StaticCache(CONFIG, 1, 64, dtype=torch.bfloat16) for _ in range(2))
    fast(ids[:, :7], cache=one), fast(ids[:, :7], cache=wide)
    rows = torch.cat([fast(ids[:, t:t + 1], cache=one) for t in range(7, 14)], dim=1)
    together = torch.cat([fast(ids[:, 7:11], cache=wide), fast(ids[:, 11:14], cache=wide)], dim=1)
    assert torch.equal(rows, together) and torch.equal(one.k, wide.k) and torch.equal(one.v, wide.v)


@needs_step
def test_plain_speculative_and_tree_decoding_give_the_same_tokens():
    fast = native_decode(_model(torch.bfloat16, dict(method="int4", group_size=64, head="int8"), seed=5))
    ids = _ids(12, 3)
    plain = decode(fast, ids, 24, eos_token_id=None).tokens
    eager = fast.eager_calls
    for drafter in ("ngram", "recycling", "recycling-pairs"):
        assert decode(fast, ids, 24, drafter=drafter, draft_len=6, eos_token_id=None).tokens == plain, drafter
    assert fast.eager_calls == eager                  # prompts of 12 tokens and every verify step ran native
    assert fast.prefill_apart(StaticCache(CONFIG, 1, 8)) and max(fast.widths) == 16


@needs_step
@torch.inference_mode()
def test_what_it_cannot_take_runs_the_eager_model():
    fast = native_decode(_model(torch.float32, dict(method="int8")))
    ids = _ids(40, 4)
    for make, chunk in ((lambda: StaticCache(CONFIG, 2, 64), ids[:, :4].expand(2, 4)),   # a batch of two
                        (lambda: ConcatCache(CONFIG), ids[:, :5]),                        # a growing cache
                        (lambda: StaticCache(CONFIG, 1, 64), ids[:, :17])):              # wider than 16
        calls = fast.eager_calls
        torch.testing.assert_close(fast(chunk, cache=make()), fast.model(chunk, cache=make()))
        assert fast.eager_calls == calls + 1
    assert torch.equal(generate(fast, ids[:, :5], 6, eos_token_id=None, cache="none")[:, :5], ids[:, :5])
    with pytest.raises(ValueError, match="KV cache overflow"):                       # no room: the cache says so
        fast(ids[:, :4], cache=StaticCache(CONFIG, 1, 2))


@needs_step
def test_it_says_why_it_cannot_run():
    model = Transformer(CONFIG).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="native_decode: layer 0: attn.wq: the gemv kernel takes bfloat16"):
        native_decode(model)                                             # float32 linears: no few-row kernel
    assert model.layers[0].attn.wqkv is None and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="mixture of experts"):
        native_decode(Transformer(tiny(n_experts=4, n_experts_active=2)).eval().bfloat16())
    with pytest.raises(ValueError, match="kernel must be"):
        native_decode(_model(torch.bfloat16, dict(method="none")), kernel="fast")
    with pytest.raises(ValueError, match="minillm Transformer"):
        native_decode(torch.nn.Linear(4, 4))
    fast = native_decode(_model(torch.float32, dict(method="int8")))
    assert fast.head.startswith("PyTorch (the gemv kernel takes bfloat16")   # float32 head: F.linear, said so
    with pytest.raises(ValueError, match="positions must lie in"):
        fast(_ids(2, 5), positions=torch.tensor([[3, 999]]), cache=StaticCache(CONFIG, 1, 16))


@needs_step
def test_the_op_checks_its_arguments():
    fast = native_decode(_model(torch.bfloat16, dict(method="int8")))
    tensors, kinds = fast.arguments(2)
    c = fast.config
    cache = StaticCache(c, 1, 16, dtype=torch.bfloat16)
    x = torch.zeros(2, c.dim, dtype=torch.bfloat16)
    cos = sin = torch.zeros(2, c.head_dim)
    mask = torch.ones(2, 2, dtype=torch.bool)
    norm = fast.model.norm.weight.detach()
    op = cpu_step.op(c.head_dim)
    args = [x, tensors, kinds, cache.k, cache.v, 0, mask, cos, sin, norm, c.n_heads, c.n_kv_heads, c.norm_eps]
    op(*args)                                                                   # as given: runs
    for i, bad, match in [(6, torch.ones(2, 3, dtype=torch.bool), "bool mask"),
                          (5, 15, "past the cache"),
                          (0, x.float(), "caches .* in x's dtype"),
                          (2, kinds[:-8], "14 tensors and 8 ints a layer"),
                          (2, [9] + kinds[1:], "unknown kernel 9"),
                          (1, [tensors[0].float()] + tensors[1:], "norm weights"),
                          (1, tensors[:2] + [tensors[2].float()] + tensors[3:], r"layer 0 wqkv: (gemv|tiles)_int8 takes a contiguous Char")]:
        with pytest.raises(RuntimeError, match=match):
            op(*(args[:i] + [bad] + args[i + 1:]))


@needs_step
@torch.inference_mode()
def test_two_head_sizes_run_native_in_one_process():
    """One op per head size (decode_layers_hd<HD>): a model with heads of 16 and one with heads of 32, side by side,
    each as its eager self (loading a second build under one name aborted the interpreter)."""
    for config in (CONFIG, tiny(hidden_dim=192, dim=128)):
        assert config.head_dim in (16, 32)
        torch.manual_seed(0)
        model = Transformer(config).eval().bfloat16()
        eager = copy.deepcopy(model)
        fast = native_decode(model)
        ids = torch.randint(0, config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
        caches = [StaticCache(config, 1, 16, dtype=torch.bfloat16) for _ in range(2)]
        eager(ids[:, :4], cache=caches[0]), fast(ids[:, :4], cache=caches[1])
        want, got = eager(ids[:, 4:], cache=caches[0]), fast(ids[:, 4:], cache=caches[1])
        assert fast.native_calls == 2 and (got - want).abs().max() <= 0.02 * want.abs().max()
        assert hasattr(torch.ops.minillm, f"decode_layers_hd{config.head_dim}")
