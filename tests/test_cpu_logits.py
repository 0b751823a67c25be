"""The argmax / top-k kernel (native/logits.py, csrc/rows.cpp) against PyTorch's argmax, topk and logsumexp."""
import pytest
import torch

from minillm.native import build as native
from minillm.native.logits import argmax, argmax_ref, available, topk_lse, topk_lse_ref

pytestmark = pytest.mark.skipif(available() is not None, reason=f"no logits kernel here: {available()}")


def logits(shape, dtype, seed=0, ties=True):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    if ties:                     # the same largest value twice in every row, far apart: the first must win
        V = shape[-1]
        x[..., V // 3] = x[..., 2 * V // 3] = 40.0
        x[..., 5] = x[..., 6] = 30.0             # and a tie inside the top 8
    return x


def assert_same_top(x, k):
    values, indices, lse = topk_lse(x, k)
    ref_values, _, ref_lse = topk_lse_ref(x, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.long
    assert torch.equal(values, ref_values)                                # exact: bfloat16 -> float32 is
    assert torch.equal(x.float().gather(-1, indices), ref_values)         # indices of those values...
    assert all(len(set(row)) == k for row in indices.reshape(-1, k).tolist())   # ...each once
    torch.testing.assert_close(lse, ref_lse, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(49152,), (1, 49152), (8, 49152), (2, 3, 1000), (4, 10), (3, 300)])
def test_argmax_is_torch_argmax_first_index_on_ties(dtype, shape):
    x = logits(shape, dtype)
    assert torch.equal(argmax(x), argmax_ref(x))
    assert torch.equal(argmax(x), torch.full(shape[:-1], shape[-1] // 3)) or shape[-1] < 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,k", [((8, 49152), 8), ((1, 49152), 1), ((5, 1000), 8), ((2, 300), 64),
                                     ((3, 10), 10), ((2, 700), 3)])
def test_topk_and_logsumexp_match_pytorch(dtype, shape, k):
    assert_same_top(logits(shape, dtype, seed=k), k)


def test_rows_of_a_wider_tensor_and_special_values():
    x = logits((2, 4, 3000), torch.bfloat16)
    last = x[:, -1]                                       # rows 4 x 3000 apart, as decoding slices them
    assert not last.is_contiguous() and torch.equal(argmax(last), argmax_ref(last))
    assert_same_top(last, 8)
    x = logits((4, 3000), torch.float32, ties=False)
    x[0] = float("-inf")                                  # a row with nothing allowed
    x[1, 17] = float("inf")
    x[2, :100] = float("-inf")
    assert torch.equal(argmax(x), argmax_ref(x))
    values, indices, lse = topk_lse(x, 4)
    ref = topk_lse_ref(x, 4)
    assert torch.equal(values, ref[0]) and torch.equal(lse[:2], ref[2][:2]) and lse[0] == float("-inf")
    torch.testing.assert_close(lse[2:], ref[2][2:])


def test_where_the_kernel_cannot_serve_pytorch_answers():
    x = logits((3, 2000), torch.float32)
    x[1, 50] = float("nan")                               # NaN is the largest for torch.argmax
    assert argmax(x).tolist() == argmax_ref(x).tolist() == [2000 // 3, 50, 2000 // 3]
    for y in (logits((2, 500), torch.float16), logits((2, 500), torch.float32).requires_grad_()):
        assert torch.equal(argmax(y), argmax_ref(y))
    values, indices, _ = topk_lse(logits((2, 500), torch.float32), 65)    # above the kernel's 64
    assert torch.equal(values, topk_lse_ref(logits((2, 500), torch.float32), 65)[0])
    assert topk_lse(logits((2, 500), torch.float32), 3, lse=False)[2] is None
    for bad in (0, 501, 2.0, True):
        with pytest.raises(ValueError, match="k must be an int in \\[1, 500\\]"):
            topk_lse(logits((2, 500), torch.float32), bad)


def test_without_a_compiler_pytorch_answers(monkeypatch):
    monkeypatch.setattr(native, "find_compiler", lambda: None)
    monkeypatch.setattr(native, "_LOADED", {})
    assert available() == "no C++ compiler found ($CXX, g++ or clang++) to build the rows kernel"
    x = logits((8, 4000), torch.bfloat16)
    assert torch.equal(argmax(x), argmax_ref(x))
    assert torch.equal(topk_lse(x, 8)[0], topk_lse_ref(x, 8)[0])


def test_a_library_is_loaded_once_and_a_failure_remembered(monkeypatch):
    monkeypatch.setattr(native, "_LOADED", {})
    calls = []
    real = native.build_library
    monkeypatch.setattr(native, "build_library", lambda *a: calls.append(a) or real(*a))
    assert native.load("rows.cpp") is native.load("rows.cpp") and len(calls) == 1
    with monkeypatch.context() as m:
        m.setattr(native, "find_compiler", lambda: None)
        for _ in range(2):
            with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found"):
                native.load("rows.cpp", {"X": 1})
    assert len(calls) == 2                               # the failure is not retried

    def refuse(lib):
        raise RuntimeError("wrong build")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="wrong build"):
            native.load("rows.cpp", {"Y": 1}, setup=refuse)
