"""Mixed-step CUDA graphs (`MixedGraphs`: steps with prompt tokens) against the rest of the engine, on the CPU.

Off CUDA a "graph" reruns its forward over the padded static inputs, and `GraphLikeReference` reads the lengths
from the device tensors as the Triton kernel does, so these tests check the padded layout: each engine runs
with the runner's own capture (`capture_cuda_graphs`: decode graphs, verification graphs with speculation, and
mixed-step graphs in their logits) and gives eager's greedy tokens and logprobs, with LoRA adapters, prefix
caching and block copies, preemption, n > 1, stop strings, speculative decoding and tokens still on the device.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from graph_like_attention import GraphLikeReference
from pagedserve.cache.blocks import blocks_for
from pagedserve.engine.core.request import SamplingParams
from pagedserve.engine.llm import LLM
from pagedserve.engine.runner.cuda_graphs import MixedInputs
from pagedserve.engine.runner.step_input import StepInput

BLOCK_SIZE = 4


@dataclasses.dataclass
class Replay:
    """A step a mixed-step graph ran, and the rows of the previous step's sampled ids it was given."""

    step: StepInput
    num_previous_rows: int | None


def make_llm(model_dir, graphs: bool, mixed_tokens: int = 24, **config) -> tuple[LLM, list[Replay]]:
    """A CPU engine with the graph-like reference attention; with `graphs`, the runner captures as on a GPU
    (decode graphs up to max_num_seqs, verification graphs under speculation, mixed-step graphs of up to
    `mixed_tokens` tokens), and the steps the mixed-step graphs ran are recorded."""
    llm = LLM(str(model_dir), dtype="float32", device="cpu", block_size=BLOCK_SIZE, **config)
    engine, runner = llm.engine, llm.engine.runner
    runner.backend = GraphLikeReference()
    replays: list[Replay] = []
    if graphs:
        runner.settings = dataclasses.replace(runner.settings, cuda_graphs=True)  # resolution turned them off on CPU
        max_num_seqs = engine.scheduler_settings.max_num_seqs
        speculative = engine.settings.speculative
        verify = dict(verify_query_len=speculative.num_tokens + 1, verify_max_batch_size=max_num_seqs) \
            if speculative.enabled else {}
        assert runner.capture_cuda_graphs(max_num_seqs, engine.max_model_len, mixed_max_tokens=mixed_tokens,
                                          max_num_seqs=max_num_seqs, **verify)
        mixed = runner._mixed_graphs
        run = mixed.run

        def recorded(step, previous_tokens=None):
            replays.append(Replay(step, None if previous_tokens is None else previous_tokens.numel()))
            return run(step, previous_tokens)

        mixed.run = recorded
    return llm, replays


def assert_same_outputs(outputs, reference) -> None:
    """Every completion's tokens, text and finish reason, and its top logprobs (ids, values to 1e-4)."""
    assert len(outputs) == len(reference)
    for out, ref in zip(outputs, reference):
        assert [(c.token_ids, c.text, c.finish_reason) for c in out.outputs] == \
            [(c.token_ids, c.text, c.finish_reason) for c in ref.outputs]
        for got_completion, want_completion in zip(out.outputs, ref.outputs):
            for got, want in zip(got_completion.logprobs or [], want_completion.logprobs or []):
                assert got.keys() == want.keys()
                for token_id in got:
                    assert got[token_id].logprob == pytest.approx(want[token_id].logprob, abs=1e-4)


def generate(llm: LLM, prompts, params, **kwargs):
    outputs = llm.generate(prompts, params, use_tqdm=False, **kwargs)
    stats = llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    llm.engine.kv_cache.check_invariants()
    return outputs


