"""Benchmarks of every kernel against its PyTorch baseline in the same run, and a roofline. GPU only.

    python -m kernels.bench                 # print the table
    python -m kernels.bench --write         # also record it in kernels/BENCHMARKS.md (device, date, versions)

Each row times the Triton kernel and the PyTorch baseline with triton.testing.do_bench (median of
repeated runs after warm-up, CUDA events) and reports their ratio (baseline time / kernel time: > 1
means the kernel is faster). Under the CPU interpreter there is nothing meaningful to time, so this
refuses to run. The roofline helpers below need no GPU: they work from a device spec table.
"""
from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

BENCHMARKS_MD = Path(__file__).with_name("BENCHMARKS.md")
START, END = "<!-- results:start -->", "<!-- results:end -->"

# Vendor datasheet figures (dense, no structured sparsity, boost clock), NOT measurements.
# bandwidth in bytes/s; peak in FLOP/s for 16-bit tensor-core math ("bf16") and plain float32 ("fp32").
DEVICE_SPECS = {
    "H100 SXM": {"match": "H100 80GB HBM3", "bandwidth": 3.35e12, "bf16": 989.4e12, "fp32": 66.9e12},
    "H100 PCIe": {"match": "H100 PCIe", "bandwidth": 2.0e12, "bf16": 756.5e12, "fp32": 51.2e12},
    "H200 SXM": {"match": "H200", "bandwidth": 4.8e12, "bf16": 989.4e12, "fp32": 66.9e12},
    "A100 SXM 80GB": {"match": "A100-SXM4-80GB", "bandwidth": 2.039e12, "bf16": 312e12, "fp32": 19.5e12},
    "L4": {"match": "L4", "bandwidth": 300e9, "bf16": 121e12, "fp32": 30.3e12},
}


def spec_for(device_name: str) -> tuple[str, dict] | None:
    """The DEVICE_SPECS entry whose `match` string ends torch.cuda.get_device_name(), if any."""
    for name, spec in DEVICE_SPECS.items():
        if device_name.endswith(spec["match"]):  # endswith: "L4" must not match "L40S"
            return name, spec
    return None


