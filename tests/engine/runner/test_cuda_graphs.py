"""The packed decode inputs of the CUDA graphs (`DecodeInputs`): what one host->device copy carries.

Checked on the CPU (the same code runs with a pinned host buffer and a CUDA device buffer); the graphs
that read these views are checked on a GPU (tests marked gpu: Triton + graphs give the reference tokens).
"""

from __future__ import annotations

import pytest
import torch
from pagedserve.engine.runner.cuda_graphs import DecodeInputs
from pagedserve.engine.runner.step_input import StepInput

BLOCK_SIZE = 4


def _decode_step(tables: list[list[list[int]]], positions: list[int], token_ids: list[int], **pending) -> StepInput:
    batch = len(positions)
    return StepInput(
        token_ids=token_ids, positions=positions, query_lens=[1] * batch, seq_lens=[p + 1 for p in positions],
        block_tables=tables, logits_indices=list(range(batch)), **pending,
    )


def test_one_copy_carries_every_input_and_pads_the_rest() -> None:
    inputs = DecodeInputs(max_batch_size=8, num_groups=2, max_blocks=6, device=torch.device("cpu"))
    full = [[3, 7, 9], [1, 2], [11, 12, 13, 14]]
    window = [[0, 7, 9], [1, 2], [0, 0, 13, 14]]  # a sliding-window group: released blocks are 0
    positions = [9, 5, 14]
    inputs.pack(_decode_step([full, window], positions, [101, 102, 103]), padded=4, block_size=BLOCK_SIZE,
                pending_on_device=True)
    views = inputs.device
    assert views.ids[:3].tolist() == [101, 102, 103]
    assert views.positions[:4].tolist() == [9, 5, 14, 0]
    assert views.seq_lens[:4].tolist() == [10, 6, 15, 1]  # the padding row: a one-token context
    assert views.pending[:4].tolist() == [-1] * 4
    for group, tables in enumerate([full, window]):
        for row, blocks in enumerate(tables):
            assert views.tables[group][row, : len(blocks)].tolist() == blocks
        expected = [tables[row][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for row, p in enumerate(positions)]
        assert views.slots[group][:4].tolist() == expected + [-1]  # padding writes nothing
    assert views.tables[0].dtype == views.seq_lens.dtype == torch.int32
    assert views.slots[0].dtype == views.ids.dtype == torch.int64


def test_a_smaller_step_after_a_larger_one_and_pending_rows() -> None:
    inputs = DecodeInputs(max_batch_size=4, num_groups=1, max_blocks=5, device=torch.device("cpu"))
    inputs.pack(_decode_step([[[1, 2, 3], [4, 5], [6], [7]]], [9, 6, 2, 1], [1, 2, 3, 4]), padded=4,
                block_size=BLOCK_SIZE, pending_on_device=True)
    # Two rows now; row 1's token is still on the device: row 0 of the previous step's samples.
    step = _decode_step([[[8, 9], [4, 5]]], [5, 7], [55, -1], pending_input_indices=[1], pending_source_rows=[0])
    inputs.pack(step, padded=2, block_size=BLOCK_SIZE, pending_on_device=True)
    views = inputs.device
    assert views.ids[:2].tolist()[0] == 55
    assert views.pending[:2].tolist() == [-1, 0]
    assert views.seq_lens[:2].tolist() == [6, 8]
    assert views.tables[0][0, :2].tolist() == [8, 9] and views.tables[0][1, :2].tolist() == [4, 5]
    assert views.slots[0][:2].tolist() == [9 * BLOCK_SIZE + 1, 5 * BLOCK_SIZE + 3]
    # Gathered outside the graph instead: the pending row stays -1 for the graph.
    inputs.pack(step, padded=2, block_size=BLOCK_SIZE, pending_on_device=False)
    assert inputs.device.pending[:2].tolist() == [-1, -1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_graph_steps_take_the_device_tokens_in_and_outside_the_graph(tiny_model_dir, arch) -> None:
    """Async scheduling feeds each decode step the previous step's tokens on the device: gathered inside
    the graph, or before it when the previous step sampled more rows than the largest graph (here 3 rows,
    then 2 once the first request ended). Greedy tokens equal those of eager steps (fp32)."""
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.core.request import SamplingParams

    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], list(range(20, 47))]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (1, 12, 9)]

    def run(**extra) -> list[list[int]]:
        llm = LLM(str(tiny_model_dir(arch)), dtype="float32", device="cuda", block_size=8, max_num_seqs=4,
                  compile=False, **extra)
        assert llm.engine.async_scheduling
        assert (llm.engine.runner._decode_graphs is not None) == extra.get("enable_cuda_graphs", True)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    assert run(cuda_graph_max_batch_size=2) == run(enable_cuda_graphs=False)


