"""Paged attention timings: Triton vs the reference backend (and dense SDPA as a no-paging comparator).

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128), block size 16, bf16, over a
shuffled block table. Cases: decode of 256 sequences with ~600-token contexts (memory-bound: reported
as GB/s of K/V read against the measured copy bandwidth), a 2048-token prefill chunk over 512 cached
tokens (compute-bound: TFLOP/s), small decode batches over long contexts (the split-KV path), and the
fused K/V write. `--sweep` also times a few tile shapes per kernel. Prints a markdown table last, for
docs/kernels.md. Usage: python bench/attention_bench.py [--sweep] [--kv-cache-dtype fp8]

`--kv-cache-dtype fp8` runs the same cases over float8_e4m3fn caches (and W1's decode batch of 512 sequences
in both): the decode rows' GB/s count the bytes the cache holds, so an FP8 kernel at the bf16 kernel's speed
shows half its rate.

`--batch1` times instead what one layer of a batch-1 decode step runs: the fused K/V write and
attention (and the split merge) of one sequence, replayed in a CUDA graph as the engine's decode graphs
replay it, with the split count the graphs use (sized for `--max-model-len`) and with others.

`--backends triton flash_paged` times attention backends side by side, each as a layer calls it
(`write_kv_and_forward`: the K/V write and the attention): decode of 1, 64, 256 and 512 sequences over
1k-8k contexts as CUDA-graph replays (the engine's decode graphs, metadata sized for `--max-model-len`),
and a 2048-token prefill over 512 cached tokens eagerly (as the engine runs prompt steps, host work
included). `--block-size` sets the cache's block size (FlashAttention loads K/V pages by TMA when a page
is one key tile, 128 at head dim 128; else by cp.async). Prints one row per case, for docs/kernels.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import triton.testing

from pagedserve.cache.blocks import blocks_for
from pagedserve.engine.kernels.attention.base import AttentionMetadata, GroupAttentionMetadata
from pagedserve.engine.kernels.attention.reference import ReferenceAttentionBackend
from pagedserve.engine.kernels.attention.triton import TileConfig, TritonAttentionBackend

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16


@dataclass
class PagedBatch:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    metadata: AttentionMetadata
    group: GroupAttentionMetadata


def make_batch(query_lens: list[int], seq_lens: list[int], device: torch.device, seed: int = 0,
               block_size: int = BLOCK_SIZE, cache_dtype: torch.dtype = DTYPE) -> PagedBatch:
    """Random queries and caches over a shuffled block table; `cache_dtype` float8_e4m3fn: an FP8 cache (scales
    1.0, the kernels' default when none is passed)."""
    generator = torch.Generator().manual_seed(seed)
    blocks_needed = [blocks_for(seq_len, block_size) for seq_len in seq_lens]
    num_blocks = sum(blocks_needed) + 16
    permutation = torch.randperm(num_blocks, generator=generator)
    block_tables = torch.zeros(len(seq_lens), max(blocks_needed), dtype=torch.int32)
    cursor = 0
    for seq, count in enumerate(blocks_needed):
        block_tables[seq, :count] = permutation[cursor : cursor + count].to(torch.int32)
        cursor += count
    slots = []
    for seq, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens)):
        positions = torch.arange(seq_len - query_len, seq_len)
        slots.append(block_tables[seq, positions // block_size].long() * block_size + positions % block_size)
    query_start_loc = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    num_tokens = sum(query_lens)
    group = GroupAttentionMetadata(block_tables=block_tables.to(device), slot_mapping=torch.cat(slots).to(device))
    metadata = AttentionMetadata(
        query_start_loc=query_start_loc.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        groups=[group],
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
    )
    cache_shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    return PagedBatch(
        query=torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, device=device, dtype=DTYPE),
        key=torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE),
        value=torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE),
        key_cache=torch.randn(cache_shape, device=device, dtype=DTYPE).to(cache_dtype),
        value_cache=torch.randn(cache_shape, device=device, dtype=DTYPE).to(cache_dtype),
        metadata=metadata,
        group=group,
    )


def kv_bytes_read(batch: PagedBatch) -> int:
    kv = sum(batch.metadata.seq_lens_cpu) * NUM_KV_HEADS * HEAD_DIM * 2 * batch.key_cache.element_size()
    return kv + 2 * batch.query.numel() * batch.query.element_size()  # plus the queries in and the outputs out


