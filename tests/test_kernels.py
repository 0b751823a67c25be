"""Chapter 7: every Triton kernel == its torch reference (and an outside one), on the CPU interpreter
here and in float16/bfloat16 on a GPU (tests marked `gpu`); the model with use_kernels("triton") ==
the PyTorch model.

The interpreter runs each program of the grid in numpy, one after another, paying per operation
rather than per element: shapes are small or blocks large so the file stays fast.
"""
import kernels  # noqa: F401, I001  first: chooses the interpreter before anything imports triton

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from kernels import interpreting, kernel_device
from kernels.flash_attention import attention_ref, flash_attention
from kernels.int4_matvec import dequantize_int4_ref, int4_matvec, int4_matvec_ref, random_int4_weight
from kernels.matmul import matmul, matmul_ref
from kernels.swap import use_kernels
from kernels.rmsnorm import rmsnorm, rmsnorm_ref
from kernels.rope import rope, rope_ref
from kernels.softmax import softmax, softmax_ref
from kernels.vector_add import add, add_ref
from minillm.model import Transformer, tiny

DEV = kernel_device()
CUDA = torch.cuda.is_available() and not interpreting()
FEW = settings(max_examples=6, deadline=None)
TOL = {torch.float32: {}, torch.float16: {"atol": 2e-3, "rtol": 2e-3}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


# ---------------------------------------------------------------- each kernel == torch, interpreter
def test_vector_add_1823x781():
    x, y = randn(1823, 781), randn(1823, 781, seed=1)
    torch.testing.assert_close(add(x, y, block=2**16), add_ref(x, y))  # 22 blocks, the last one partial


@FEW
@given(n=st.integers(1, 3000), block=st.sampled_from([16, 128, 1024]))
def test_vector_add_shapes(n, block):
    x, y = randn(n), randn(n, seed=1)
    torch.testing.assert_close(add(x, y, block=block), x + y)


@pytest.mark.parametrize("shape", [(97, 781), (1, 1), (1, 1823), (5, 1)])
def test_softmax_matches_torch(shape):
    x = randn(*shape) * 4
    torch.testing.assert_close(softmax(x), torch.softmax(x, dim=-1))


@FEW
@given(rows=st.integers(1, 4), cols=st.integers(1, 700), block=st.sampled_from([16, 64, 256]))
def test_online_softmax_matches_torch(rows, cols, block):
    x = randn(rows, cols) * 4
    if cols > 1:
        x[0, cols // 2] = -math.inf  # -inf entries are allowed (masked scores), as long as not the whole row
    torch.testing.assert_close(softmax(x, online=True, block=block), softmax_ref(x))


@pytest.mark.parametrize("m,k,n", [(1823, 78, 31), (1, 1, 1), (1, 40, 17), (33, 70, 1)])
def test_matmul_matches_torch(m, k, n):
    a, b = randn(m, k), randn(k, n, seed=1)
    torch.testing.assert_close(matmul(a, b), a @ b, atol=1e-4, rtol=1e-4)


@FEW
@given(m=st.integers(1, 70), k=st.integers(1, 70), n=st.integers(1, 70), transpose=st.booleans())
def test_matmul_shapes_and_strides(m, k, n, transpose):
    a = randn(k, m).T if transpose else randn(m, k)  # a transposed view: strides, not a copy
    b = randn(k, n, seed=1)
    torch.testing.assert_close(matmul(a, b, blocks=(16, 32, 16)), matmul_ref(a, b), atol=1e-4, rtol=1e-4)


def test_matmul_float16():
    a, b = randn(45, 67, dtype=torch.float16), randn(67, 29, dtype=torch.float16, seed=1)
    torch.testing.assert_close(matmul(a, b), matmul_ref(a, b), **TOL[torch.float16])


@pytest.mark.parametrize("rows,dim", [(61, 781), (1, 1), (3, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # float32 math inside
def test_rmsnorm_with_residual(rows, dim, dtype):
    x, r, w = randn(rows, dim, dtype=dtype), randn(rows, dim, dtype=dtype, seed=1), randn(dim, dtype=dtype, seed=2)
    y, h = rmsnorm(x, w, 1e-5, residual=r)
    y_ref, h_ref = rmsnorm_ref(x, w, 1e-5, residual=r)
    torch.testing.assert_close(h, h_ref, **TOL[dtype])
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(rmsnorm(x, w, 1e-5), rmsnorm_ref(x, w, 1e-5), **TOL[dtype])


def test_rmsnorm_equals_hf_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(576, eps=1e-5)
    hf.weight.data = randn(576, seed=3)
    x = randn(2, 7, 576)
    torch.testing.assert_close(rmsnorm(x, hf.weight.data, 1e-5), hf(x).detach())


@FEW
@given(b=st.integers(1, 2), h=st.integers(1, 3), t=st.integers(1, 40), half=st.integers(1, 20),
       seed=st.integers(0, 100))
def test_rope_matches_model(b, h, t, half, seed):
    x = randn(b, t, h, 2 * half, seed=seed).transpose(1, 2)  # (B, h, T, d) with the projection's strides
    positions = torch.randint(0, 8192, (b, t), generator=torch.Generator().manual_seed(seed)).to(DEV)
    torch.testing.assert_close(rope(x, positions, 100000.0), rope_ref(x, positions, 100000.0), atol=2e-5, rtol=2e-5)


def test_rope_equals_hf_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from minillm.model import rope_cos_sin

    q, k = randn(1, 3, 17, 64), randn(1, 3, 17, 64, seed=1)
    positions = torch.arange(100, 117, device=DEV)[None]
    cos, sin = rope_cos_sin(positions, 64, 10000.0)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos[:, 0], sin[:, 0])
    torch.testing.assert_close(rope(q, positions, 10000.0), q_hf, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(rope(k, positions, 10000.0), k_hf, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_gqa_vs_sdpa(causal):
    B, H, H_kv, T, S, d = 2, 6, 2, 37, 101, 24  # neither T nor S a multiple of the block
    q, k, v = randn(B, T, H, d).transpose(1, 2), randn(B, H_kv, S, d, seed=1), randn(B, H_kv, S, d, seed=2)
    mask = torch.ones(T, S, dtype=torch.bool, device=DEV).tril(S - T) if causal else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(flash_attention(q, k, v, causal=causal, blocks=(16, 32)), expected)
    torch.testing.assert_close(flash_attention(q, k, v, causal=causal), attention_ref(q, k, v, causal=causal))


@FEW
@given(t=st.integers(1, 40), s_extra=st.integers(0, 40), groups=st.sampled_from([1, 3]), d=st.sampled_from([8, 20]),
       density=st.floats(0.0, 1.0), causal=st.booleans(), seed=st.integers(0, 100))
def test_flash_attention_random_masks(t, s_extra, groups, d, density, causal, seed):
    S = t + s_extra
    q, k, v = randn(1, groups, t, d, seed=seed), randn(1, 1, S, d, seed=seed + 1), randn(1, 1, S, d, seed=seed + 2)
    mask = (torch.rand(1, 1, t, S, generator=torch.Generator().manual_seed(seed)) < density).to(DEV)
    out = flash_attention(q, k, v, mask=mask, causal=causal, blocks=(16, 16))
    torch.testing.assert_close(out, attention_ref(q, k, v, mask=mask, causal=causal))  # empty rows -> 0 in both


def test_flash_attention_tree_mask():
    """Chapter 6's tree verification mask (prefix visible, then ancestors only) through the kernel."""
    parents = [-1, 0, 0, 1, 1, 2, 3, 0, 7, 8]
    prefix, N = 13, len(parents)
    tree = torch.eye(N, dtype=torch.bool)
    for i in range(1, N):
        tree[i] |= tree[parents[i]]
    mask = torch.cat([torch.ones(N, prefix, dtype=torch.bool), tree], dim=1)[None, None].to(DEV)  # (1, 1, N, S)
    q, k, v = randn(1, 4, N, 16), randn(1, 2, prefix + N, 16, seed=1), randn(1, 2, prefix + N, 16, seed=2)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(flash_attention(q, k, v, mask=mask), expected)


@pytest.mark.parametrize("n,k,g,m", [(1823, 784, 16, 1), (1, 32, 32, 1), (67, 96, 32, 3), (5, 2, 2, 1)])
def test_int4_matvec_matches_reference(n, k, g, m):
    packed, scales, offsets = random_int4_weight(n, k, g, device=DEV, generator=torch.Generator().manual_seed(0))
    x = randn(m, k)
    torch.testing.assert_close(int4_matvec(x, packed, scales, offsets, g), int4_matvec_ref(x, packed, scales, offsets, g),
                               atol=1e-4, rtol=1e-4)


def test_int4_matvec_equals_quant_chapter():
    """The layout agrees with minillm.quant (the chapter that defines it): Int4Linear's own forward."""
    quant = pytest.importorskip("minillm.quant")
    linear = torch.nn.Linear(256, 96, bias=False)
    torch.nn.init.normal_(linear.weight, generator=torch.Generator().manual_seed(0))
    q4 = quant.Int4Linear.from_linear(linear, group_size=32, symmetric=False).to(DEV)
    torch.testing.assert_close(dequantize_int4_ref(q4.packed, q4.scales, q4.offsets, 32), q4.dequantize())
    x = randn(1, 256)
    torch.testing.assert_close(int4_matvec(x, q4.packed, q4.scales, q4.offsets, 32), q4.forward_ref(x),
                               atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- bad input -> a clear ValueError
@pytest.mark.parametrize("call,message", [
    (lambda: add(randn(3), randn(4)), "must match"),
    (lambda: softmax(randn(4, 6).T), "contiguous"),
    (lambda: softmax(randn(3, 5), online=True, block=24), "power of two"),
    (lambda: matmul(randn(3, 4), randn(5, 2)), "inner dimensions"),
    (lambda: matmul(randn(3, 4, dtype=torch.float16), randn(4, 2)), "same dtype"),
    (lambda: rmsnorm(randn(3, 8), randn(7), 1e-5), "weight must have shape"),
    (lambda: rope(randn(1, 2, 3, 5), torch.zeros(1, 3, dtype=torch.long, device=DEV), 1e4), "even"),
    (lambda: flash_attention(randn(1, 3, 4, 8), randn(1, 2, 4, 8), randn(1, 2, 4, 8)), "must divide"),
    (lambda: flash_attention(randn(1, 2, 4, 8), randn(1, 2, 5, 8), randn(1, 2, 5, 8),
                             mask=torch.ones(1, 1, 4, 4, dtype=torch.bool, device=DEV)), "mask must have shape"),
    (lambda: int4_matvec(randn(1, 30), *random_int4_weight(4, 32, 16, device=DEV), 16), "K=32"),
    (lambda: int4_matvec(randn(1, 32), *random_int4_weight(4, 32, 16, device=DEV), 12), "group_size"),
    (lambda: add([1.0], [2.0]), "torch.Tensor"),
])
def test_bad_input_raises_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.skipif(not interpreting(), reason="the interpreter's bfloat16 limitation")
def test_interpreter_refuses_bfloat16_dots():
    with pytest.raises(ValueError, match="bfloat16"):
        matmul(randn(16, 16, dtype=torch.bfloat16), randn(16, 16, dtype=torch.bfloat16))


# ---------------------------------------------------------------- the model through the kernels
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Transformer(tiny(n_layers=2)).to(DEV).eval()


@torch.no_grad()
def test_use_kernels_tiny_model_same_logits_and_tokens(tiny_model):
    from minillm.decoding import generate

    ids = torch.randint(0, 512, (1, 11), generator=torch.Generator().manual_seed(1)).to(DEV)
    expected_logits = tiny_model(ids)
    expected = generate(tiny_model, ids, 4, eos_token_id=None)
    try:
        use_kernels(tiny_model, "triton")
        assert tiny_model.kernels == "triton" and tiny_model.norm.norm_fn is not None
        torch.testing.assert_close(tiny_model(ids), expected_logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(generate(tiny_model, ids, 4, eos_token_id=None), expected)  # KV cache + padding mask
    finally:
        use_kernels(tiny_model, "torch")
    assert tiny_model.kernels == "torch" and tiny_model.norm.norm_fn is None
    assert tiny_model.layers[0].attn.attn_fn.__name__ == "attention_sdpa"


@torch.no_grad()
def test_use_kernels_int4_decode(tiny_model):
    quant = pytest.importorskip("minillm.quant")
    import copy

    model = quant.set_impl(quant.quantize(copy.deepcopy(tiny_model), "int4", group_size=32), "ref")
    ids = torch.randint(0, 512, (1, 1), generator=torch.Generator().manual_seed(2)).to(DEV)  # one token: decode
    expected = model(ids)
    use_kernels(model, "triton")
    assert model.layers[0].ffn.w1.matvec_fn is not None
    torch.testing.assert_close(model(ids), expected, atol=1e-4, rtol=1e-4)


def test_use_kernels_falls_back_with_a_message():
    with torch.device("meta"):
        model = Transformer(tiny(n_layers=1))
    with pytest.warns(RuntimeWarning, match="keeping the PyTorch kernels"):
        use_kernels(model, "triton")
    assert model.kernels == "torch" and model.layers[0].attn.attn_fn.__name__ == "attention_sdpa"
    with pytest.raises(ValueError, match="'triton' or 'torch'"):
        use_kernels(model, "cuda")


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="on a GPU, test_gpu_smollm2_64_tokens_identical runs instead")
@torch.no_grad()
def test_smollm2_tokens_identical_interpreter(smollm2):
    """The real model, 2 greedy tokens through the kernels on the interpreter (the GPU test does 64)."""
    from minillm.decoding import generate

    model, tok = smollm2
    ids = torch.tensor([tok.encode("The capital of France is")])
    expected = generate(model, ids, 2, eos_token_id=None)
    try:
        use_kernels(model, "triton")
        assert torch.equal(generate(model, ids, 2, eos_token_id=None), expected)
    finally:
        use_kernels(model, "torch")


# ---------------------------------------------------------------- benchmark plumbing and roofline (no GPU needed)
def test_roofline_and_benchmarks_file(tmp_path):
    from kernels import bench

    spec = bench.DEVICE_SPECS["H100 SXM"]
    assert bench.roofline(spec, 1.0) == spec["bandwidth"]           # memory-bound: intensity x bandwidth
    assert bench.roofline(spec, 1e6) == spec["bf16"]                # compute-bound: the peak
    assert bench.spec_for("NVIDIA H100 80GB HBM3")[0] == "H100 SXM" and bench.spec_for("NVIDIA L40S") is None
    intensity = {k: w["flops"] / w["bytes"] for k, w in bench.workloads().items()}
    assert intensity["matmul"] == pytest.approx(4096 / 3) and intensity["int4_matvec"] < 4
    if not CUDA:  # the committed file records no GPU run, and the runner refuses to time the interpreter
        assert bench.read_results() == [] and bench.main([]) == 2
    header = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-01-01", "torch": "2.13", "triton": "3.9", "cuda": "12.8",
              "spec": "H100 SXM", "copy_gbs": 3000.0}
    row = {"kernel": "softmax", "shape": "4096x4096", "dtype": "float16", "triton_ms": 0.05, "torch_ms": 0.06,
           "ratio": 1.2, "triton_gbs": 1342.2, "torch_gbs": 1118.5, "aim": ">= 1.0x"}
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(bench.BENCHMARKS_MD.read_text())
    bench.write_results(bench.to_markdown(header, [row]), path)
    (got,) = bench.read_results(path)
    assert (got["kernel"], got["ratio"], got["achieved"], got["unit"]) == ("softmax", 1.2, 1342.2, "GB/s")
    assert bench.recorded_spec(path) == "H100 SXM"
    ((name, intensity, flops),) = bench.measured_points([got])
    assert name == "softmax" and flops == pytest.approx(1342.2e9 * intensity)


# ---------------------------------------------------------------- on a GPU: 16-bit dtypes, the real model
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (not the interpreter)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_kernels_16bit(dtype):
    x, y = randn(1823, 781, dtype=dtype), randn(1823, 781, dtype=dtype, seed=1)
    torch.testing.assert_close(add(x, y), x + y)
    torch.testing.assert_close(softmax(x), softmax_ref(x), **TOL[dtype])
    torch.testing.assert_close(softmax(x, online=True, block=128), softmax_ref(x), **TOL[dtype])
    a, b = randn(1823, 781, dtype=dtype), randn(781, 517, dtype=dtype, seed=1)
    torch.testing.assert_close(matmul(a, b), matmul_ref(a, b), atol=5e-2, rtol=2e-2)
    w = randn(781, dtype=dtype, seed=2)
    y_k, h_k = rmsnorm(x, w, 1e-5, residual=y)
    y_r, h_r = rmsnorm_ref(x, w, 1e-5, residual=y)
    torch.testing.assert_close(h_k, h_r, **TOL[dtype])
    torch.testing.assert_close(y_k, y_r, **TOL[dtype])
    q = randn(2, 300, 8, 64, dtype=dtype).transpose(1, 2)
    positions = torch.arange(300, device=DEV).expand(2, 300)
    torch.testing.assert_close(rope(q, positions, 1e4), rope_ref(q, positions, 1e4), **TOL[dtype])
    k, v = randn(2, 2, 1000, 64, dtype=dtype, seed=1), randn(2, 2, 1000, 64, dtype=dtype, seed=2)
    for causal in (False, True):  # p is rounded to the 16-bit dtype before the second dot
        torch.testing.assert_close(flash_attention(q, k, v, causal=causal), attention_ref(q, k, v, causal=causal),
                                   atol=1e-2 if dtype == torch.float16 else 4e-2, rtol=1e-2)
    packed, scales, offsets = random_int4_weight(1823, 768, 128, device=DEV)
    x1 = randn(1, 768, dtype=dtype)
    torch.testing.assert_close(int4_matvec(x1, packed, scales, offsets, 128),
                               int4_matvec_ref(x1, packed, scales, offsets, 128), atol=5e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (not the interpreter)")
@torch.no_grad()
def test_gpu_smollm2_64_tokens_identical(smollm2):
    from minillm.decoding import generate

    model, tok = smollm2
    model = model.to("cuda")
    ids = torch.tensor([tok.encode("Once upon a time, in a small village,")], device="cuda")
    expected = generate(model, ids, 64, eos_token_id=None)
    try:
        use_kernels(model, "triton")
        assert model.kernels == "triton"
        assert torch.equal(generate(model, ids, 64, eos_token_id=None), expected)
    finally:
        use_kernels(model, "torch")
        model.to("cpu")


def test_tensor_traffic_counts_reads_and_writes_of_eager_ops_not_views():
    from kernels.traffic import tensor_traffic

    x, y = torch.randn(4, 8), torch.randn(4, 8)
    assert tensor_traffic(lambda: x + y, x.numel()) == (3.0, ["add"])               # two reads, one write
    # transpose and reshape are views: only mul (read, write) and sum (read, write one of 32 elements) move data
    assert tensor_traffic(lambda: (x.t().reshape(8, 4) * 2).sum(), x.numel()) == (2 + 1 + 1 / 32, ["mul", "sum"])
