"""cpu_gemv's few-row kernels against their references, each row the same whatever the width, the errors they give, and how the linears use them."""
import pytest
import torch

from minillm.native import gemv as cpu_gemv
from minillm.backends.prepack import PackedLinear
from minillm.backends.prepack import available as prepack_available
from minillm.quant.formats import Int4Linear, Int8Linear, QuantLinear

needs_gemv = pytest.mark.skipif(cpu_gemv.available() is not None, reason=str(cpu_gemv.available()))
DTYPES = (torch.float32, torch.bfloat16)


def _close(got, want, dtype):
    """float32 activations: float32 rounding (sums in another order); bfloat16: the output's own rounding."""
    scale = want.float().abs().max()
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    return (got.float() - want.float()).abs().max() <= tol * scale


def _int4(N, K, group_size, symmetric, seed):
    torch.manual_seed(seed)
    m = Int4Linear.from_linear(torch.nn.Linear(K, N, bias=False), group_size=group_size, symmetric=symmetric, impl="ref")
    return m, m.scales.float(), m.offsets.float()


@needs_gemv
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,rows", [(7, 64, 1), (9, 576, 5), (130, 1536, 16)])
def test_bf16_and_int8_kernels_agree_with_their_references(dtype, N, K, rows):
    g = torch.Generator().manual_seed(N)
    x = torch.randn(1, rows, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).bfloat16()
    got = cpu_gemv.gemv_bf16(x, w)
    assert got.shape == (1, rows, N) and got.dtype == dtype and _close(got, cpu_gemv.gemv_bf16_ref(x, w), dtype)
    wide = torch.randn(N, K + 32, generator=g).bfloat16()          # rows further apart than K: a view's stride
    assert _close(cpu_gemv.gemv_bf16(x, wide[:, :K]), cpu_gemv.gemv_bf16_ref(x, wide[:, :K]), dtype)
    q = Int8Linear.from_linear(torch.nn.Linear(K, N, bias=False), impl="ref")
    got = cpu_gemv.gemv_int8(x, q.weight, q.scales)
    assert _close(got, cpu_gemv.gemv_int8_ref(x, q.weight, q.scales), dtype)
    assert _close(got, (x.float() @ q.dequantize().t()).to(dtype), dtype)         # the format's own dequantize


@needs_gemv
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,symmetric", [(32, False), (64, True), (64, False), (128, True)])
@pytest.mark.parametrize("N,K,rows", [(5, 128, 1), (576, 1536, 1), (3, 768, 6), (130, 256, 16)])
def test_int4_kernel_agrees_with_its_reference_and_the_formats_dequantize(dtype, group_size, symmetric, N, K, rows):
    m, scales, offsets = _int4(N, K, group_size, symmetric, seed=N + K)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(K)).to(dtype)
    ref = cpu_gemv.gemv_int4_ref(x, m.packed, scales, offsets, group_size)
    assert torch.equal(ref, (x.bfloat16().float() @ m.dequantize().t()).to(dtype))  # the reference is the format's
    got = cpu_gemv.gemv_int4(x, m.packed, scales, offsets, group_size)
    assert got.shape == (rows, N) and got.dtype == dtype and _close(got, ref, dtype)


@needs_gemv
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_row_of_a_wide_call_is_bit_equal_to_that_row_alone(dtype):
    """What makes a verify step (k rows) and a decode step (1 row) give the same numbers: every (weight row, input
    row) pair is summed by the same instructions in the same order whatever the width."""
    g = torch.Generator().manual_seed(7)
    N, K = 37, 256                                  # 37: a short last block of weight rows
    w = torch.randn(N, K, generator=g).bfloat16()
    q = Int8Linear.from_linear(torch.nn.Linear(K, N, bias=False), impl="ref")
    calls = {"bf16": lambda x: cpu_gemv.gemv_bf16(x, w), "int8": lambda x: cpu_gemv.gemv_int8(x, q.weight, q.scales)}
    for group_size in (32, 64, 128):
        m, scales, offsets = _int4(N, K, group_size, False, seed=group_size)
        calls[f"int4 g{group_size}"] = lambda x, m=m, s=scales, o=offsets, gs=group_size: cpu_gemv.gemv_int4(x, m.packed, s, o, gs)
    for rows in (2, 3, 4, 5, 8, 13, 16):
        x = torch.randn(rows, K, generator=g).to(dtype)
        for name, call in calls.items():
            wide = call(x)
            assert all(torch.equal(wide[i], call(x[i:i + 1])[0]) for i in range(rows)), (name, rows)
    assert cpu_gemv.gemv_bf16(torch.randn(0, K), w).shape == (0, N)          # no rows: an empty answer


