"""cpu_gemv's tile kernels (AMX, csrc/tiles.cpp) against the same references as its gemv kernels, each row the same
whatever the width, the tile layout they read, the errors they give, and the linears that run on them. Without AMX
the last test runs them all again on emulated tiles (csrc/amx_emulate.h)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm.native import gemv as cpu_gemv
from minillm.backends.prepack import PackedLinear
from minillm.backends.prepack import available as prepack_available
from minillm.quant.formats import Int4Linear, Int8Linear

needs_tiles = pytest.mark.skipif(cpu_gemv.tiles_available() is not None, reason=str(cpu_gemv.tiles_available()))
DTYPES = (torch.float32, torch.bfloat16)


def _close(got, want, dtype):
    """float32 activations: float32 rounding (sums in another order); bfloat16: the output's own rounding."""
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    return (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()


def _int4(N, K, group_size, symmetric, seed):
    torch.manual_seed(seed)
    m = Int4Linear.from_linear(torch.nn.Linear(K, N, bias=False), group_size=group_size, symmetric=symmetric, impl="ref")
    return m, m.scales.float(), m.offsets.float()


def test_the_tile_layout_puts_each_outputs_pair_of_inputs_in_a_tile_row():
    """Tile (block b, chunk c), row kk, pair n: output 16 b + n, inputs 32 c + 2 kk and + 1 (what TDPBF16PS multiplies)."""
    w = torch.arange(32 * 64, dtype=torch.int32).reshape(32, 64)
    t = cpu_gemv.pack_tiles_bf16(w)
    assert t.shape == (2, 2, 16, 32)
    for b, c, kk, n in [(0, 0, 0, 0), (1, 1, 15, 15), (1, 0, 3, 7), (0, 1, 9, 2)]:
        assert t[b, c, kk, 2 * n].item() == w[16 * b + n, 32 * c + 2 * kk].item()
        assert t[b, c, kk, 2 * n + 1].item() == w[16 * b + n, 32 * c + 2 * kk + 1].item()
    packed = torch.randint(0, 256, (32, 32), dtype=torch.uint8)        # int4: byte j holds inputs 2j, 2j + 1
    q, scales, offsets = cpu_gemv.pack_tiles_int4(packed, torch.rand(32, 2), torch.rand(32, 2))
    assert q.shape == (2, 2, 16, 16) and scales.shape == offsets.shape == (2, 2, 16)
    for b, c, kk, n in [(0, 0, 0, 0), (1, 1, 15, 15), (0, 1, 6, 11)]:     # groups of four rows, 16 outputs x 4 rows
        assert q[b, c].flatten()[64 * (kk // 4) + 4 * n + kk % 4] == packed[16 * b + n, 16 * c + kk]
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_gemv.pack_tiles_bf16(torch.zeros(20, 64))


@needs_tiles
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,rows", [(16, 32, 1), (48, 576, 5), (160, 1536, 16)])
def test_bf16_and_int8_tiles_agree_with_the_references(dtype, N, K, rows):
    g = torch.Generator().manual_seed(N)
    x = torch.randn(1, rows, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).bfloat16()
    got = cpu_gemv.tiles_bf16(x, cpu_gemv.pack_tiles_bf16(w))
    assert got.shape == (1, rows, N) and got.dtype == dtype and _close(got, cpu_gemv.gemv_bf16_ref(x, w), dtype)
    q = Int8Linear.from_linear(torch.nn.Linear(K, N, bias=False), impl="ref")
    got = cpu_gemv.tiles_int8(x, cpu_gemv.pack_tiles_int8(q.weight), q.scales)     # x rounded to bfloat16 (gemv's: not)
    assert _close(got, cpu_gemv.gemv_int8_ref(x.bfloat16().to(dtype), q.weight, q.scales), dtype)


@needs_tiles
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,symmetric", [(32, False), (64, True), (128, False), (96, True)])
@pytest.mark.parametrize("N,K,rows", [(16, 384, 1), (576, 1536, 1), (48, 768, 6), (144, 384, 16)])
def test_int4_tiles_agree_with_the_reference(dtype, group_size, symmetric, N, K, rows):
    if K % group_size:
        pytest.skip("group size does not divide in_features")
    m, scales, offsets = _int4(N, K, group_size, symmetric, seed=N + K)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(K)).to(dtype)
    got = cpu_gemv.tiles_int4(x, *cpu_gemv.pack_tiles_int4(m.packed, m.scales, m.offsets), group_size)
    assert got.shape == (rows, N) and got.dtype == dtype
    assert _close(got, cpu_gemv.gemv_int4_ref(x, m.packed, scales, offsets, group_size), dtype)


@needs_tiles
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_row_of_a_wide_call_is_bit_equal_to_that_row_alone(dtype):
    """A tile multiplies each row of x by the weights alone: rows of a verify step equal a decode step's, bit for bit."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(96, 576, generator=g).bfloat16()
    q = Int8Linear.from_linear(torch.nn.Linear(576, 96, bias=False), impl="ref")
    m, _, _ = _int4(96, 576, 64, False, seed=8)
    calls = {"bf16": lambda x, t=cpu_gemv.pack_tiles_bf16(w): cpu_gemv.tiles_bf16(x, t),
             "int8": lambda x, t=cpu_gemv.pack_tiles_int8(q.weight): cpu_gemv.tiles_int8(x, t, q.scales),
             "int4": lambda x, t=cpu_gemv.pack_tiles_int4(m.packed, m.scales, m.offsets): cpu_gemv.tiles_int4(x, *t, 64)}
    x = torch.randn(16, 576, generator=g).to(dtype)
    for name, call in calls.items():
        alone = torch.cat([call(x[i:i + 1]) for i in range(16)])
        for rows in (2, 3, 8, 16):
            assert torch.equal(call(x[:rows]), alone[:rows]), (name, rows)


@needs_tiles
def test_the_tile_ops_refuse_what_they_cannot_take():
    w = cpu_gemv.pack_tiles_bf16(torch.zeros(32, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        cpu_gemv.tiles_bf16(torch.randn(17, 64), w)
    with pytest.raises(RuntimeError, match=r"activations \(\.\.\., 64\)"):
        cpu_gemv.tiles_bf16(torch.randn(1, 96), w)
    with pytest.raises(RuntimeError, match="tile layout"):
        cpu_gemv.tiles_bf16(torch.randn(1, 64), torch.zeros(32, 64, dtype=torch.bfloat16))      # not packed
    with pytest.raises(RuntimeError, match="float32 scales"):
        cpu_gemv.tiles_int8(torch.randn(1, 64), cpu_gemv.pack_tiles_int8(torch.zeros(32, 64, dtype=torch.int8)), torch.ones(31))
    q = cpu_gemv.pack_tiles_int4(torch.zeros(32, 32, dtype=torch.uint8), torch.ones(32, 2), torch.zeros(32, 2))
    with pytest.raises(RuntimeError, match="group size a multiple of 32"):
        cpu_gemv.tiles_int4(torch.randn(1, 64), *q, 48)
    with pytest.raises(RuntimeError, match="blocks"):
        cpu_gemv.tiles_int4(torch.randn(1, 64), q[0], torch.ones(32, 2), q[2], 32)                  # scales not in blocks
    assert cpu_gemv.tiles_bf16(torch.randn(0, 64), w).shape == (0, 32)


@needs_tiles
@torch.inference_mode()
def test_the_tile_ops_run_inside_a_compiled_graph():
    m, _, _ = _int4(64, 128, 64, True, seed=3)
    t4 = cpu_gemv.pack_tiles_int4(m.packed, m.scales, m.offsets)
    w = cpu_gemv.pack_tiles_bf16(torch.randn(32, 128).bfloat16())

    def step(x):
        h = torch.nn.functional.silu(cpu_gemv.tiles_bf16(x, w))          # (rows, 32)
        return cpu_gemv.tiles_int4(torch.cat([h, h, h, h], -1), *t4, 64) * 2

    x = torch.randn(4, 128).bfloat16()
    assert torch.equal(torch.compile(step, dynamic=False)(x), step(x))


@needs_tiles
@torch.inference_mode()
def test_quantized_and_prepacked_linears_run_a_few_rows_on_the_tiles():
    m, _, _ = _int4(96, 128, 64, True, seed=4)
    m.set_impl("packed", gemv="tiles")
    assert m.gemv_plan == ((16, "tiles"),) and "1-16 rows: tiles" in repr(m)
    x = torch.randn(16, 128)
    assert _close(m(x), m.forward_ref(x.bfloat16().float()), torch.float32)
    assert torch.equal(m(x[:3]), m.forward_gemv(x[:3])) and torch.equal(m(x[17:]), m.forward_packed(x[17:]))
    m.set_impl("packed", gemv="gemv")                                   # another kernel: the tile copy dropped
    assert "tiles_q" not in m._buffers and "1-16 rows: gemv" in repr(m)
    q = Int8Linear.from_linear(torch.nn.Linear(128, 48, bias=False), impl="packed").set_impl("packed", gemv="tiles")
    assert _close(q(x), q.forward_ref(x.bfloat16().float()), torch.float32)


@needs_tiles
@pytest.mark.skipif(prepack_available(torch.bfloat16) is not None, reason=str(prepack_available(torch.bfloat16)))
@torch.no_grad()      # not inference mode: an inference tensor keeps no version (backends/prepack.py's copies share that limit)
def test_a_prepacked_linear_on_the_tiles_reads_a_copy_made_with_the_weights_version():
    torch.manual_seed(6)
    linear = torch.nn.Linear(64, 96, bias=False).bfloat16()
    packed = PackedLinear.from_linear(linear, gemv="tiles")
    assert packed.kernel() == "onednn-prepacked, 1-16 rows: tiles"
    x = torch.randn(8, 64).bfloat16()
    assert torch.equal(packed(x), cpu_gemv.tiles_bf16(x, cpu_gemv.pack_tiles_bf16(linear.weight)))
    assert _close(packed(x), packed.forward_ref(x), torch.bfloat16)
    with torch.no_grad():
        packed.weight.mul_(2)                                         # changed in place: the copy is stale
    assert torch.equal(packed(x), packed.forward_ref(x))              # so F.linear runs, with the weight as it is
    assert not PackedLinear.from_linear(torch.nn.Linear(64, 20, bias=False).bfloat16(), gemv="tiles").gemv   # 20 outputs


@pytest.mark.skipif(cpu_gemv.EMULATED or cpu_gemv.tiles_available() is None,
                    reason="the tests above ran on this CPU's own tiles (or this is the emulated run)")
@pytest.mark.skipif(cpu_gemv.available() is not None, reason=f"no AVX512-BF16 here: {cpu_gemv.available()}")
def test_every_tile_test_passes_on_emulated_tiles_where_the_cpu_has_no_amx():
    """Where the CPU has no AMX (AMD Zen 4, the course machine), the tile tests run again in a child pytest on the
    same kernels built over csrc/amx_emulate.h's plain C++ tiles (MINILLM_TILES=emulate): every tile path that ships,
    the native step's included, is exercised on every AVX512-BF16 CPU, not only on a Xeon."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["MINILLM_TILES"] = "emulate"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_cpu_tiles.py", "tests/test_cpu_step.py", "tests/test_cpu_gemv.py",
                           "-k", "tiles and not emulated_tiles_where"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "skipped" not in summary and int(summary.split(" passed")[0].split()[-1]) >= 40, summary
