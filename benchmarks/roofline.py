"""Measure this GPU's ceilings: device-to-device copy bandwidth and bf16 GEMM throughput.

Decode reads every weight once per step, so ``bytes read per step / copy bandwidth`` bounds
one sequence's tokens per second; the suite reports lmport's speed as a ratio to that.
Copy bandwidth counts the bytes read plus the bytes written.

    python benchmarks/roofline.py --json roofline.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def timed_ms(fn, iters: int) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs, after two warm-ups (CUDA events)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth(gib: float = 2.0, iters: int = 20) -> float:
    """Bytes per second of a device-to-device copy (read + write)."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), iters)
    return 2 * n / (ms / 1000)


def gemm_flops(n: int = 8192, iters: int = 20) -> float:
    """bf16 FLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(n, n, dtype=torch.bfloat16, device="cuda")
    ms = timed_ms(lambda: torch.matmul(a, b, out=out), iters)
    return 2 * n**3 / (ms / 1000)


def measure() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "sm_count": props.multi_processor_count,
        "copy_bytes_per_s": copy_bandwidth(),
        "bf16_gemm_flops": gemm_flops(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the measurements here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("roofline: no CUDA device", file=sys.stderr)
        return 2
    result = measure()
    print(f"{result['gpu']}: copy {result['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
          f"bf16 GEMM {result['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