def attention_flops(batch: PagedBatch) -> int:
    pairs = 0
    for seq_len, query_len in zip(batch.metadata.seq_lens_cpu, batch.metadata.query_lens_cpu):
        prefix = seq_len - query_len
        pairs += query_len * prefix + query_len * (query_len + 1) // 2
    return 4 * HEAD_DIM * NUM_HEADS * pairs


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def run_forward(backend, batch: PagedBatch):
    return lambda: backend.forward(
        batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.group,
        scale=HEAD_DIM**-0.5, sliding_window=None, softcap=None,
    )


def dense_sdpa(batch: PagedBatch):
    """Dense, unpaged SDPA over the same contexts pre-gathered (padded): what paging must compete with."""
    device = batch.query.device
    lens, qlens = batch.metadata.seq_lens_cpu, batch.metadata.query_lens_cpu
    max_len, max_q = max(lens), max(qlens)
    keys = torch.randn(len(lens), NUM_KV_HEADS, max_len, HEAD_DIM, device=device, dtype=DTYPE)
    values = torch.randn_like(keys)
    queries = torch.randn(len(lens), NUM_HEADS, max_q, HEAD_DIM, device=device, dtype=DTYPE)
    q_pos = torch.tensor([s - q for s, q in zip(lens, qlens)], device=device)[:, None] + torch.arange(max_q, device=device)
    k_pos = torch.arange(max_len, device=device)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < torch.tensor(lens, device=device)[:, None, None])
    mask = mask[:, None]
    return lambda: torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, enable_gqa=True)


def run_write_and_forward(backend, batch: PagedBatch):
    return lambda: backend.write_kv_and_forward(
        batch.query, batch.key, batch.value, batch.key_cache, batch.value_cache, batch.metadata, batch.group,
        scale=HEAD_DIM**-0.5, sliding_window=None, softcap=None,
    )


def batch1_rows(device: torch.device, max_model_len: int) -> list[tuple[str, str, float, str, str]]:
    """One sequence, the decode graphs' way: metadata sized for max_model_len, timed as graph replays."""
    rows = []
    reference = ReferenceAttentionBackend()
    for context in (128, 384, 640, 2048, 8192):
        batch = make_batch([1], [context], device)
        batch.metadata.max_seq_len = max(max_model_len, context)  # what a captured graph's grid is sized for
        reference.write_kv(batch.key_cache, batch.value_cache, batch.key, batch.value, batch.group.slot_mapping)
        ref = run_forward(reference, batch)()
        contenders = [("triton (engine default)", TritonAttentionBackend())]
        contenders += [(f"triton splits={n}", TritonAttentionBackend(num_kv_splits=n)) for n in (1, 2, 4, 8, 16, 32)]
        contenders += [
            (f"triton n{c.block_n} w{c.num_warps} s{c.num_stages}", TritonAttentionBackend(decode_config=c))
            for c in (TileConfig(16, 32, 4, 3), TileConfig(16, 16, 4, 3), TileConfig(16, 64, 2, 3), TileConfig(16, 128, 4, 2))
        ]
        for label, backend in contenders:
            fn = run_write_and_forward(backend, batch)
            try:
                error = relative_error(fn(), ref)
                ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            except Exception as failure:
                rows.append((f"batch 1 ctx {context}", label, float("nan"), f"failed: {type(failure).__name__}", ""))
                continue
            rows.append((f"batch 1 ctx {context}", label, ms, f"{kv_bytes_read(batch) / ms / 1e6:.0f} GB/s",
                         f"{error:.1e}"))
    return rows


def make_backend(name: str, device: torch.device):
    """A backend as the engine builds it (get_attention_backend), or the reason it cannot run here."""
    from pagedserve.engine.kernels.attention import get_attention_backend

    try:
        return get_attention_backend(name, device)
    except ValueError as error:
        return str(error)


BACKEND_DECODE_BATCHES = (1, 64, 256, 512)
BACKEND_DECODE_CONTEXTS = (1024, 2048, 4096, 8192)


