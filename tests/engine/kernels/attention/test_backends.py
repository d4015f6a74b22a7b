"""Attention backends against the reference oracle, on random paged caches.

Each case builds a packed batch (decode rows and chunked-prefill rows with a cached prefix) over a cache
whose block tables are shuffled, non-contiguous block ids. Blocks a backend must never read (unused
blocks, table padding, and with a sliding window the stale entries that fell out of it) point at
blocks that exist but hold NaN when the Triton backend runs: reading any of them would turn its output
NaN. Output and split buffers are NaN-poisoned too, so an unwritten row fails.

On CPU the Triton kernels run under TRITON_INTERPRET=1 in a subprocess (the interpreter is chosen when
the kernels are defined, so it must not leak into, or depend on, the rest of the test session); GPU
cases run in-process and are marked `gpu`.

FP8 cases (`kv_cache="fp8"`) hold the cache in e4m3 with per-layer K and V scales: both backends must store
the same bytes and attend over the same dequantized values. Triton's interpreter reads an e4m3 NaN as 480,
not NaN, so there a read of a poisoned block shows as a large error rather than a NaN (on a GPU, as NaN).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass

import pytest
from resolved import resolved

from pagedserve.config.engine import EngineConfig
import torch

from pagedserve.engine.kernels.attention import BACKEND_NAMES, get_attention_backend
from pagedserve.engine.kernels.attention.base import AttentionMetadata, GroupAttentionMetadata
from pagedserve.engine.kernels.attention.reference import ReferenceAttentionBackend
from triton_interpreter import WORKER_FLAG, interpreter_results

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    query_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    dtype: str = "float32"
    sliding_window: int | None = None
    softcap: float | None = None
    num_kv_splits: int | None = None
    max_rel_error: float = 1e-4
    tile: tuple[int, int] | None = None  # (block_m, block_n) for both kernels' launches; None: defaults
    kv_cache: str = "model"  # "model": the query's dtype; "fp8": e4m3
    kv_scales: tuple[float, float] | None = None  # (k_scale, v_scale) of an FP8 cache; None: 1.0 (not passed)


# Tiny shapes: the interpreter runs every program instance in numpy.
CPU_CASES = [
    Case("mixed_mha_bs16", 2, 2, 32, 16, (1, 5, 1, 20), (37, 40, 1, 20)),
    Case("decode_gqa4_bs32_split3", 8, 2, 16, 32, (1, 1, 1), (70, 33, 5), num_kv_splits=3),
    Case("mixed_gqa4_window_softcap", 8, 2, 32, 16, (1, 9, 1, 3), (75, 60, 50, 3), sliding_window=20, softcap=5.0),
    Case("mixed_gqa4_window_split2", 4, 1, 16, 32, (1, 7, 1), (90, 70, 40), sliding_window=24, num_kv_splits=2),
    # Small tiles: many query tiles and key tiles, so masked edge, unmasked middle and diagonal all run.
    Case("mixed_gqa2_window_small_tiles", 4, 2, 32, 16, (1, 21, 1, 30), (130, 100, 64, 30), sliding_window=40,
         tile=(16, 16)),
    Case("mixed_gqa2_small_tiles_split3", 4, 2, 32, 16, (1, 21, 1), (130, 100, 64), softcap=4.0, num_kv_splits=3,
         tile=(16, 16)),
    Case("mixed_gqa3_head_dim24_padded", 6, 2, 24, 16, (1, 11, 1), (40, 30, 17)),
    # Decode with new positions at the first and last row of a key tile (16) and of a split.
    Case("decode_window_tile_edges", 4, 2, 16, 8, (1, 1, 1, 1, 1), (64, 65, 17, 1, 48), sliding_window=20,
         tile=(16, 16)),
    Case("decode_tile_edges_split2", 4, 1, 16, 8, (1, 1, 1, 1), (64, 65, 33, 2), num_kv_splits=2, tile=(16, 16)),
    Case("prefill_mha_softcap_fp16", 2, 2, 64, 16, (18, 1), (50, 30), dtype="float16", softcap=3.0, max_rel_error=1e-2),
    # FP8 caches: scales that are powers of two (exact either way) and one that is not; and no scales (1.0).
    Case("fp8_mixed_gqa4_window_softcap_unit_scales", 8, 2, 32, 16, (1, 9, 1, 3), (75, 60, 50, 3), sliding_window=20,
         softcap=5.0, kv_cache="fp8"),
    # Decode only: write_kv_and_forward stores the new K/V inside the attention kernel, quantized there.
    Case("fp8_decode_gqa4_split3", 8, 2, 16, 32, (1, 1, 1), (70, 33, 5), num_kv_splits=3, kv_cache="fp8",
         kv_scales=(0.25, 4.0)),
    Case("fp8_mixed_small_tiles_split2_fp16", 4, 2, 32, 16, (1, 21, 1), (130, 100, 64), dtype="float16",
         num_kv_splits=2, tile=(16, 16), kv_cache="fp8", kv_scales=(0.3, 0.7), max_rel_error=1e-2),
    # bfloat16 queries over an FP8 cache: the kernel runs both dots in float16 (q converted once).
    Case("fp8_mixed_bf16_split2", 4, 2, 32, 16, (1, 9, 1), (40, 30, 17), dtype="bfloat16", num_kv_splits=2,
         kv_cache="fp8", kv_scales=(0.5, 0.3), max_rel_error=1e-2),
]

GPU_CASES = [
    Case("llama_decode_bf16", 32, 8, 128, 16, (1,) * 24, tuple(range(300, 1500, 50)), "bfloat16", max_rel_error=1e-2),
    Case("llama_decode_bf16_split4", 32, 8, 128, 16, (1,) * 5, (1, 17, 333, 1000, 2049), "bfloat16",
         num_kv_splits=4, max_rel_error=1e-2),
    Case("llama_mixed_bf16", 32, 8, 128, 16, (1, 200, 1, 77, 1, 300), (600, 700, 35, 77, 1200, 900), "bfloat16",
         max_rel_error=1e-2),
    Case("mixed_window_softcap_bf16_bs32", 16, 4, 128, 32, (1, 130, 1, 64), (900, 500, 260, 64), "bfloat16",
         sliding_window=128, softcap=50.0, max_rel_error=1e-2),
    Case("mixed_d256_fp16_window", 8, 4, 256, 16, (1, 90, 1), (400, 300, 77), "float16", sliding_window=100,
         max_rel_error=1e-2),
    Case("mixed_d64_mha_fp32", 8, 8, 64, 16, (1, 150, 1), (333, 400, 1), "float32", softcap=30.0),
    Case("mixed_d128_fp32_gqa4_window_split", 8, 2, 128, 16, (1, 1, 40), (500, 90, 300), "float32",
         sliding_window=64, num_kv_splits=3),
    Case("llama_decode_bf16_fp8kv", 32, 8, 128, 16, (1,) * 24, tuple(range(300, 1500, 50)), "bfloat16",
         max_rel_error=1e-2, kv_cache="fp8", kv_scales=(0.5, 0.25)),
    Case("llama_decode_bf16_fp8kv_split4", 32, 8, 128, 16, (1,) * 5, (1, 17, 333, 1000, 2049), "bfloat16",
         num_kv_splits=4, max_rel_error=1e-2, kv_cache="fp8", kv_scales=(1.0, 1.0)),
    Case("llama_mixed_bf16_fp8kv", 32, 8, 128, 16, (1, 200, 1, 77, 1, 300), (600, 700, 35, 77, 1200, 900),
         "bfloat16", max_rel_error=1e-2, kv_cache="fp8", kv_scales=(0.37, 1.9)),
    Case("mixed_window_softcap_bf16_bs32_fp8kv", 16, 4, 128, 32, (1, 130, 1, 64), (900, 500, 260, 64), "bfloat16",
         sliding_window=128, softcap=50.0, max_rel_error=1e-2, kv_cache="fp8", kv_scales=(2.0, 0.5)),
]


@dataclass
class Batch:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    metadata: AttentionMetadata
    group: GroupAttentionMetadata
    forbidden_blocks: torch.Tensor  # block ids that nothing in this step may read
    kv_scales: torch.Tensor | None = None  # [2] float32 (k_scale, v_scale) of an FP8 cache


def same_bytes_mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    """Entries whose stored bits differ (NaN equals NaN: the poisoned blocks)."""
    if a.dtype == torch.float8_e4m3fn:
        return (a.view(torch.uint8) != b.view(torch.uint8)).sum().item()
    return ((a != b) & ~(a.isnan() & b.isnan())).sum().item()


def build_batch(case: Case, device: torch.device, seed: int) -> Batch:
    """A random packed batch over a shuffled paged cache; the new tokens are not yet written."""
    generator = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    block_size = case.block_size
    blocks_needed = [-(-seq_len // block_size) for seq_len in case.seq_lens]
    num_forbidden = 3
    num_blocks = sum(blocks_needed) + num_forbidden + 2
    permutation = torch.randperm(num_blocks, generator=generator)
    live_ids = permutation[: sum(blocks_needed)].tolist()
    forbidden = permutation[sum(blocks_needed) : sum(blocks_needed) + num_forbidden]

    max_blocks = max(blocks_needed) + 2  # padding columns past every sequence's end
    block_tables = forbidden[torch.randint(num_forbidden, (len(case.seq_lens), max_blocks), generator=generator)]
    cursor = 0
    for seq, (seq_len, query_len) in enumerate(zip(case.seq_lens, case.query_lens)):
        row = live_ids[cursor : cursor + blocks_needed[seq]]
        cursor += blocks_needed[seq]
        if case.sliding_window is not None:
            # Blocks wholly before the first position this step's earliest query can see were recycled.
            first_visible = seq_len - query_len - case.sliding_window + 1
            for index in range(len(row)):
                if (index + 1) * block_size <= first_visible:
                    row[index] = forbidden[torch.randint(num_forbidden, (1,), generator=generator)].item()
        block_tables[seq, : len(row)] = torch.tensor(row)

    slots = []
    for seq, (seq_len, query_len) in enumerate(zip(case.seq_lens, case.query_lens)):
        for position in range(seq_len - query_len, seq_len):
            slots.append(block_tables[seq, position // block_size].item() * block_size + position % block_size)
    num_tokens = sum(case.query_lens)
    shape_kv = (num_tokens, case.num_kv_heads, case.head_dim)
    cache_shape = (num_blocks, block_size, case.num_kv_heads, case.head_dim)
    query_start_loc = torch.zeros(len(case.query_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(torch.tensor(case.query_lens), 0)
    metadata = AttentionMetadata(
        query_start_loc=query_start_loc.to(device),
        seq_lens=torch.tensor(case.seq_lens, dtype=torch.int32, device=device),
        max_query_len=max(case.query_lens),
        max_seq_len=max(case.seq_lens),
        block_size=block_size,
        groups=[],
        query_lens_cpu=list(case.query_lens),
        seq_lens_cpu=list(case.seq_lens),
    )
    group = GroupAttentionMetadata(
        block_tables=block_tables.to(torch.int32).to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
    )
    metadata.groups.append(group)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype).to(device)

    def random_cache() -> torch.Tensor:
        values = random(*cache_shape)
        return values if case.kv_cache == "model" else values.float().to(torch.float8_e4m3fn)

    kv_scales = None
    if case.kv_scales is not None:
        kv_scales = torch.tensor(case.kv_scales, dtype=torch.float32, device=device)
    return Batch(
        query=random(num_tokens, case.num_heads, case.head_dim),
        key=random(*shape_kv),
        value=random(*shape_kv),
        key_cache=random_cache(),
        value_cache=random_cache(),
        metadata=metadata,
        group=group,
        forbidden_blocks=forbidden.to(device),
        kv_scales=kv_scales,
    )


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check_triton_case(case: Case, device: torch.device, seed: int = 0) -> dict[str, float]:
    """Run one case through Triton and the reference; return the errors (NaN if anything is unwritten)."""
    from pagedserve.engine.kernels.attention.triton import TileConfig, TritonAttentionBackend

    class PoisonedBuffersBackend(TritonAttentionBackend):
        def _empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)

    batch = build_batch(case, device, seed)
    reference = ReferenceAttentionBackend()
    tile = None if case.tile is None else TileConfig(case.tile[0], case.tile[1], num_warps=4, num_stages=2)
    triton_backend = PoisonedBuffersBackend(num_kv_splits=case.num_kv_splits, decode_config=tile, prefill_config=tile)

    ref_key_cache, ref_value_cache = batch.key_cache.clone(), batch.value_cache.clone()
    reference.write_kv(ref_key_cache, ref_value_cache, batch.key, batch.value, batch.group.slot_mapping,
                       batch.kv_scales)
    # Non-contiguous key/value views, as a fused QKV projection would hand over.
    fused = torch.cat([batch.key, batch.value], dim=1)
    key_view, value_view = fused[:, : case.num_kv_heads], fused[:, case.num_kv_heads :]
    key_cache, value_cache = batch.key_cache.clone(), batch.value_cache.clone()
    triton_backend.write_kv(key_cache, value_cache, key_view, value_view, batch.group.slot_mapping, batch.kv_scales)
    write_error = max(same_bytes_mismatches(key_cache, ref_key_cache), same_bytes_mismatches(value_cache, ref_value_cache))

    kwargs = dict(scale=case.head_dim**-0.5, sliding_window=case.sliding_window, softcap=case.softcap,
                  kv_scales=batch.kv_scales)
    ref = reference.forward(batch.query, ref_key_cache, ref_value_cache, batch.metadata, batch.group, **kwargs)
    # Now make every block nothing may read poisonous: a read of one would make the output NaN.
    key_cache[batch.forbidden_blocks] = float("nan")
    value_cache[batch.forbidden_blocks] = float("nan")
    out = triton_backend.forward(batch.query, key_cache, value_cache, batch.metadata, batch.group, **kwargs)

    # The layer's call: write and attend in one (decode steps store the new K/V inside the kernel).
    fused_key_cache, fused_value_cache = batch.key_cache.clone(), batch.value_cache.clone()
    fused_key_cache[batch.forbidden_blocks] = float("nan")
    fused_value_cache[batch.forbidden_blocks] = float("nan")
    fused_out = triton_backend.write_kv_and_forward(batch.query, key_view, value_view, fused_key_cache,
                                                    fused_value_cache, batch.metadata, batch.group, **kwargs)
    fused_write_error = max(same_bytes_mismatches(fused_key_cache, key_cache),
                            same_bytes_mismatches(fused_value_cache, value_cache))
    return {
        "fused_rel_error": relative_error(fused_out, ref),
        "fused_is_finite": bool(torch.isfinite(fused_out).all().item()),
        "fused_write_mismatches": float(fused_write_error),
        "rel_error": relative_error(out, ref),
        "is_finite": bool(torch.isfinite(out).all().item()),
        "write_mismatches": float(write_error),
        "shape_ok": float(out.shape == ref.shape and out.dtype == ref.dtype),
    }


def assert_case_result(case: Case, result: dict[str, float]) -> None:
    assert result["write_mismatches"] == 0, f"{case.name}: write_kv differs from reference: {result}"
    assert result["shape_ok"] == 1.0, f"{case.name}: wrong output shape or dtype"
    assert result["is_finite"], f"{case.name}: NaN in output (an unwritten row or a forbidden block read)"
    assert result["rel_error"] < case.max_rel_error, f"{case.name}: {result}"
    assert result["fused_write_mismatches"] == 0, f"{case.name}: write_kv_and_forward's cache differs: {result}"
    assert result["fused_is_finite"], f"{case.name}: NaN in write_kv_and_forward's output"
    assert result["fused_rel_error"] < case.max_rel_error, f"{case.name}: {result}"


@pytest.fixture(scope="module", name="interpreter_results")
def interpreter_results_fixture() -> dict[str, dict[str, float]]:
    """Every CPU case, run once in a subprocess under TRITON_INTERPRET=1."""
    return interpreter_results(__file__)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda case: case.name)
def test_triton_matches_reference_in_interpreter(case: Case, interpreter_results: dict[str, dict[str, float]]) -> None:
    assert_case_result(case, interpreter_results[case.name])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", CPU_CASES + GPU_CASES, ids=lambda case: case.name)
def test_triton_matches_reference_on_gpu(case: Case) -> None:
    for seed in range(2):
        assert_case_result(case, check_triton_case(case, torch.device("cuda"), seed))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_new_batch_shapes_compile_no_new_kernel_variant() -> None:
    """Steps differ in sequence count and block-table width; Triton would compile a variant for each new
    pattern of such integers (== 1, multiple of 16), inside whichever step met it first."""
    from pagedserve.engine.kernels.attention.triton import TritonAttentionBackend, _paged_attention_kernel

    def variants() -> int:
        return sum(len(caches[0]) for caches in _paged_attention_kernel.device_caches.values())

    backend = TritonAttentionBackend(num_kv_splits=2)  # one split setting throughout: a constexpr
    # (sequence count, context) giving block-table widths 17, 16 and 32 (block 16, two padding columns).
    shapes = [(17, 240), (16, 224), (1, 480), (5, 240)]
    for query_len in (1, 5):  # decode steps, then prefill chunks (a different constexpr set each)
        for index, (num_seqs, context) in enumerate(shapes):
            case = Case("shape", 32, 8, 128, 16, (query_len,) * num_seqs, (context,) * num_seqs, "bfloat16")
            batch = build_batch(case, torch.device("cuda"), seed=index)
            backend.forward(batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.group,
                            scale=128**-0.5, sliding_window=None, softcap=None)
            if index == 0:
                first = variants()
        assert variants() == first, f"query length {query_len}: {variants() - first} variants compiled mid-run"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_auto_picks_triton_on_cuda() -> None:
    from pagedserve.engine.runner.platform import detect_platform

    platform = detect_platform()
    assert (platform.triton_unavailable_reason == "") == HAS_TRITON
    assert resolved(EngineConfig(), cuda=True).runner.attention_backend == "triton"


def test_registry_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert get_attention_backend("reference", cpu).name == "reference"
    assert resolved(EngineConfig()).runner.attention_backend == "reference"
    with pytest.raises(ValueError, match="'triton' is unavailable"):
        get_attention_backend("triton", cpu)
    with pytest.raises(ValueError, match="'flash_paged' is unavailable: FlashAttention 4 needs a CUDA device"):
        get_attention_backend("flash_paged", cpu)
    for name in ("auto", "fast", "flex"):  # auto is decided by config/resolve.py; the rest are not built
        with pytest.raises(ValueError, match="must be one of"):
            get_attention_backend(name, cpu)
    assert set(BACKEND_NAMES) == {"reference", "triton", "flash_paged"}


def test_reference_reads_no_forbidden_block_values_in_padding() -> None:
    """The builder's own invariant: live table entries never point at forbidden blocks."""
    case = CPU_CASES[2]
    batch = build_batch(case, torch.device("cpu"), seed=1)
    forbidden = set(batch.forbidden_blocks.tolist())
    for seq, (seq_len, query_len) in enumerate(zip(case.seq_lens, case.query_lens)):
        first_visible = max(0, seq_len - query_len - case.sliding_window + 1)
        for index in range(first_visible // case.block_size, -(-seq_len // case.block_size)):
            assert batch.group.block_tables[seq, index].item() not in forbidden


def _interpreter_worker() -> None:
    torch.set_num_threads(1)
    results = {case.name: check_triton_case(case, torch.device("cpu")) for case in CPU_CASES}
    print(json.dumps(results))


if __name__ == "__main__" and WORKER_FLAG in sys.argv:
    _interpreter_worker()
