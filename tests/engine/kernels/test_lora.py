"""The grouped LoRA kernels (shrink, then expand, rows grouped by adapter slot) against the PyTorch reference.

On CPU the Triton kernels run under TRITON_INTERPRET=1 in a subprocess (tests/triton_interpreter.py); the
interpreter's tl.dot mishandles bf16, so float32 and float16 are checked there.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Any

import pytest
import torch

from pagedserve.engine.kernels.lora import LoraStepIndex, lora_add_reference, shrink_splits, slot_segments
from triton_interpreter import WORKER_FLAG, interpreter_results

HAS_TRITON = importlib.util.find_spec("triton") is not None

# (token slots, slots, slice sizes, in_features, rank, dtype): -1 rows are the base model's.
INTERPRETER_CASES = {
    # Base and three adapters interleaved over a fused q/k/v-like layer (three slices, ragged sizes).
    "mixed_fused_fp32": ([-1, 0, 2, 1, 0, -1, 2, 2, 1, 0, -1, 1, 0, 2, 0, 0, 1, -1, 2, 0, 1], 3, [24, 8, 8], 40, 8,
                         "float32"),
    # One decode row on the second of two slots, one slice of 70 features over 64 inputs.
    "one_row_fp16": ([1], 2, [70], 64, 16, "float16"),
    # More rows of one adapter than a row tile holds (17 > 16), next to base rows.
    "long_segment_fp32": ([0] * 17 + [-1] * 3, 2, [16, 16], 32, 4, "float32"),
    # Two decode rows over 200 inputs: the shrink's K in 4 splits, the last one ragged (200 = 3 * 64 + 8), added
    # by the expand (tiles of 16 rows).
    "split_k_fp32": ([-1, 1, 0], 2, [24], 200, 8, "float32"),
    # 20 rows (tiles of 32) over 256 inputs: 4 splits, summed before the expand.
    "split_k_summed_fp32": ([0, 1, -1, 1] * 5, 2, [16, 8], 256, 4, "float32"),
    # 300 rows in tiles of 64: three tiles of one slot, one of another, base rows between (tile table).
    "many_tiles_fp32": ([1] * 150 + [-1] * 85 + [0] * 65, 2, [16], 32, 4, "float32"),
}


def run_case(token_slots, num_slots, slice_sizes, in_features, rank, dtype_name) -> dict[str, float]:
    from pagedserve.engine.kernels.lora import lora_add_triton

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(len(token_slots) * 31 + in_features)
    num_rows, out_features = len(token_slots), sum(slice_sizes)
    x = torch.randn(num_rows, in_features, generator=generator).to(dtype)
    out = torch.randn(num_rows, out_features, generator=generator).to(dtype)
    lora_a = (torch.randn(num_slots, len(slice_sizes) * rank, in_features, generator=generator) / 4).to(dtype)
    lora_b = (torch.randn(num_slots, out_features, rank, generator=generator) / 4).to(dtype)
    slots = torch.tensor(token_slots, dtype=torch.int32)
    expected = out.clone()
    lora_add_reference(x, expected, lora_a, lora_b, slot_segments(slots), slice_sizes, rank)
    starts = torch.tensor([0] + torch.tensor(slice_sizes).cumsum(0).tolist(), dtype=torch.int32)
    lora_add_triton(x, out, lora_a, lora_b, LoraStepIndex.build(slots, num_slots), starts, max(slice_sizes), rank)
    base_rows = slots < 0
    return {"max_error": (out.float() - expected.float()).abs().max().item(),
            "base_rows_changed": float(base_rows.any() and (out[base_rows] != expected[base_rows]).any())}


def engine_tokens() -> dict[str, Any]:
    """The engine on a tiny 1-layer Llama with three adapters (two device slots) and the base mixed in
    16-token steps, its LoRA layers through the Triton kernels (interpreted here) and through the reference:
    greedy tokens of each, for the test to compare (the reference path equals peft's merged models:
    tests/engine/runner/test_lora.py)."""
    import tempfile
    from pathlib import Path
    from unittest import mock

    import pagedserve.engine.kernels.lora as lora_kernels
    import pagedserve.engine.runner.lora as lora_runner
    from pagedserve.engine.core.request import SamplingParams
    from pagedserve.engine.llm import LLM
    from safetensors.torch import save_file
    from tiny_models import make_tokenizer, tiny_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama", num_hidden_layers=1)).eval()
    linears = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in lora_runner.LORA_TARGET_MODULES}
    folder = Path(tempfile.mkdtemp(prefix="lora-interpreter-"))
    paths = {}
    for index, rank in enumerate((4, 8, 8)):
        generator = torch.Generator().manual_seed(index)
        tensors = {}
        for name, linear in linears.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(
                rank, linear.in_features, generator=generator) / linear.in_features ** 0.5
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(
                linear.out_features, rank, generator=generator) / 2
        paths[f"adapter-{index}"] = folder / f"adapter-{index}"
        paths[f"adapter-{index}"].mkdir()
        save_file(tensors, paths[f"adapter-{index}"] / "adapter_model.safetensors")
        (paths[f"adapter-{index}"] / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 8}))
    names = ["adapter-0", None, "adapter-1", "adapter-2"]
    prompts = [[3 + (5 * i + 7 * j) % 250 for j in range(5 + 4 * i)] for i in range(len(names))]
    tokens: dict[str, Any] = {}
    for mode in ("reference", "triton"):
        with mock.patch.object(lora_kernels, "uses_triton", lambda x: mode == "triton"), \
                mock.patch.object(lora_runner, "uses_triton", lambda x: mode == "triton"), \
                mock.patch.object(lora_kernels, "lora_add_triton", wraps=lora_kernels.lora_add_triton) as kernels:
            llm = LLM.from_model(model, make_tokenizer(), lora_modules={k: str(v) for k, v in paths.items()},
                                 max_loras=2, max_lora_rank=8, block_size=8, max_batch_tokens=16)
            outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False, lora=names)
            tokens[mode] = [o.outputs[0].token_ids for o in outputs]
            tokens[f"{mode}_kernel_calls"] = kernels.call_count
            if mode == "reference":  # every prompt on the base model: the adapters' rows must differ from it
                tokens["base"] = [o.outputs[0].token_ids for o in llm.generate(
                    prompts, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)]
            llm.engine.shutdown()
    return tokens


def _interpreter_worker() -> None:
    results = {name: run_case(*case) for name, case in INTERPRETER_CASES.items()}
    results["engine"] = engine_tokens()
    print(json.dumps(results))


@pytest.fixture(scope="module", name="interpreter_results")
def interpreter_results_fixture() -> dict[str, dict[str, float]]:
    return interpreter_results(__file__)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", list(INTERPRETER_CASES))
def test_grouped_kernels_match_reference_in_interpreter(name: str, interpreter_results: dict) -> None:
    result = interpreter_results[name]
    tolerance = 1e-4 if INTERPRETER_CASES[name][-1] == "float32" else 2e-2
    assert result["max_error"] < tolerance, result
    assert result["base_rows_changed"] == 0.0


@pytest.mark.parametrize("tiles, in_features, want_splits", [
    (1, 14336, 32),  # batch 1 at the 8B down projection: 224 K tiles in 32 ranges of 7
    (1, 4096, 32), (8, 4096, 32), (16, 4096, 16), (128, 4096, 2),
    (256, 4096, 1),  # a long prompt: tiles enough without splitting
    (1, 200, 4),  # 4 K tiles of 64, the last ragged
])
def test_shrink_splits_cover_k_with_no_empty_split(tiles: int, in_features: int, want_splits: int) -> None:
    splits, k_per_split = shrink_splits(tiles, in_features, 64)
    assert splits == want_splits and k_per_split % 64 == 0
    assert (splits - 1) * k_per_split < in_features <= splits * k_per_split


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_engine_through_the_kernels_matches_the_reference_path_in_interpreter(interpreter_results: dict) -> None:
    """Slots, strides, fused slices and the per-step grouping as the engine uses them, in eager steps."""
    tokens = interpreter_results["engine"]
    assert tokens["triton_kernel_calls"] > 0 and tokens["reference_kernel_calls"] == 0
    assert tokens["triton"] == tokens["reference"]
    assert tokens["triton"][1] == tokens["base"][1]  # the base row
    assert all(tokens["triton"][i] != tokens["base"][i] for i in (0, 2, 3)), tokens


def test_step_index_groups_rows_by_slot() -> None:
    slots = torch.tensor([2, -1, 0, 2, -1, 0, 0], dtype=torch.int32)
    index = LoraStepIndex.build(slots, num_slots=4)
    assert index.slot_counts.tolist() == [3, 0, 2, 0]
    # Base rows first (2 of them), then slot 0's rows at 2, slot 2's at 5.
    assert index.slot_starts.tolist() == [2, 5, 5, 7]
    sorted_ids = index.sorted_ids.tolist()
    assert sorted_ids[2:5] == [2, 5, 6] and sorted_ids[5:7] == [0, 3]
    # Tiles of 16 rows (7 rows): slot 0's one, slot 2's one; the table has cdiv(7, 16) + 4 entries.
    assert index.tile_slots.tolist() == [0, 2, -1, -1, -1] and index.tile_rows.tolist()[:2] == [0, 0]


def test_step_index_cuts_each_slots_rows_into_tiles() -> None:
    """300 rows (tiles of 64): slot 1 with 150 rows takes 3 tiles, slot 3 with 64 one, slot 0 with 1 one; the
    base's 85 none. The table (cdiv(300, 64) + 4 = 9 entries) lists them slot by slot, then -1."""
    slots = torch.tensor([1] * 150 + [-1] * 85 + [3] * 64 + [0], dtype=torch.int32)
    index = LoraStepIndex.build(slots[torch.randperm(300, generator=torch.Generator().manual_seed(0))], num_slots=4)
    assert index.tile_slots.tolist() == [0, 1, 1, 1, 3, -1, -1, -1, -1]
    assert index.tile_rows.tolist()[:5] == [0, 0, 64, 128, 0]