def backend_rows(names: list[str], device: torch.device, block_size: int, max_model_len: int) -> list[list[str]]:
    """Each case under each backend: median ms, its rate, and the output's relative difference from the first
    backend's (the same inputs, the same cache before the call)."""
    backends = {name: make_backend(name, device) for name in names}
    cases = [(f"decode B={batch} ctx {context}", [1] * batch, [context] * batch)
             for batch in BACKEND_DECODE_BATCHES for context in BACKEND_DECODE_CONTEXTS]
    cases.append(("prefill 2048 new + 512 cached", [2048], [2560]))
    rows = []
    for case_name, query_lens, seq_lens in cases:
        batch = make_batch(query_lens, seq_lens, device, block_size=block_size)
        is_decode = batch.metadata.max_query_len == 1
        if is_decode:
            batch.metadata.max_seq_len = max(max_model_len, max(seq_lens))  # what a captured graph is sized for
        row, first_out = [case_name], None
        for name in names:
            backend = backends[name]
            if isinstance(backend, str):
                row.append(f"unavailable: {backend}"[:80])
                continue
            fn = run_write_and_forward(backend, batch)
            try:
                out = fn().clone()
                ms = (triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") if is_decode
                      else median_ms(fn))
            except Exception as failure:  # report and go on: one failing case must not hide the others
                row.append(f"failed: {type(failure).__name__}: {failure}"[:120])
                continue
            rate = (f"{kv_bytes_read(batch) / ms / 1e6:.0f} GB/s" if is_decode
                    else f"{attention_flops(batch) / ms / 1e9:.0f} TFLOP/s")
            difference = "" if first_out is None else f", diff {relative_error(out, first_out):.1e}"
            first_out = out if first_out is None else first_out
            row.append(f"{ms:.4f} ms ({rate}{difference})")
        rows.append(row)
        del batch
        torch.cuda.empty_cache()
    return rows


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def copy_bandwidth_gbs(device: torch.device) -> float:
    source = torch.randn(256 * 1024 * 1024, device=device, dtype=DTYPE)  # 512 MiB
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source))
    return 2 * source.numel() * source.element_size() / ms / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also time alternative tile shapes")
    parser.add_argument("--short-sweep", action="store_true", help="time only the prefill shapes that led last time")
    parser.add_argument("--batch1", action="store_true", help="only the batch-1 decode layer, in CUDA graphs")
    parser.add_argument("--max-model-len", type=int, default=8192,
                        help="what --batch1's and --backends' decode graphs are sized for")
    parser.add_argument("--backends", nargs="+", choices=["triton", "flash_paged"], default=None,
                        help="only the side-by-side table of these backends (decode 1-512 x 1k-8k, prefill 2k+512)")
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE, help="the cache's block size (--backends)")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                        help="fp8: the main table's caches are float8_e4m3fn (auto: bf16); its decode rates count the "
                             "bytes the cache holds")
    args = parser.parse_args()
    cache_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else DTYPE
    device = torch.device("cuda")
    if args.backends:
        print_backend_table(args.backends, backend_rows(args.backends, device, args.block_size, args.max_model_len),
                            device, args.block_size)
        return
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    rows: list[tuple[str, str, float, str, str]] = []
    reference, fast = ReferenceAttentionBackend(), TritonAttentionBackend()

    copy_gbs = copy_bandwidth_gbs(device)
    decode_lens = torch.randint(500, 701, (256,), generator=generator).tolist()
    w1_lens = torch.randint(300, 1281, (512,), generator=generator).tolist()  # W1's decodes: 64..1024 in, 256 out
    dtype_name = "" if cache_dtype == DTYPE else " fp8"
    cases = {} if args.batch1 else {
        f"decode B=256 ctx~600{dtype_name}": make_batch([1] * 256, decode_lens, device, cache_dtype=cache_dtype),
        f"decode B=512 ctx~800{dtype_name}": make_batch([1] * 512, w1_lens, device, cache_dtype=cache_dtype),
        f"prefill 2048 new + 512 cached{dtype_name}": make_batch([2048], [2560], device, cache_dtype=cache_dtype),
        f"decode B=8 ctx 8192{dtype_name}": make_batch([1] * 8, [8192] * 8, device, cache_dtype=cache_dtype),
        f"decode B=64 ctx 2048{dtype_name}": make_batch([1] * 64, [2048] * 64, device, cache_dtype=cache_dtype),
        f"mixed 255 decode ctx~600 + 512-chunk over 1024{dtype_name}": make_batch(
            [1] * 255 + [512], decode_lens[:255] + [1536], device, cache_dtype=cache_dtype),
    }
    for case_name, batch in cases.items():
        is_decode = batch.metadata.max_query_len == 1
        ref = run_forward(reference, batch)()
        contenders = [("triton", fast), ("reference", reference)]
        if args.sweep and case_name.startswith(("decode B=256", "decode B=512", "prefill")):
            configs = (
                [TileConfig(16, n, w, s) for n in (32, 64, 128, 256)
                 for w, s in ((1, 3), (2, 3), (2, 4), (2, 5), (4, 2), (4, 3), (8, 3))]
                if is_decode
                else [TileConfig(m, n, w, s) for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
            )
            for config in configs:
                label = f"triton m{config.block_m} n{config.block_n} w{config.num_warps} s{config.num_stages}"
                backend = TritonAttentionBackend(**({"decode_config": config} if is_decode else {"prefill_config": config}))
                contenders.append((label, backend))
        if args.short_sweep and case_name.startswith("prefill"):
            for config in (TileConfig(64, 32, 4, 2), TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 3)):
                label = f"triton m{config.block_m} n{config.block_n} w{config.num_warps} s{config.num_stages}"
                contenders.append((label, TritonAttentionBackend(prefill_config=config)))
        if args.sweep and case_name.startswith(("decode B=8 ", "decode B=64")):
            contenders += [(f"triton splits={n}", TritonAttentionBackend(num_kv_splits=n)) for n in (1, 2, 4, 8, 16)]
        for label, backend in contenders:
            try:
                fn = run_forward(backend, batch)
                error = relative_error(fn(), ref)
                ms = median_ms(fn)
            except Exception as failure:  # a tile shape that does not compile (e.g. out of shared memory)
                rows.append((case_name, label, float("nan"), f"failed: {type(failure).__name__}", ""))
                continue
            rate = (f"{kv_bytes_read(batch) / ms / 1e6:.0f} GB/s ({kv_bytes_read(batch) / ms / 1e6 / copy_gbs:.0%} of copy)"
                    if is_decode else f"{attention_flops(batch) / ms / 1e9:.0f} TFLOP/s")
            rows.append((case_name, label, ms, rate, f"{error:.1e}"))
        if case_name.startswith(("decode B=256", "prefill")):
            try:
                ms = median_ms(dense_sdpa(batch))
                rows.append((case_name, "dense SDPA, unpaged, masked", ms, "", ""))
            except Exception as failure:
                rows.append((case_name, "dense SDPA, unpaged, masked", float("nan"), f"failed: {failure}"[:80], ""))
        for label, backend in (("triton", fast), ("reference", reference)):
            slot_mapping = batch.group.slot_mapping
            ms = median_ms(lambda: backend.write_kv(batch.key_cache, batch.value_cache, batch.key, batch.value, slot_mapping))
            moved = 4 * batch.key.numel() * batch.key.element_size()
            rows.append((case_name, f"write_kv {label}", ms, f"{moved / ms / 1e6:.0f} GB/s", ""))

    if args.batch1:
        rows += batch1_rows(device, args.max_model_len)
    print(f"\n{run_header(device)}; device-to-device copy {copy_gbs:.0f} GB/s (read + write)")
    print("| case | backend | median ms | rate | rel err vs reference |")
    print("|---|---|---|---|---|")
    for case_name, label, ms, rate, error in rows:
        print(f"| {case_name} | {label} | {ms:.4f} | {rate} | {error} |")