@needs_gemv
def test_bad_inputs_get_one_line_errors_naming_the_problem():
    m, scales, offsets = _int4(8, 128, 64, True, seed=0)
    x = torch.randn(1, 128)
    with pytest.raises(RuntimeError, match="takes activations \\(..., 128\\), got shape \\[2, 96\\]"):
        cpu_gemv.gemv_int4(torch.randn(2, 96), m.packed, scales, offsets, 64)
    with pytest.raises(RuntimeError, match="group size of 32 or a multiple of 64"):
        cpu_gemv.gemv_int4(x, m.packed, scales, offsets, 48)
    with pytest.raises(RuntimeError, match="float32 scales and offsets"):
        cpu_gemv.gemv_int4(x, m.packed, m.scales, m.offsets, 64)                 # float16, as stored
    with pytest.raises(RuntimeError, match="float32 or bfloat16 activations"):
        cpu_gemv.gemv_bf16(x.half(), torch.zeros(4, 128, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bfloat16 weight"):
        cpu_gemv.gemv_bf16(x, torch.zeros(4, 128))
    with pytest.raises(RuntimeError, match="in a multiple of 32"):
        cpu_gemv.gemv_int8(torch.randn(1, 40), torch.zeros(4, 40, dtype=torch.int8), torch.ones(4))
    with pytest.raises(RuntimeError, match="float32 scales \\(out,\\)"):
        cpu_gemv.gemv_int8(x, torch.zeros(4, 128, dtype=torch.int8), torch.ones(5))
    with pytest.raises(RuntimeError) as raised:
        cpu_gemv.gemv_int4(torch.randn(2, 96), m.packed, scales, offsets, 64)
    assert len(str(raised.value).strip().splitlines()) == 1


@needs_gemv
@torch.inference_mode()
def test_the_ops_run_inside_a_compiled_graph():
    m, scales, offsets = _int4(64, 128, 64, True, seed=3)
    w = torch.randn(32, 128).bfloat16()

    def step(x):
        h = torch.nn.functional.silu(cpu_gemv.gemv_bf16(x, w))          # (1, 32)
        return cpu_gemv.gemv_int4(torch.cat([h, h, h, h], -1), m.packed, scales, offsets, 64) * 2

    x = torch.randn(1, 128).bfloat16()
    compiled = torch.compile(step, dynamic=False)
    assert torch.equal(compiled(x), step(x))


@needs_gemv
@torch.inference_mode()
def test_quantized_linears_run_a_few_rows_on_the_kernel_and_wider_inputs_as_before():
    m, _, _ = _int4(96, 128, 64, True, seed=4)
    m.set_impl("packed", gemv="gemv")
    assert m.gemv_rows == cpu_gemv.MAX_ROWS == 16 and "1-16 rows: gemv" in repr(m)
    x = torch.randn(1, 128)
    assert _close(m(x), m.forward_ref(x.bfloat16().float()), torch.float32)     # the kernel rounds x to bfloat16
    assert torch.equal(m(x), m.forward_gemv(x)) and not torch.equal(m(x), m.forward_packed(x))
    x16 = torch.randn(16, 128)
    assert torch.equal(m(x16), m.forward_gemv(x16))
    x17 = torch.randn(17, 128)
    assert torch.equal(m(x17), m.forward_packed(x17))                  # wider: the packed kernel, as before
    q = Int8Linear.from_linear(torch.nn.Linear(128, 40, bias=False), impl="packed").set_impl("packed", gemv=True)
    assert _close(q(x), q.forward_ref(x), torch.float32) and q.gemv_plan[0][1] in cpu_gemv.KERNELS
    m.set_impl("packed")                                              # an explicit impl, no gemv unless asked
    assert not m.gemv and "gemv" not in m.kernel()
    m.set_impl("auto")                                                # auto: measured, and the timings kept
    key = ("Int4Linear", 96, 128, 64, m.impl, torch.get_num_threads())
    from minillm.quant.formats import GEMV_CHOICES
    plan, times = GEMV_CHOICES[key]
    assert plan == m.gemv_plan and m.gemv_rows in (0, *times) and set(times) <= set(cpu_gemv.WIDTHS)
    names = {"gemv", "tiles"} if cpu_gemv.tiles_available() is None else {"gemv"}     # both measured where both run
    assert all(set(t) == names | {"kernel"} for t in times.values())
    widths = list(times)
    assert widths == list(cpu_gemv.WIDTHS[:len(widths)])              # measured in order, up to where none paid
    for w in widths[:len(widths) - (m.gemv_rows < widths[-1])]:       # the plan's kernel: the fastest, and paying
        kernel = cpu_gemv.kernel_for(plan, w)
        assert times[w][kernel] == min(times[w][n] for n in names)
        assert times[w][kernel] <= (1 + cpu_gemv.TOLERANCE) * times[w]["kernel"]


def test_choose_plans_the_fastest_kernel_at_each_width_while_one_pays():
    import time
    slow, fast = lambda x: time.sleep(5e-3), lambda x: time.sleep(1e-3)
    grows = lambda x: time.sleep(1e-3 * x)                          # 1 ms a row: pays up to 4 rows against 5 ms
    plan, times = cpu_gemv.choose({"gemv": grows}, "kernel", slow, lambda r: r)
    assert plan == ((4, "gemv"),) and list(times) == [1, 2, 4, 8]  # 8 ms lost to 5: no wider width measured
    two = lambda x: time.sleep(1.5e-3)                             # faster than 1 ms a row from 2 rows
    assert cpu_gemv.choose({"gemv": grows, "tiles": two}, "kernel", slow, lambda r: r)[0] == ((1, "gemv"), (16, "tiles"))
    assert cpu_gemv.choose({"gemv": slow, "tiles": slow}, "kernel", fast, lambda r: r)[0] == ()
    assert cpu_gemv.fastest({"gemv": slow, "tiles": fast}, lambda r: r)[0] == "tiles"
    assert [cpu_gemv.describe(p) for p in ((), ((1, "gemv"),), ((16, "gemv"),), ((1, "gemv"), (8, "tiles")))] == \
        ["", ", 1 row: gemv", ", 1-16 rows: gemv", ", 1 row: gemv, 2-8 rows: tiles"]
    assert [cpu_gemv.kernel_for(((1, "gemv"), (8, "tiles")), r) for r in (1, 3, 8, 9)] == ["gemv", "tiles", "tiles", None]


def test_gemv_true_where_the_kernel_cannot_take_the_layer_is_refused():
    m, _, _ = _int4(20, 96, 32, False, seed=5)          # in_features 96: not a multiple of 64; out 20: not of 16
    with pytest.raises(ValueError, match="multiple of 64"):
        m.set_impl("ref", gemv=True)
    with pytest.raises(ValueError, match="multiple of 64") as e:
        m.set_impl("ref", gemv="gemv")
    assert "tile" not in str(e.value)                                # only the reason of the kernel asked for
    with pytest.raises(ValueError, match="gemv must be"):
        m.set_impl("ref", gemv="yes")
    assert isinstance(m, QuantLinear) and not m.set_impl("auto").gemv      # auto never picks what cannot run


@needs_gemv
@pytest.mark.skipif(prepack_available(torch.bfloat16) is not None, reason=str(prepack_available(torch.bfloat16)))
@torch.inference_mode()
def test_a_prepacked_bfloat16_linear_runs_a_few_rows_on_the_kernel():
    torch.manual_seed(6)
    linear = torch.nn.Linear(64, 96, bias=False).bfloat16()
    packed = PackedLinear.from_linear(linear, gemv="gemv")
    assert packed.gemv and packed.kernel() == "onednn-prepacked, 1-16 rows: gemv"
    for rows in (1, 8):
        x = torch.randn(rows, 64).bfloat16()
        assert torch.equal(packed(x), cpu_gemv.gemv_bf16(x, linear.weight))
        assert _close(packed(x), packed.forward_ref(x), torch.bfloat16)
    x17 = torch.randn(17, 64).bfloat16()
    assert torch.equal(packed(x17), packed.forward_ref(x17))          # wider: the prepacked copy, same bits
    with torch.no_grad():
        packed.weight.mul_(2)                                         # changed in place: the kernel reads it as it is
    assert _close(packed(x), packed.forward_ref(x), torch.bfloat16)
    packed.weight = torch.nn.Parameter(packed.weight.t().contiguous().t(), requires_grad=False)   # rows not contiguous
    assert torch.equal(packed(x), packed.forward_ref(x))              # F.linear, not the kernel
    assert not PackedLinear.from_linear(linear.float(), gemv=True).gemv  # float32 weights: not the kernels'
    with pytest.raises(ValueError, match="gemv must be"):
        PackedLinear.from_linear(linear, gemv="fast")
