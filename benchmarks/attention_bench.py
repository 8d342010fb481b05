"""The CUDA backend's paged attention kernel against the hardware and against torch's SDPA.

Decode is memory bound: the number that matters is KV bytes read per second, as a fraction of
the copy bandwidth ``roofline.py`` measured. Prefill is compute bound: TFLOP/s of the causal
attention, next to ``torch.nn.functional.scaled_dot_product_attention`` (flash backend) on the
same sequences laid out contiguously. Llama-3-8B's attention shape (32 query heads, 8 KV
heads, head_dim 128), bf16, 16-token blocks.

    python benchmarks/attention_bench.py --roofline roofline.json --json attention.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16


def timed_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def paged_batch(seq_lens: list[int], query_lens: list[int]):
    """Random cache and metadata tensors: each sequence's blocks shuffled over the cache."""
    blocks = [-(-n // BLOCK) for n in seq_lens]
    total = sum(blocks) + 1
    perm = torch.randperm(total - 1) + 1
    width = max(blocks)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    offset = 0
    for i, b in enumerate(blocks):
        tables[i, :b] = perm[offset : offset + b]
        offset += b
    k = torch.randn(total, BLOCK, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    v = torch.randn_like(k)
    starts = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(int(starts[-1]), HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    return q, k, v, tables.cuda(), torch.tensor(seq_lens, dtype=torch.int32, device="cuda"), starts.cuda()


def decode_case(batch: int, context: int, copy_bw: float | None) -> dict:
    from lmport_cuda.kernels.paged_attention import unified_attention

    q, k, v, tables, seq_lens, starts = paged_batch([context] * batch, [1] * batch)
    out = torch.empty_like(q)

    def run():
        unified_attention(out, q, k, v, tables, seq_lens, starts, max_query_len=1, scale=HEAD_DIM**-0.5)

    ms = timed_ms(run)
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * q.element_size()
    bw = kv_bytes / (ms / 1000)
    row = {"phase": "decode", "batch": batch, "context": context, "ms": ms, "kv_bytes_per_s": bw}
    if copy_bw:
        row["fraction_of_copy_bw"] = bw / copy_bw
    return row


def prefill_case(num_seqs: int, length: int) -> dict:
    from lmport_cuda.kernels.paged_attention import unified_attention

    q, k, v, tables, seq_lens, starts = paged_batch([length] * num_seqs, [length] * num_seqs)
    out = torch.empty_like(q)
    ms = timed_ms(lambda: unified_attention(out, q, k, v, tables, seq_lens, starts, max_query_len=length, scale=HEAD_DIM**-0.5))
    flops = num_seqs * 4 * HEADS * HEAD_DIM * length * (length + 1) / 2  # causal: QK^T and PV over half
    # torch SDPA on the same shapes, contiguous, KV heads expanded for GQA
    qs = torch.randn(num_seqs, HEADS, length, HEAD_DIM, dtype=DTYPE, device="cuda")
    ks = torch.randn(num_seqs, HEADS, length, HEAD_DIM, dtype=DTYPE, device="cuda")
    vs = torch.randn_like(ks)
    sdpa_ms = timed_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
    return {"phase": "prefill", "batch": num_seqs, "context": length, "ms": ms, "tflops": flops / ms / 1e9,
            "sdpa_ms": sdpa_ms, "sdpa_tflops": flops / sdpa_ms / 1e9, "ratio_to_sdpa": sdpa_ms / ms}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roofline", default=None, help="roofline.py's JSON, for the bandwidth fraction")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("attention_bench: no CUDA device", file=sys.stderr)
        return 2
    copy_bw = None
    if args.roofline:
        try:
            copy_bw = json.load(open(args.roofline))["copy_bytes_per_s"]
        except (OSError, KeyError, ValueError):
            pass
    rows = []
    cases = [("decode", b, c) for b, c in ((1, 512), (1, 8192), (16, 2048), (64, 640), (256, 640), (256, 2048))]
    cases += [("prefill", n, length) for n, length in ((1, 512), (4, 2048), (1, 8192))]
    for phase, batch, context in cases:
        try:
            row = decode_case(batch, context, copy_bw) if phase == "decode" else prefill_case(batch, context)
        except Exception as exc:  # one failed case must not hide the others
            row = {"phase": phase, "batch": batch, "context": context, "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        if "error" in row:
            print(f"{phase:<8} batch {batch:>4} context {context:>5}: FAILED {row['error']}", flush=True)
        elif phase == "decode":
            frac = f" = {row['fraction_of_copy_bw']:.0%} of copy bandwidth" if "fraction_of_copy_bw" in row else ""
            print(f"decode   batch {batch:>4} context {context:>5}: {row['ms'] * 1000:8.1f} us, "
                  f"KV read {row['kv_bytes_per_s'] / 1e12:.2f} TB/s{frac}", flush=True)  # fmt: skip
        else:
            print(f"prefill  batch {batch:>4} length  {context:>5}: {row['ms'] * 1000:8.1f} us, {row['tflops']:.0f} TFLOP/s "
                  f"(SDPA {row['sdpa_tflops']:.0f}, ratio {row['ratio_to_sdpa']:.2f})", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(0), "rows": rows}, f, indent=2)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