def test_padding_past_a_table_row_runs_eagerly(tiny_model_dir) -> None:
    """The padding tokens form one sequence, whose context is read through one block-table row, as wide as
    `max_model_len`: with a model length (24) shorter than the gap between two captured sizes (32 -> 64), a step of
    33-39 tokens would pad 25-31 tokens past the row (an IndexError here, reads past the row or the buffer on a GPU).
    Such steps run eagerly; the others still replay graphs."""
    model_dir = tiny_model_dir("llama")
    # Five 7-token prompts start together (35 tokens: 29 to pad); two more start as the first ends (4 decodes and a
    # 10-token prompt: 2 to pad).
    prompts = [list(range(5 + 10 * i, 12 + 10 * i)) for i in range(5)] + [list(range(70, 80)), list(range(90, 100))]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=1) for m in (2, 8, 8, 8, 8, 6, 6)]
    config = dict(num_blocks=96, max_num_seqs=5, max_batch_tokens=64, max_model_len=24)
    reference = generate(make_llm(model_dir, graphs=False, **config)[0], prompts, params)
    llm, replays = make_llm(model_dir, graphs=True, mixed_tokens=64, **config)
    mixed = llm.engine.runner._mixed_graphs
    assert mixed.sizes == [16, 32, 64]
    executed = []
    execute = llm.engine.runner.execute
    llm.engine.runner.execute = lambda step, previous_tokens=None: executed.append(step) or execute(step,
                                                                                                   previous_tokens)
    assert_same_outputs(generate(llm, prompts, params), reference)
    # The first step (35 tokens) ran eagerly, later steps with prompt tokens (4 decodes and a prompt) replayed graphs.
    assert any(32 < len(step.token_ids) < 40 for step in executed), [len(step.token_ids) for step in executed]
    assert replays and not any(32 < len(r.step.token_ids) < 40 for r in replays), [len(r.step.token_ids)
                                                                                    for r in replays]
    # The layout itself refuses such padding (a broken invariant, were a caller to skip can_run).
    step = StepInput(token_ids=list(range(33)), positions=list(range(33)), query_lens=[33], seq_lens=[33],
                     block_tables=[[list(range(9))]], logits_indices=[32])
    assert not mixed.can_run(step)
    with pytest.raises(ValueError, match="31 padding tokens need 8 blocks"):
        mixed.inputs.pack(step, 64, mixed.seqs_for(64), BLOCK_SIZE, pending_on_device=False)


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    """A 2-layer llama and two PEFT adapters of it (random A and B), saved as peft saves them."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("mixed-lora")
    model_dir = build_tiny_model("llama", root / "model", num_hidden_layers=2)
    specs = {"attn-mlp-r4": dict(r=4, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
             "kup-r8": dict(r=8, target_modules=["k_proj", "up_proj"], use_rslora=True)}
    adapters = {}
    for seed, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        peft.get_peft_model(base, peft.LoraConfig(lora_alpha=16, init_lora_weights=False, **spec)).save_pretrained(
            root / name)
        adapters[name] = str(root / name)
    return model_dir, adapters


@pytest.mark.parametrize("device_grouping", [False, True])
def test_lora_rows_in_mixed_step_graphs_equal_eager(lora_model, monkeypatch, device_grouping) -> None:
    """Rows of two adapters and of the base model in steps with prompt tokens: the graphs take each row's slot as
    an input (`lora_slots`), packed per token from the step's adapters. Each replay must group the rows of its own
    step, not of an earlier one: steps here change which rows take which adapter (and some have no adapter row at
    all, after steps that had). `device_grouping`: the layers take the GPU's path (the `lora_add` op over the
    step's device index) rather than the host segments the CPU reference computes in `set_step`."""
    import pagedserve.engine.runner.lora as runner_lora

    if device_grouping:
        monkeypatch.setattr(runner_lora, "uses_triton", lambda tensor: True)
    model_dir, adapters = lora_model
    names = ["attn-mlp-r4", None, "kup-r8", "attn-mlp-r4", None, None]
    prompts = [list(range(5 + 3 * i, 5 + 3 * i + n)) for i, n in enumerate((13, 9, 14, 6, 30, 40))]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=2) for m in (4, 3, 5, 4, 8, 6)]
    config = dict(num_blocks=96, max_num_seqs=4, max_batch_tokens=24, lora_modules=adapters, max_loras=2)
    reference = generate(make_llm(model_dir, graphs=False, **config)[0], prompts, params, lora=names)
    llm, replays = make_llm(model_dir, graphs=True, **config)
    assert_same_outputs(generate(llm, prompts, params, lora=names), reference)
    layouts = [tuple(r.step.lora_names) for r in replays]
    assert any(len({n for n in layout if n is not None}) == 2 and None in layout for layout in layouts), layouts
    assert any(all(n is None for n in layout) for layout in layouts), layouts  # no adapter row, after some had


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_prefix_hits_block_copies_preemption_n_and_stops_equal_eager(tiny_model_dir, arch) -> None:
    """Prompts sharing a prefix (cache hits), n > 1 (children share the parent's blocks; a partial last block is
    copied before the step: `block_copies`), a cache of 14 blocks of 4 (preemption, then recompute as a prompt
    chunk), stop strings and several max_tokens; gemma2 adds a sliding-window KV group (two tables per step)."""
    model_dir = tiny_model_dir(arch)
    shared = list(range(40, 58))
    prompts = [shared + list(range(5, 5 + n)) for n in (3, 9, 1, 14)] + [list(range(100, 117))]
    config = dict(num_blocks=14, max_num_seqs=4, max_batch_tokens=24)
    plain = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, n=n) for m, n in
             ((10, 2), (6, 1), (12, 3), (3, 1), (9, 2))]
    # Stop strings from an eager run: words some completions reach.
    words = [out.outputs[0].text.split() for out in generate(make_llm(model_dir, graphs=False, **config)[0], prompts,
                                                             plain)]
    params = [dataclasses.replace(p, logprobs=1, stop=[w[len(w) // 2]] if i % 2 else None)
              for i, (p, w) in enumerate(zip(plain, words))]
    eager = make_llm(model_dir, graphs=False, **config)[0]
    reference = generate(eager, prompts, params)
    llm, replays = make_llm(model_dir, graphs=True, **config)
    assert_same_outputs(generate(llm, prompts, params), reference)
    assert any(c.finish_reason == "stop" for out in reference for c in out.outputs)
    stats = llm.engine.get_stats()
    assert stats.num_preemptions_total > 0 and stats.num_prefix_cache_hits_total > 0
    assert any(r.step.block_copies for r in replays), "a child's copied block was meant to precede a graph step"
    assert any(r.step.pending_input_indices for r in replays)


def test_tokens_pending_from_more_rows_than_the_graphs_hold(tiny_model_dir) -> None:
    """Async scheduling: a step with prompt tokens takes its decodes' tokens from the previous step's sampled ids on
    the device. A previous step can sample more rows than the engine runs sequences (children fork past
    max_num_seqs); the graph's gather holds max_num_seqs rows, so these are written into the ids before the replay
    (`fill_pending_tokens`). Here (max_num_seqs 4, prefill first): B decodes and D's long prompt is chunked while
    A (n=4, max_tokens=1) arrives; A's prompt and its children sample 4 rows beside B's, so the next step, B's decode
    beside D's chunk, takes B's token from row 4 of 5."""
    model_dir = tiny_model_dir("llama")
    config = dict(num_blocks=96, max_num_seqs=4, max_batch_tokens=24, scheduling_policy="prefill_first")

    def run(graphs: bool) -> tuple[dict, list[Replay]]:
        llm, replays = make_llm(model_dir, graphs=graphs, **config)
        engine = llm.engine
        completions: dict[tuple[str, int], list] = {}

        def collect(deltas) -> None:
            for delta in deltas:
                for completion in delta.outputs:
                    got = completions.setdefault((delta.request_id, completion.index), [])
                    got += [(token, lp[token].logprob) for token, lp in zip(completion.token_ids,
                                                                             completion.logprobs)]

        def params(**kwargs) -> SamplingParams:
            return SamplingParams(temperature=0, ignore_eos=True, logprobs=1, **kwargs)

        engine.add_request("B", list(range(30, 34)), params(max_tokens=5))
        engine.add_request("D", list(range(60, 120)), params(max_tokens=3))
        collect(engine.step())
        engine.add_request("A", list(range(5, 19)), params(max_tokens=1, n=4))
        while engine.has_unfinished_requests():
            collect(engine.step())
        return completions, replays

    reference, _ = run(graphs=False)
    completions, replays = run(graphs=True)
    assert completions.keys() == reference.keys()
    for key, want in reference.items():
        assert [token for token, _ in completions[key]] == [token for token, _ in want], key
        assert [logprob for _, logprob in completions[key]] == pytest.approx([logprob for _, logprob in want],
                                                                             abs=1e-4), key
    assert {key: len(tokens) for key, tokens in reference.items()} == {("B", 0): 5, ("D", 0): 3, **{("A", i): 1
                                                                                                 for i in range(4)}}
    assert any(r.step.pending_input_indices and r.num_previous_rows > 4 for r in replays), \
        [(r.step.query_lens, r.num_previous_rows) for r in replays]


def test_verification_rows_beside_prompt_chunks_equal_eager(tiny_model_dir) -> None:
    """Speculative decoding (n-gram, k = 3): a step may hold verification rows (logits at each of their k + 1
    positions) beside a prompt chunk. The mixed-step graphs run it where its logits rows fit their sequence rows
    (here 5: max_num_seqs 4 and the padding one) and refuse it otherwise (eager); verification-only steps take the
    verification graphs. Tokens and logprobs equal plain eager decoding's."""
    model_dir = tiny_model_dir("llama")
    repeating = [[5, 9, 33, 7, 81, 12, 40, 41, 42, 5, 9, 33, 7, 81, 12, 40, 41, 42, 5, 9],
                 [60, 61, 62, 63, 60, 61, 62, 63, 60, 61],
                 [100, 101, 102, 103, 104, 105, 106, 107, 108, 100, 101, 102]]
    # The last prompt starts once the second request ends, beside the others' verifications.
    prompts = repeating + [repeating[1] * 2, list(range(150, 190))]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=2) for m in (24, 6, 24, 24, 10)]
    config = dict(num_blocks=96, max_num_seqs=4, max_batch_tokens=32)
    reference = generate(make_llm(model_dir, graphs=False, **config)[0], prompts, params)
    llm, replays = make_llm(model_dir, graphs=True, mixed_tokens=32, speculative_method="ngram",
                            num_speculative_tokens=3, speculative_adaptive=False, **config)
    runner = llm.engine.runner
    executed, verified = [], []
    execute, run_verification = runner.execute, runner._verify_graphs.run
    runner.execute = lambda step, previous_tokens=None: executed.append(step) or execute(step, previous_tokens)
    runner._verify_graphs.run = lambda step, previous_tokens=None: verified.append(step) or run_verification(
        step, previous_tokens)
    assert_same_outputs(generate(llm, prompts, params), reference)
    assert llm.engine.get_stats().spec_decode.num_accepted_tokens > 0
    assert verified

    def verifies_beside_a_prompt(step: StepInput) -> bool:
        return len(step.logits_indices) > len(step.query_lens) and max(step.query_lens) > 4

    # One such step replayed a mixed-step graph, one with more logits rows than the graph's 5 sequences did not.
    assert any(verifies_beside_a_prompt(r.step) for r in replays), [(r.step.query_lens, len(r.step.logits_indices))
                                                                     for r in replays]
    assert any(verifies_beside_a_prompt(step) and len(step.logits_indices) > 5 for step in executed)


def poisoned(values: torch.Tensor) -> int:
    """The value of a `values`-typed entry whose bytes are all 0x5A."""
    return int(torch.full((values.element_size(),), 0x5A, dtype=torch.uint8).view(values.dtype)[0])


def test_one_copy_carries_every_row_a_mixed_graph_reads() -> None:
    """`MixedInputs.pack` copies the buffer only up to the last table row the step uses in the last KV group (the
    padding sequence's included); earlier groups' tables go whole. With the device buffer poisoned first, every
    value a graph of the padded size reads (the kernels read a sequence's table entries up to its context) is the
    step's, in both groups of a sliding-window model's layout, for a step with padding and one without."""
    max_blocks = 6
    inputs = MixedInputs(max_tokens=32, max_seqs=9, num_groups=2, max_blocks=max_blocks, device=torch.device("cpu"))
    full = [[3, 7, 9], [1, 2], [11, 12, 13, 14]]
    window = [[0, 7, 9], [1, 2], [0, 0, 13, 14]]
    with_padding = StepInput(token_ids=[101, 201, 202, 203, 204, 205, 301], positions=[9, 0, 1, 2, 3, 4, 14],
                             query_lens=[1, 5, 1], seq_lens=[10, 5, 15], block_tables=[full, window],
                             logits_indices=[0, 5, 6])
    tokens = list(range(16))
    without_padding = StepInput(token_ids=tokens, positions=[20] + list(range(15)), query_lens=[1, 15],
                                seq_lens=[21, 15], block_tables=[[[4, 5, 6, 8, 9, 10], [2, 3, 15, 16]]] * 2,
                                logits_indices=[0, 15])
    for step in (with_padding, without_padding):
        inputs.device_buffer.fill_(0x5A)  # every int32 and int64 view then reads 0x5A5A...
        inputs.pack(step, padded_tokens=16, padded_seqs=8, block_size=BLOCK_SIZE, pending_on_device=True)
        views = inputs.device
        num_seqs = len(step.query_lens) + (1 if len(step.token_ids) < 16 else 0)
        for values in (views.ids[:16], views.positions[:16], views.pending[:16], views.logits_rows[:8],
                       views.query_start_loc[:9], views.seq_lens[:8], *(slots[:16] for slots in views.slots)):
            assert (values != poisoned(values)).all(), values
        for table in views.tables:
            for row in range(num_seqs):
                context = int(views.seq_lens[row])
                entries = table[row, : blocks_for(context, BLOCK_SIZE)]
                assert context > 0 and (entries != poisoned(entries)).all(), (row, table)
        assert views.seq_lens[num_seqs:8].tolist() == [0] * (8 - num_seqs)


def replay_random_steps(llm: LLM, seed: int, num_steps: int, adapters: list[str | None] | None = None) -> int:
    """Random steps with prompt tokens over a random cache (contexts, chunks, decodes, verification-like rows with
    logits at every position, rows that sample nothing, tokens pending on the device from fewer or more rows than
    the graphs hold, rows under `adapters`), each run eagerly and from a mixed-step graph over the same cache:
    the logits and the written cache agree. Returns how many steps the graphs ran."""
    import random

    from pagedserve.engine.runner.cuda_graphs import MixedGraphs

    runner = llm.engine.runner
    runner.backend = GraphLikeReference()
    max_num_seqs, max_tokens = 6, 48
    mixed = MixedGraphs(runner, max_tokens, max_num_seqs, llm.engine.max_model_len)
    mixed.capture()
    num_groups, num_blocks = len(runner.shape.groups), runner._group_tensors[0].shape[2]
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    num_replayed = 0
    for _ in range(num_steps):
        step = StepInput.empty(num_groups)
        free_blocks = rng.sample(range(num_blocks), num_blocks)
        previous_tokens = torch.randint(3, 250, (rng.choice([3, max_num_seqs, max_num_seqs + 3]),),
                                        generator=generator)
        for row in range(rng.randint(1, max_num_seqs)):
            query_len = rng.choice([1, 1, 2, 4, rng.randint(5, 20)])
            context = rng.randint(0, 30)
            table = [free_blocks.pop() for _ in range(blocks_for(context + query_len, BLOCK_SIZE))]
            logits = rng.choice(["last", "last", "none", "all"] if query_len <= 4 else ["last", "none"])
            step.add_sequence([rng.randint(3, 250) for _ in range(query_len)], context, [table] * num_groups, logits)
            if logits == "last" and rng.random() < 0.4:  # its newest token is still on the device
                step.pending_input_indices.append(len(step.token_ids) - 1)
                step.pending_source_rows.append(rng.randrange(previous_tokens.numel()))
                step.token_ids[-1] = -1
        if adapters is not None:
            step.lora_names = [rng.choice(adapters) for _ in step.query_lens]
        if len(step.token_ids) > max_tokens or not mixed.can_run(step):
            continue
        for tensor in runner._group_tensors:
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        before = [tensor.clone() for tensor in runner._group_tensors]
        runner._mixed_graphs = None
        eager = runner.execute(step, previous_tokens).clone()
        eager_cache = [tensor.clone() for tensor in runner._group_tensors]
        for tensor, saved in zip(runner._group_tensors, before):
            tensor.copy_(saved)
        runner._mixed_graphs = mixed
        graph = runner.execute(step, previous_tokens)
        torch.testing.assert_close(graph, eager, atol=1e-4, rtol=1e-4)
        for tensor, want in zip(runner._group_tensors, eager_cache):
            torch.testing.assert_close(tensor, want, atol=1e-5, rtol=1e-5)
        num_replayed += 1
    return num_replayed


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_random_steps_from_graphs_equal_eager_steps(tiny_model_dir, arch) -> None:
    """`replay_random_steps`; gemma2 packs two KV groups (full and sliding window), soft-capped."""
    llm = LLM(str(tiny_model_dir(arch)), dtype="float32", device="cpu", block_size=BLOCK_SIZE, num_blocks=96,
              max_num_seqs=6, max_batch_tokens=48)
    assert replay_random_steps(llm, seed=1, num_steps=60) >= 25


def test_random_steps_with_adapter_rows_from_graphs_equal_eager_steps(lora_model) -> None:
    """`replay_random_steps` with each row under one of two adapters or the base model."""
    model_dir, adapters = lora_model
    llm = LLM(str(model_dir), dtype="float32", device="cpu", block_size=BLOCK_SIZE, num_blocks=96, max_num_seqs=6,
              max_batch_tokens=48, lora_modules=adapters, max_loras=2)
    assert replay_random_steps(llm, seed=2, num_steps=40, adapters=[*adapters, None]) >= 15


def test_a_model_whose_mixed_steps_cannot_be_captured_still_serves(tiny_model_dir, monkeypatch, caplog) -> None:
    """A capture of steps with prompt tokens that fails (an op that reads the device on the host) leaves them eager,
    with a warning naming the way out, while decode steps keep their graphs and the output stays eager's."""
    from pagedserve.engine.runner.cuda_graphs import MixedGraphs

    prompts = [list(range(5, 5 + n)) for n in (23, 9, 30)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    reference, _ = make_llm(tiny_model_dir("llama"), graphs=False, num_blocks=64, max_batch_tokens=24, max_num_seqs=4)
    expected = [o.outputs[0].token_ids for o in generate(reference, prompts, params)]

    def refuse(self, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(MixedGraphs, "capture", refuse)
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu", block_size=BLOCK_SIZE, num_blocks=64,
              max_batch_tokens=24, max_num_seqs=4)
    runner = llm.engine.runner
    runner.backend = GraphLikeReference()
    runner.settings = dataclasses.replace(runner.settings, cuda_graphs=True)
    with caplog.at_level(logging.WARNING, logger="pagedserve.engine.runner.model_runner"):
        assert runner.capture_cuda_graphs(4, llm.engine.max_model_len, mixed_max_tokens=24, max_num_seqs=4)
    assert runner._mixed_graphs is None and runner.mixed_graph_max_tokens == 0
    assert runner._decode_graphs is not None
    assert "cuda_graph_max_mixed_tokens=0" in caplog.text and "stream is capturing" in caplog.text
    assert [o.outputs[0].token_ids for o in generate(llm, prompts, params)] == expected