def test_reference_adds_each_slots_update_to_its_rows_only() -> None:
    torch.manual_seed(0)
    x, out = torch.randn(4, 6), torch.zeros(4, 5)
    lora_a, lora_b = torch.randn(2, 2 * 3, 6), torch.randn(2, 5, 3)  # two slices (3 and 2 features), rank 3
    lora_add_reference(x, out, lora_a, lora_b, slot_segments(torch.tensor([1, -1, 0, 1])), [3, 2], 3)
    for row, slot in ((0, 1), (2, 0), (3, 1)):
        inter = lora_a[slot] @ x[row]
        want = torch.cat([lora_b[slot, :3] @ inter[:3], lora_b[slot, 3:] @ inter[3:]])
        torch.testing.assert_close(out[row], want)
    assert not out[1].any()


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_grouped_kernels_on_gpu_at_the_8b_qkv_shape(dtype_name: str) -> None:
    """Written for the GPU session, not yet run there: 300 rows over 8 slots and the base, Llama-3-8B's fused
    q/k/v (4096 -> 4096 + 1024 + 1024), rank 16, against the reference in float32."""
    from pagedserve.engine.kernels.lora import lora_add_triton

    dtype, device = getattr(torch, dtype_name), torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    slice_sizes, in_features, rank, num_slots = [4096, 1024, 1024], 4096, 16, 8
    slots = torch.randint(-1, num_slots, (300,), generator=generator, dtype=torch.int32)
    x = torch.randn(300, in_features, generator=generator).to(device, dtype)
    out = torch.randn(300, sum(slice_sizes), generator=generator).to(device, dtype)
    lora_a = (torch.randn(num_slots, 3 * rank, in_features, generator=generator) / 64).to(device, dtype)
    lora_b = (torch.randn(num_slots, sum(slice_sizes), rank, generator=generator) / 4).to(device, dtype)
    expected = out.float()
    lora_add_reference(x.float(), expected, lora_a.float(), lora_b.float(), slot_segments(slots.to(device)),
                       slice_sizes, rank)
    starts = torch.tensor([0, 4096, 5120, 6144], dtype=torch.int32, device=device)
    lora_add_triton(x, out, lora_a, lora_b, LoraStepIndex.build(slots.to(device), num_slots), starts, 4096, rank)
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=2e-2)


if __name__ == "__main__" and WORKER_FLAG in sys.argv:
    _interpreter_worker()


def test_a_compiled_reader_of_the_step_index_takes_its_row_count_as_dynamic():
    """A step's row count changes every step: a compiled function reading the index compiles one graph for
    all of them, not a static one first and a recompile on the next step's count."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    @torch.compile(backend=counter)
    def gather(index: LoraStepIndex, x: torch.Tensor) -> torch.Tensor:
        return x[index.sorted_ids.long()] * (index.token_slots[:, None] + 2)

    torch._dynamo.reset()
    x = torch.randn(16, 4)  # one size: only the index's row count changes
    for rows in (3, 5, 9):
        slots = torch.tensor([(-1, 0, 1)[i % 3] for i in range(rows)])
        gather(LoraStepIndex.build(slots, 2), x)
    assert counter.frame_count == 1
