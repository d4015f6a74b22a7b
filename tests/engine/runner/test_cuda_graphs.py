"""The packed decode inputs of the CUDA graphs (`DecodeInputs`): what one host->device copy carries.

Checked on the CPU (the same code runs with a pinned host buffer and a CUDA device buffer); the graphs
that read these views are checked on a GPU (tests marked gpu: Triton + graphs give the reference tokens).
"""

from __future__ import annotations

import pytest
import torch
from pagedserve.engine.runner.cuda_graphs import DecodeInputs, MixedGraphs, MixedInputs, mixed_capture_sizes
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


def test_mixed_inputs_pad_tokens_into_a_sequence_of_their_own() -> None:
    """A step with prompt tokens packed for a graph of 16 tokens and 8 sequences: its 7 tokens, then 9 padding
    tokens as one more sequence (positions 0.., nothing written, its table row block 0), then empty sequences."""
    inputs = MixedInputs(max_tokens=32, max_seqs=9, num_groups=1, max_blocks=6, device=torch.device("cpu"))
    tables = [[[3, 7, 9], [1, 2], [11, 12, 13, 14]]]
    # A decode at position 9, a 5-token prompt chunk at 0..4, a decode at 14 whose token is still on the device.
    step = StepInput(token_ids=[101, 201, 202, 203, 204, 205, -1], positions=[9, 0, 1, 2, 3, 4, 14],
                     query_lens=[1, 5, 1], seq_lens=[10, 5, 15], block_tables=tables, logits_indices=[0, 5, 6],
                     pending_input_indices=[6], pending_source_rows=[2])
    inputs.pack(step, padded_tokens=16, padded_seqs=8, block_size=BLOCK_SIZE, pending_on_device=True)
    views = inputs.device
    assert views.ids[:6].tolist() == [101, 201, 202, 203, 204, 205] and views.ids[7:16].tolist() == [0] * 9
    assert views.positions[:16].tolist() == [9, 0, 1, 2, 3, 4, 14] + list(range(9))
    assert views.pending[:16].tolist() == [-1] * 6 + [2] + [-1] * 9
    assert views.query_start_loc[:9].tolist() == [0, 1, 6, 7, 16, 16, 16, 16, 16]
    assert views.seq_lens[:8].tolist() == [10, 5, 15, 9, 0, 0, 0, 0]
    assert views.logits_rows[:8].tolist() == [0, 5, 6, 0, 0, 0, 0, 0]
    expected = [9 * BLOCK_SIZE + 1] + [1 * BLOCK_SIZE + p for p in range(4)] + [2 * BLOCK_SIZE] + [14 * BLOCK_SIZE + 2]
    assert views.slots[0][:16].tolist() == expected + [-1] * 9
    assert views.tables[0][3, :3].tolist() == [0, 0, 0]  # the padding sequence's 9 tokens: 3 blocks of 4
    # A smaller step after it: nothing of the first is left where the second reads.
    small = StepInput(token_ids=[7, 8, 9], positions=[0, 1, 2], query_lens=[3], seq_lens=[3],
                      block_tables=[[[5]]], logits_indices=[2])
    inputs.pack(small, padded_tokens=16, padded_seqs=8, block_size=BLOCK_SIZE, pending_on_device=True)
    assert views.query_start_loc[:9].tolist() == [0, 3] + [16] * 7
    assert views.seq_lens[:8].tolist() == [3, 13, 0, 0, 0, 0, 0, 0]
    assert views.pending[:16].tolist() == [-1] * 16
    assert views.slots[0][:16].tolist() == [5 * BLOCK_SIZE + p for p in range(3)] + [-1] * 13


