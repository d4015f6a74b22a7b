"""FlashAttention 4 behind the flash_paged backend, checked on a CPU: every geometry the engine meets goes through
`FlashPagedAttentionBackend.forward` into the real `flash_attn.cute.flash_attn_varlen_func` under torch's
`FakeTensorMode`, which runs FlashAttention's argument checks, its config selection and its CuTe DSL compilation
for the target GPU, but launches nothing (FlashAttention's CPU-only compilation mode). No GPU needed: use it after
upgrading flash-attn-4 to see that the interface still takes our arguments.

    pip install --no-deps --target /tmp/fa4 flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 \
        nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
        quack-kernels apache-tvm-ffi torch-c-dlpack-ext einops cuda-bindings cuda-pathfinder
    PYTHONPATH=/tmp/fa4:/tmp/fa4/nvidia_cutlass_dsl/dsl_packages python bench/flash_compile_check.py   # sm_90

Blackwell (`--arch sm_100`) cannot be checked this way: its scheduler asks the driver for the device's
properties. Prints one line per geometry: ok (with the seconds it took, compiling included) or the error.
"""

from __future__ import annotations

import argparse
import os
import time
import traceback


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sm_90", help="FlashAttention's kernel family to compile for")
    parser.add_argument("--num-sms", default="132", help="the target GPU's SM count (its config selection reads it)")
    args = parser.parse_args()
    # Read by flash_attn.cute when it is imported and at its first call: set before either.
    os.environ.setdefault("FLASH_ATTENTION_ARCH", args.arch)
    os.environ.setdefault("CUTE_DSL_ARCH", args.arch + "a")
    os.environ.setdefault("FLASH_ATTENTION_NUM_SMS", args.num_sms)

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from flash_attn.cute import flash_attn_varlen_func

    from pagedserve.engine.kernels.attention.base import AttentionMetadata, GroupAttentionMetadata
    from pagedserve.engine.kernels.attention.flash import FlashPagedAttentionBackend
    from pagedserve.engine.kernels.attention.reference import ReferenceAttentionBackend

    major = int(args.arch.removeprefix("sm_")[:-1])
    backend = FlashPagedAttentionBackend(ReferenceAttentionBackend(), flash_attn_varlen_func, (major, 0))

    def check(name: str, query_lens: list[int], max_seq_len: int, heads: int = 32, kv_heads: int = 8,
              head_dim: int = 128, block_size: int = 16, window: int | None = None, softcap: float | None = None,
              dtype: torch.dtype = torch.bfloat16) -> bool:
        with FakeTensorMode(allow_non_fake_inputs=True):
            num_seqs, num_tokens = len(query_lens), sum(query_lens)
            width = -(-max_seq_len // block_size)
            num_blocks = num_seqs * width + 3
            # [1, H, T, D] contiguous seen as [T, H, D]: the view transformers' attention hands over.
            query = torch.empty_strided((num_tokens, heads, head_dim), (head_dim, num_tokens * head_dim, 1),
                                        dtype=dtype, device="cuda")
            caches = [torch.empty(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
                      for _ in range(2)]
            group = GroupAttentionMetadata(
                block_tables=torch.empty(num_seqs, width, dtype=torch.int32, device="cuda"),
                slot_mapping=torch.empty(num_tokens, dtype=torch.int64, device="cuda"))
            metadata = AttentionMetadata(
                query_start_loc=torch.empty(num_seqs + 1, dtype=torch.int32, device="cuda"),
                seq_lens=torch.empty(num_seqs, dtype=torch.int32, device="cuda"), max_query_len=max(query_lens),
                max_seq_len=max_seq_len, block_size=block_size, groups=[group], query_lens_cpu=list(query_lens),
                seq_lens_cpu=[max_seq_len] * num_seqs)
            started = time.perf_counter()
            try:
                reason = backend.unsupported_reason(query, caches[0])
                out = backend.forward(query, *caches, metadata, group, scale=head_dim**-0.5, sliding_window=window,
                                      softcap=softcap)
            except Exception:
                print(f"{name}: FAILED\n{traceback.format_exc()}", flush=True)
                return False
            # A geometry whose compile key an earlier one had reuses that kernel (0.0 s).
            what = f"falls back ({reason})" if reason else f"ok in {time.perf_counter() - started:.1f} s"
            print(f"{name}: {what}; out {tuple(out.shape)} {str(out.dtype).removeprefix('torch.')}", flush=True)
            return True

    results = [
        check("decode, batch 1, graph sized for 8192", [1], 8192),
        check("decode, batch 64", [1] * 64, 8192),
        check("decode, batch 512 (FlashAttention's batch lookup above 256)", [1] * 512, 8192),
        check("prefill 2048 over 512 cached", [2048], 2560),
        check("mixed: 255 decodes and a 512-token chunk", [1] * 255 + [512], 2048),
        check("block 128 (TMA page loads)", [1] * 8, 8192, block_size=128),
        check("window 4096, softcap 50", [1, 300], 8192, window=4096, softcap=50.0),
        check("head_dim 256, window, softcap (gemma-2 shape)", [1, 90], 4096, heads=8, kv_heads=4, head_dim=256,
              window=4096, softcap=50.0),
        check("head_dim 64, MHA, float16", [1, 33], 1024, heads=8, kv_heads=8, head_dim=64, dtype=torch.float16),
        check("tiny models: head_dim 16, GQA 2, window 24, softcap", [1, 20, 1], 512, heads=4, kv_heads=2,
              head_dim=16, window=24, softcap=50.0),
    ]
    print(f"{sum(results)} of {len(results)} geometries passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