def workloads() -> dict[str, dict]:
    """FLOPs and minimum bytes moved for each benchmark's shape (the same shapes as the bench_* defaults).

    Arithmetic intensity = flops / bytes: below bandwidth/peak (the ridge point) a kernel is memory-bound.
    Elementwise FLOP counts are rough (a few per element); the matmul and attention counts are exact.
    """
    n = 2**26
    rows = cols = 4096
    B, H, T, d = 4, 16, 4096, 64
    N = K = 8192
    g = 128
    return {
        "vector_add": {"flops": n, "bytes": 3 * 4 * n},                               # fp32: read x, y, write out
        "softmax": {"flops": 5 * rows * cols, "bytes": 2 * 2 * rows * cols},          # fp16: read + write
        "rmsnorm+residual": {"flops": 5 * rows * cols, "bytes": 4 * 2 * rows * cols},  # bf16: 2 reads + 2 writes
        "rope": {"flops": 3 * 8 * 32 * T * 128, "bytes": 2 * 2 * 8 * 32 * T * 128},   # bf16: read + write
        "matmul": {"flops": 2 * 4096**3, "bytes": 3 * 2 * 4096**2},                   # bf16: A, B, C once each
        "flash_attention": {"flops": 4 * B * H * T * T * d // 2, "bytes": 4 * 2 * B * H * T * d},  # causal
        "int4_matvec": {"flops": 2 * N * K, "bytes": N * K // 2 + 2 * 4 * N * K // g + 2 * (N + K)},
    }


def roofline(spec: dict, intensity: float, peak_key: str = "bf16") -> float:
    """Attainable FLOP/s at a given arithmetic intensity: min(peak, intensity * bandwidth)."""
    return min(spec[peak_key], intensity * spec["bandwidth"])


def bench_copy(n_bytes: int = 2**30) -> dict:
    """The achievable bandwidth baseline: torch's device-to-device copy (one read + one write)."""
    import torch
    import triton

    from . import require_gpu

    require_gpu("bench_copy")
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return {"kernel": "copy (torch)", "ms": ms, "gbs": 2 * n_bytes / (ms * 1e-3) / 1e9}


def run_all() -> tuple[dict, list[dict]]:
    """Run every benchmark once; returns (header facts, result rows)."""
    import torch
    import triton

    from .flash_attention import bench_flash_attention
    from .int4_matvec import bench_int4_matvec
    from .matmul import bench_matmul
    from .rmsnorm import bench_rmsnorm
    from .rope import bench_rope
    from .softmax import bench_softmax
    from .vector_add import bench_add

    device = torch.cuda.get_device_name()
    found = spec_for(device)
    header = {"device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "triton": triton.__version__, "cuda": torch.version.cuda, "spec": found[0] if found else None}
    copy = bench_copy()
    rows = []
    for fn, aim in [(bench_add, None), (bench_softmax, 1.0), (bench_rmsnorm, None), (bench_rope, None),
                    (bench_matmul, 0.9), (bench_flash_attention, 0.8), (bench_int4_matvec, None)]:
        r = fn()
        r["ratio"] = r["torch_ms"] / r["triton_ms"]  # > 1: the kernel is faster than PyTorch
        r["aim"] = f">= {aim}x" if aim else ""
        if r["kernel"] == "int4_matvec":
            r["aim"] = ">= 70% of peak bandwidth"
            r["vs_copy"] = r["triton_gbs"] / copy["gbs"]
            if found:
                r["vs_peak"] = r["triton_gbs"] * 1e9 / found[1]["bandwidth"]
        rows.append(r)
    header["copy_gbs"] = copy["gbs"]
    return header, rows


def to_markdown(header: dict, rows: list[dict]) -> str:
    lines = [f"Device: {header['device']} (spec row: {header['spec']}); date {header['date']}; torch {header['torch']}, "
             f"triton {header['triton']}, CUDA {header['cuda']}. Copy bandwidth (torch, measured): "
             f"{header['copy_gbs']:.0f} GB/s.", "",
             "| kernel | shape | dtype | triton ms | torch ms | torch/triton | triton | torch | aim |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        unit = "TFLOP/s" if "triton_tflops" in r else "GB/s"
        key = "tflops" if unit == "TFLOP/s" else "gbs"
        extra = ""
        if "vs_copy" in r:
            extra = f" ({r['vs_copy']:.0%} of copy" + (f", {r['vs_peak']:.0%} of spec peak)" if "vs_peak" in r else ")")
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['triton_ms']:.4f} | {r['torch_ms']:.4f} | "
                     f"{r['ratio']:.2f}x | {r['triton_' + key]:.1f} {unit}{extra} | {r['torch_' + key]:.1f} {unit} | "
                     f"{r['aim']} |")
    return "\n".join(lines)


def read_results(path: Path = BENCHMARKS_MD) -> list[dict]:
    """The recorded result rows of BENCHMARKS.md as dicts (empty when no GPU run has been recorded)."""
    text = path.read_text()
    if START not in text:
        return []
    block = text.split(START, 1)[1].split(END, 1)[0]
    rows = []
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and re.fullmatch(r"[\d.]+", cells[3]):
            rows.append({"kernel": cells[0], "shape": cells[1], "dtype": cells[2], "triton_ms": float(cells[3]),
                         "torch_ms": float(cells[4]), "ratio": float(cells[5].rstrip("x")),
                         "achieved": float(cells[6].split()[0]), "unit": cells[6].split()[1]})
    return rows


def recorded_spec(path: Path = BENCHMARKS_MD) -> str | None:
    """The DEVICE_SPECS row named in the recorded results' header, if any."""
    found = re.search(r"\(spec row: ([^)]+)\)", path.read_text())
    return found.group(1) if found and found.group(1) in DEVICE_SPECS else None


def measured_points(results: list[dict]) -> list[tuple[str, float, float]]:
    """(kernel, arithmetic intensity, achieved FLOP/s) for each recorded row, to place on the roofline.
    A GB/s figure becomes FLOP/s by multiplying with the workload's intensity."""
    points = []
    for r in results:
        w = workloads()[r["kernel"]]
        intensity = w["flops"] / w["bytes"]
        flops = r["achieved"] * 1e12 if r["unit"] == "TFLOP/s" else r["achieved"] * 1e9 * intensity
        points.append((r["kernel"], intensity, flops))
    return points


def write_results(markdown: str, path: Path = BENCHMARKS_MD) -> None:
    text = path.read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{START}\n{markdown}\n{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"record the results in {BENCHMARKS_MD.name}")
    args = parser.parse_args(argv)
    import torch

    from . import interpreting

    if interpreting() or not torch.cuda.is_available():
        print("kernels.bench needs a CUDA GPU: under TRITON_INTERPRET=1 the kernels run in numpy and their "
              "timings say nothing about the kernels. Nothing was measured.", file=sys.stderr)
        return 2
    header, rows = run_all()
    markdown = to_markdown(header, rows)
    print(markdown)
    if args.write:
        write_results(markdown)
        print(f"recorded in {BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