def run_header(device: torch.device) -> str:
    commit = os.environ.get("BENCH_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    try:
        from importlib.metadata import version

        flash = f", flash-attn-4 {version('flash-attn-4')}"
    except Exception:  # not installed
        flash = ""
    return (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}{flash}, "
            f"commit {commit or 'unknown'}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def print_backend_table(names: list[str], rows: list[list[str]], device: torch.device, block_size: int) -> None:
    print(f"\n{run_header(device)}; {NUM_HEADS} q heads, {NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}, "
          f"block {block_size}, {str(DTYPE).removeprefix('torch.')}; decode: graph replays, prefill: eager")
    ratio_header = f" | {names[0]} ms / {names[1]} ms (> 1: {names[1]} faster) |" if len(names) > 1 else " |"
    print("| case | " + " | ".join(names) + ratio_header)
    print("|---" * (len(names) + 1 + (len(names) > 1)) + "|")
    for row in rows:
        ratio = ""
        if len(names) > 1:
            try:
                ratio = f" {float(row[1].split(' ms')[0]) / float(row[2].split(' ms')[0]):.2f} |"
            except ValueError:  # a failed or unavailable cell
                ratio = " |"
        print("| " + " | ".join(row) + " |" + ratio)


if __name__ == "__main__":
    main()