def test_mixed_capture_sizes_bound_the_padding() -> None:
    sizes = mixed_capture_sizes(2560)
    assert sizes[:5] == [16, 32, 64, 128, 192] and sizes[-1] == 2560
    assert all(0 < (b - a) / a <= 1 for a, b in zip(sizes, sizes[1:]))
    assert all((b - a) / a <= 0.34 for a, b in zip(sizes, sizes[1:]) if a >= 192)
    assert mixed_capture_sizes(100) == [16, 32, 64, 100] and mixed_capture_sizes(16) == [16]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_steps_with_prompt_tokens_in_graphs_equal_eager(tiny_model_dir, arch) -> None:
    """Steps with prompt tokens replay `MixedGraphs` (off CUDA a "graph" reruns its forward over the padded static
    inputs, so the padded layout is what is checked): chunked prompts beside decodes, with the previous step's
    tokens gathered on the device (async scheduling), give eager's greedy tokens and logprobs; windows and
    soft-capping (gemma2) included."""
    import collections

    from graph_like_attention import GraphLikeReference
    from pagedserve.engine.core.request import SamplingParams
    from pagedserve.engine.llm import LLM

    prompts = [list(range(5, 5 + n)) for n in (23, 9, 41, 3, 17)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)

    def run(graphs: bool):
        llm = LLM(str(tiny_model_dir(arch)), dtype="float32", device="cpu", block_size=BLOCK_SIZE, num_blocks=96,
                  max_batch_tokens=24, max_num_seqs=4)
        runner = llm.engine.runner
        runner.backend = GraphLikeReference()
        replays = collections.Counter()
        if graphs:
            mixed = MixedGraphs(runner, 24, 4, llm.engine.max_model_len)
            mixed.capture()
            run_graph = mixed.run

            def counted(step, previous_tokens=None):
                replays[len(step.token_ids), bool(step.pending_input_indices)] += 1
                return run_graph(step, previous_tokens)

            mixed.run = counted
            runner._mixed_graphs = mixed
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.get_stats().num_free_blocks == llm.engine.get_stats().num_total_blocks
        return outputs, replays

    reference, _ = run(graphs=False)
    outputs, replays = run(graphs=True)
    for out, ref in zip(outputs, reference):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        for got, want in zip(out.outputs[0].logprobs, ref.outputs[0].logprobs):
            assert got.keys() == want.keys()
            for token_id in got:
                assert got[token_id].logprob == pytest.approx(want[token_id].logprob, abs=1e-4)
    # Steps ran from graphs, padded (captured sizes 16 and 24: a step of fewer than 16 or of 17-23 tokens takes
    # padding) and not, some with a token still on the device.
    assert any(tokens not in (16, 24) for tokens, _ in replays), replays
    assert any(tokens in (16, 24) for tokens, _ in replays), replays
    assert any(pending for _, pending in replays), replays


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_layers", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_steps_with_prompt_tokens_replay_graphs_on_gpu(tiny_model_dir, arch, compile_layers) -> None:
    """Triton attention, captured mixed-step graphs (chunked prompts beside decodes, async scheduling) and,
    optionally, compiled layers: greedy tokens in float32 equal those of eager steps, and graphs did replay."""
    from pagedserve.engine.core.request import SamplingParams
    from pagedserve.engine.llm import LLM

    prompts = [list(range(5, 5 + n)) for n in (23, 9, 141, 3, 67, 30)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)

    def run(mixed_tokens: int) -> tuple[list[list[int]], int]:
        llm = LLM(str(tiny_model_dir(arch)), dtype="float32", device="cuda", block_size=8, max_num_seqs=4,
                  max_batch_tokens=64, max_prefill_tokens_while_decoding=48, compile=compile_layers,
                  cuda_graph_max_mixed_tokens=mixed_tokens)
        runner = llm.engine.runner
        assert (runner._mixed_graphs is not None) == bool(mixed_tokens)
        replays = 0
        if runner._mixed_graphs is not None:
            run_graph = runner._mixed_graphs.run

            def counted(step, previous_tokens=None):
                nonlocal replays
                replays += 1
                return run_graph(step, previous_tokens)

            runner._mixed_graphs.run = counted
        outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.engine.shutdown()
        return outputs, replays

    graphs, replays = run(64)
    eager, _ = run(0)
    assert graphs == eager
    assert replays >= 5