def test_a_greedy_chain_writes_only_the_slots_its_sequences_were_given(tiny_model_dir) -> None:
    """GreedyChainGraphs (a draft model's proposal round in one graph; its proposals are checked against eager
    rounds in tests/engine/spec/test_speculative_engine.py): a sequence that wants fewer tokens than the chain
    computes writes nothing past its last proposal and reads no table entry past its blocks, though its table row
    holds stale block ids there. Here A (8 tokens, blocks 3 and 5, both full) wants 1 token: only its catch-up
    writes; B (10 tokens, blocks 1, 2, 6) wants 3: its catch-up and rounds 1-2 write, round 3 does not."""
    from graph_like_attention import GraphLikeReference
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.runner.cuda_graphs import GreedyChainGraphs

    # On the CPU on any machine: off CUDA the chain's "graph" reruns its forward over the static inputs.
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu", block_size=BLOCK_SIZE, num_blocks=16)
    runner = llm.engine.runner
    runner.backend = GraphLikeReference()
    a_tokens, b_tokens = [5, 9, 33, 7, 81, 12, 40, 41], [60, 61, 62, 63, 60, 61, 62, 63, 60, 61]
    step = StepInput(token_ids=a_tokens[7:] + b_tokens[7:], positions=[7, 7, 8, 9], query_lens=[1, 3],
                     seq_lens=[8, 10], block_tables=[[[3, 5], [1, 2, 6]]], logits_indices=[0, 3])
    unwritten = 0.125  # finite: the context the writes attend to holds it

    def run(rounds: int) -> list[torch.Tensor]:
        """The caches after a chain of `rounds` over `step`, each as [slot, values]."""
        chain = GreedyChainGraphs(runner, 2, llm.engine.max_model_len, query_len=4, rounds=rounds,
                                  pick=lambda logits: logits.argmax(1))
        chain.capture()
        # Stale entries past A's blocks (7, 8) and B's (9) in the packed tables.
        stale = StepInput(token_ids=[1, 2], positions=[4, 4], query_lens=[1, 1], seq_lens=[5, 5],
                          block_tables=[[[3, 5, 7, 8], [1, 2, 6, 9]]], logits_indices=[0, 1])
        chain.run_chain(stale, [1, 1])
        for key_cache, value_cache in runner.kv_caches:
            key_cache.fill_(unwritten)
            value_cache.fill_(unwritten)
        assert chain.run_chain(step, [1, 3]).shape == (rounds + 1, 2)
        # [blocks, block_size, heads, dim] -> [slot, heads * dim]
        return [cache.reshape(-1, BLOCK_SIZE, *cache.shape[2:]).flatten(2).flatten(0, 1).clone()
                for pair in runner.kv_caches for cache in pair]

    catch_up = {5 * BLOCK_SIZE + 3, 2 * BLOCK_SIZE + 3, 6 * BLOCK_SIZE, 6 * BLOCK_SIZE + 1}
    rounds = {6 * BLOCK_SIZE + 2, 6 * BLOCK_SIZE + 3}  # B's proposals 1 and 2 at positions 10 and 11
    alone = run(0)
    for cache, cache_alone in zip(run(3), alone):
        assert set(torch.nonzero((cache != unwritten).any(dim=1)).flatten().tolist()) == catch_up | rounds
        # The rounds left the catch-up's K/V as it was (a round past a sequence's proposals writes nothing).
        for slot in catch_up:
            torch.testing.assert_close(cache[slot], cache_alone[slot])
