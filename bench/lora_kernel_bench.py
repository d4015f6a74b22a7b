"""The LoRA update's kernels alone, by step size, against the base GEMM of the same projection (issue 29).

LoRA W1 spends most of its extra time in the steps that carry prompt tokens (docs/lora.md): this times, per 8B
projection (fused q/k/v, o, fused gate/up, down) and per row count, the base layer's GEMM, the whole update
(`lora_add_triton`: shrink, the split sum where it runs, expand) and each of its kernels (torch.profiler), with the
rows spread over 8 adapters in runs as requests' tokens are; and, for scale, the same update as dense cuBLAS GEMMs
over every slot (each row's other slots' columns zeroed between them: 8x the update's FLOPs, no grouping). CUDA only.

    python bench/lora_kernel_bench.py                       # rows 16, 512, 2560, 8192; rank 16, 8 adapters
    python bench/lora_kernel_bench.py --rows 2560 --rank 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_events, kernel_table  # noqa: E402

HIDDEN, INTERMEDIATE, Q, KV = 4096, 14336, 4096, 1024  # Llama-3-8B
PROJECTIONS = {  # name: (input features, output slices)
    "qkv": (HIDDEN, [Q, KV, KV]),
    "o": (Q, [HIDDEN]),
    "gate_up": (HIDDEN, [INTERMEDIATE, INTERMEDIATE]),
    "down": (INTERMEDIATE, [HIDDEN]),
}


def token_slots(rows: int, num_adapters: int, run: int, device: torch.device) -> torch.Tensor:
    """Each run of `run` rows under one adapter, adapters in turn (requests' tokens, request i under i mod N)."""
    return ((torch.arange(rows, device=device) // run) % num_adapters).to(torch.int32)


def time_us(fn, iterations: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iterations):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 512, 2560, 8192])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--run", type=int, default=300, help="rows in a row under one adapter (a prompt's tokens)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("lora_kernel_bench.py times CUDA kernels: no GPU here")
        return 2
    from pagedserve.engine.kernels.lora import LoraStepIndex, lora_add_triton

    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    rows_out = []
    kernel_lines = []
    for name, (in_features, slices) in PROJECTIONS.items():
        out_features = sum(slices)
        weight = torch.randn(out_features, in_features, device=device, dtype=dtype) / in_features ** 0.5
        lora_a = torch.randn(args.num_adapters, len(slices) * args.rank, in_features, device=device, dtype=dtype) * 0.01
        lora_b = torch.randn(args.num_adapters, out_features, args.rank, device=device, dtype=dtype) * 0.01
        starts = [0]
        for size in slices:
            starts.append(starts[-1] + size)
        slice_starts = torch.tensor(starts, dtype=torch.int32, device=device)
        for rows in args.rows:
            x = torch.randn(rows, in_features, device=device, dtype=dtype)
            out = torch.empty(rows, out_features, device=device, dtype=dtype)
            index = LoraStepIndex.build(token_slots(rows, args.num_adapters, min(args.run, rows), device),
                                        args.num_adapters)
            base_us = time_us(lambda: torch.matmul(x, weight.T, out=out))
            # Dense: inter over all slots' A, each row keeps its own slot's R columns a slice, one addmm a slice.
            stacked_rank = len(slices) * args.rank
            a_all = lora_a.reshape(args.num_adapters * stacked_rank, in_features)
            keep = (torch.arange(args.num_adapters, device=device)[None, :] == index.token_slots[:, None].long())
            keep = keep[:, :, None].expand(rows, args.num_adapters, stacked_rank).reshape(rows, -1).to(dtype)
            b_slices = [lora_b[:, starts[i]:starts[i + 1], :].permute(1, 0, 2).reshape(slices[i], -1)
                        for i in range(len(slices))]  # [size, L * R] per slice

            def dense() -> None:
                inter = (x @ a_all.T) * keep  # [rows, L * S * R]
                inter = inter.view(rows, args.num_adapters, len(slices), args.rank)
                for i, b_slice in enumerate(b_slices):
                    out[:, starts[i]:starts[i + 1]].addmm_(inter[:, :, i, :].reshape(rows, -1), b_slice.T)

            dense_us = time_us(dense)
            lora_us = time_us(lambda: lora_add_triton(x, out, lora_a, lora_b, index, slice_starts, max(slices),
                                                      args.rank))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    lora_add_triton(x, out, lora_a, lora_b, index, slice_starts, max(slices), args.rank)
                torch.cuda.synchronize()
            kernels = kernel_table(device_events(prof), 10)
            out_bytes = 2 * rows * out_features * 2  # the expand reads and writes the base output
            rows_out.append((name, rows, base_us, lora_us, dense_us, out_bytes / lora_us / 1e3))
            kernel_lines.append(f"{name} rows {rows}: " + "; ".join(
                f"{k['name'][:28]} x{k['per_step']:.0f} {k['us_per_step']:.1f} us" for k in kernels[:4]))
            print(kernel_lines[-1], flush=True)
    print(f"\nrank {args.rank}, {args.num_adapters} adapters, runs of {args.run} rows; device {torch.cuda.get_device_name()}")
    print("| projection | rows | base GEMM us | LoRA update us | update / GEMM | dense cuBLAS us | output read+write GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rows, base_us, lora_us, dense_us, rate in rows_out:
        print(f"| {name} | {rows} | {base_us:.1f} | {lora_us:.1f} | {lora_us / base_us:.2f} | {dense_us:.1f} | {rate:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
