"""LoRA adapters (engine/runner/lora.py): greedy outputs equal transformers + peft's merged model, token for token.

Adapters are made by peft itself (random A and B: `init_lora_weights=False`), saved as peft saves them, and
served by name; the reference is each adapter merged into the base (`merge_and_unload`) under transformers'
`generate`. One engine runs rows of three adapters and of the base model in the same steps, with chunked
prefill, preemption and fewer device slots than adapters (so slots are evicted and loaded again).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from pagedserve.config.engine import ConfigError
from pagedserve.engine.core.request import SamplingParams
from pagedserve.engine.errors import InvalidRequestError
from pagedserve.engine.llm import LLM

from tiny_models import build_tiny_model

peft = pytest.importorskip("peft")

MAX_TOKENS = 8
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "all-r4": dict(r=4, target_modules=ALL_PROJECTIONS),
    "qv-r8-rslora": dict(r=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "mlp-o-r8": dict(r=8, target_modules=["o_proj", "gate_proj", "down_proj"], alpha_pattern={"down_proj": 4}),
}


def save_adapter(model_dir, out_dir, seed: int, **lora_config) -> str:
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(lora_alpha=16, init_lora_weights=False, **lora_config)
    peft.get_peft_model(base, config).save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """arch -> (model dir, {adapter name: path}): a 2-layer model and three peft adapters of it."""
    built = {}

    def get(arch: str):
        if arch not in built:
            root = tmp_path_factory.mktemp(f"lora-{arch}")
            model_dir = build_tiny_model(arch, root / "model", num_hidden_layers=2)
            adapters = {name: save_adapter(model_dir, root / name, seed, **spec)
                        for seed, (name, spec) in enumerate(ADAPTERS.items())}
            built[arch] = (model_dir, adapters)
        return built[arch]

    return get


def merged_outputs(model_dir, adapter_path: str | None, prompts: list[list[int]]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if adapter_path is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    outs = []
    for prompt in prompts:
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
        outs.append(generated[0, len(prompt):].tolist())
    return outs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_adapters_match_peft_merged_models(lora_setup, arch):
    model_dir, adapters = lora_setup(arch)
    names = [*ADAPTERS, None, "all-r4"]
    prompts = [[3 + (7 * i + 3 * j) % 250 for j in range(9 + 5 * i)] for i in range(len(names))]
    expected: list[list[int]] = [[] for _ in names]
    for name in [*ADAPTERS, None]:
        rows = [i for i, n in enumerate(names) if n == name]
        for row, out in zip(rows, merged_outputs(model_dir, adapters.get(name), [prompts[i] for i in rows])):
            expected[row] = out
    # 16-token steps chunk every prompt; 10 blocks of 8 force preemption; 2 slots for 3 adapters force eviction.
    llm = LLM(str(model_dir), dtype="float32", block_size=8, lora_modules=adapters, max_loras=2,
              max_batch_tokens=16, num_blocks=10)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False,
                           lora=names)
    for name, output, want in zip(names, outputs, expected):
        assert output.outputs[0].token_ids == want, f"{arch}, adapter {name}: diverged from the merged model"
    stats = llm.engine.get_stats()
    assert stats.num_preemptions_total > 0, "the tiny cache was meant to force preemption"
    assert llm.engine.runner.lora.num_device_loads_total > len(ADAPTERS), "2 slots for 3 adapters: reloads expected"
    assert stats.num_free_blocks == stats.num_total_blocks
    llm.engine.kv_cache.check_invariants()
    llm.engine.shutdown()


def test_prefix_cache_is_per_adapter_and_adapters_load_at_run_time(lora_setup):
    model_dir, adapters = lora_setup("llama")
    first, second = list(ADAPTERS)[:2]
    llm = LLM(str(model_dir), dtype="float32", block_size=8, enable_lora=True, max_loras=1)
    llm.engine.add_lora(first, adapters[first])
    llm.engine.add_lora(second, adapters[second])
    params = SamplingParams(temperature=0.0, max_tokens=2)
    prompt = list(range(3, 40))

    def cached_tokens(lora: str | None) -> int:
        return llm.generate([prompt], params, use_tqdm=False, lora=lora)[0].num_cached_tokens

    assert cached_tokens(first) == 0
    assert cached_tokens(second) == 0, "a prefix computed under one adapter was reused by another"
    assert cached_tokens(None) == 0, "a prefix computed under an adapter was reused by the base model"
    assert cached_tokens(first) == 32 and cached_tokens(None) == 32
    with pytest.raises(InvalidRequestError, match="no LoRA adapter named 'nope'"):
        llm.generate([prompt], params, use_tqdm=False, lora="nope")
    llm.engine.remove_lora(first)
    assert llm.engine.lora_names() == [second]
    with pytest.raises(InvalidRequestError):
        llm.generate([prompt], params, use_tqdm=False, lora=first)
    llm.engine.shutdown()


def test_stats_name_the_adapters_in_device_slots_least_recently_used_first(lora_setup):
    """What replicas report for adapter affinity (serve_app/router.py): the adapters in the `max_loras` device slots
    after each step, least recently used first (the next evicted leads), those in host memory, and slot loads."""
    model_dir, adapters = lora_setup("llama")
    first, second, third = ADAPTERS
    llm = LLM(str(model_dir), dtype="float32", block_size=8, lora_modules=adapters, max_loras=2, max_cpu_loras=2)
    params = SamplingParams(temperature=0.0, max_tokens=1)

    def after(*names: str | None):
        llm.generate([[5, 6, 7, 8]] * len(names), params, use_tqdm=False, lora=list(names))
        stats = llm.engine.get_stats()
        return stats.lora_slot_names, stats.num_lora_slot_loads_total

    stats = llm.engine.get_stats()
    # Registered all three at start-up; none on the device yet; host memory keeps the 2 read last.
    assert (stats.num_lora_slots, stats.lora_slot_names, stats.num_lora_slot_loads_total) == (2, (), 0)
    assert stats.lora_host_names == (second, third) and llm.engine.lora_names() == [first, second, third]
    assert after(first) == ((first,), 1)
    assert after(None) == ((first,), 1)  # the base model takes no slot
    assert after(second) == ((first, second), 2)
    assert after(first) == ((second, first), 2)  # a hit moves it to the back, loads nothing
    assert after(third) == ((first, third), 3)  # evicts the least recently used: second
    assert after(second, third) == ((second, third), 4)  # one step of both: first evicted, third kept
    # Host memory (2) is LRU by slot loads: second was on it; first, read again earlier, dropped by third.
    assert llm.engine.get_stats().lora_host_names == (third, second)
    llm.engine.remove_lora(third)
    assert llm.engine.get_stats().lora_slot_names == (second,)
    llm.engine.shutdown()


def test_adapters_that_cannot_run_are_refused_naming_why(lora_setup, tmp_path):
    model_dir, adapters = lora_setup("llama")
    with pytest.raises(ConfigError, match="rank 8 .* above max_lora_rank=4"):
        LLM(str(model_dir), dtype="float32", lora_modules={"big": adapters["mlp-o-r8"]}, max_lora_rank=4)
    source = Path(adapters["all-r4"])
    config = json.loads((source / "adapter_config.json").read_text())
    tensors = load_file(source / "adapter_model.safetensors")
    # An adapter of a module the engine does not wrap, and one that asks for DoRA.
    foreign, dora = tmp_path / "foreign", tmp_path / "dora"
    for folder, adapter_config, weights in (
            (foreign, config, {k.replace("o_proj", "rotary"): v for k, v in tensors.items()}),
            (dora, config | {"use_dora": True}, tensors)):
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
        save_file(weights, folder / "adapter_model.safetensors")
    llm = LLM(str(model_dir), dtype="float32", enable_lora=True)
    with pytest.raises(InvalidRequestError, match="self_attn.rotary.*takes no adapter"):
        llm.engine.add_lora("foreign", str(foreign))
    with pytest.raises(InvalidRequestError, match="DoRA"):
        llm.engine.add_lora("dora", str(dora))
    assert llm.engine.lora_names() == []
    llm.engine.shutdown()


def test_warm_up_compiles_the_layers_with_adapter_rows_before_the_first_request(lora_setup, monkeypatch):
    """Start-up runs its warm-up steps again with a row under an adapter (WARM_UP_ADAPTER, slot 0), so the first
    requests under adapters trace no new graph: the layers with adapter rows differ from those without (on a GPU a
    compile of them stalled every request of the replica for seconds). The layers take the GPU's path here (the
    `lora_add` op, no host grouping), whose graphs are the GPU's; the outputs are still peft's."""
    import pagedserve.engine.runner.lora as runner_lora
    from torch._dynamo.utils import counters

    monkeypatch.setattr(runner_lora, "uses_triton", lambda tensor: True)
    model_dir, adapters = lora_setup("llama")
    llm = LLM(str(model_dir), dtype="float32", block_size=8, lora_modules=adapters, max_loras=3, compile=True,
              compile_backend="eager")
    traced_at_start = counters["stats"]["unique_graphs"]
    assert llm.engine.runner.lora.slot_names() == ()  # the warm-up loaded no adapter
    prompts = [list(range(5, 5 + n)) for n in (9, 30, 4, 17)]
    names = ["all-r4", None, "mlp-o-r8", "qv-r8-rslora"]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False, lora=names)
    assert counters["stats"]["unique_graphs"] == traced_at_start, "a request under an adapter paid for a compilation"
    for prompt, name, output in zip(prompts, names, outputs):
        assert output.outputs[0].token_ids == merged_outputs(model_dir, adapters.get(name), [prompt])[0], name
    llm.engine.shutdown()
    with pytest.raises(ConfigError, match="reserved"):
        LLM(str(model_dir), dtype="float32", lora_modules={runner_lora.WARM_UP_ADAPTER: adapters["all-r4"]})


def test_async_engine_loads_serves_and_unloads_adapters_at_run_time(lora_setup):
    """The server's path: AsyncLLMEngine's commands reach the core between steps and reply when done."""
    import asyncio

    from pagedserve.engine.async_engine import AsyncLLMEngine

    model_dir, adapters = lora_setup("llama")
    prompt = list(range(5, 25))
    expected = merged_outputs(model_dir, adapters["all-r4"], [prompt])[0]
    engine = AsyncLLMEngine.from_kwargs(model=str(model_dir), dtype="float32", block_size=8, engine_process=False,
                                        lora_modules={"first": adapters["qv-r8-rslora"]})
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)

    async def tokens(request_id: str, lora: str | None) -> list[int]:
        got: list[int] = []
        async for delta in engine.generate(prompt, params, request_id, lora=lora):
            got += delta.outputs[0].token_ids
        return got

    async def scenario() -> list[int]:
        await engine.load_lora_adapter("late", adapters["all-r4"])
        assert engine.lora_names() == ["first", "late"]
        with pytest.raises(InvalidRequestError, match="already loaded"):
            await engine.load_lora_adapter("late", adapters["all-r4"])
        served = await tokens("r1", "late")
        await engine.unload_lora_adapter("late")
        with pytest.raises(InvalidRequestError, match="no LoRA adapter named 'late'"):
            await tokens("r2", "late")
        return served

    try:
        assert asyncio.run(scenario()) == expected
        assert engine.lora_names() == ["first"]
    finally:
        engine.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adapters_in_cuda_graphs_and_compiled_layers_match_eager_on_gpu(lora_setup):
    """Written for the GPU session, not yet run there: the Triton kernels inside the decode CUDA graphs (slot ids
    as a graph input) and torch.compile, against the same engine eager (float32: the kernels' dots in IEEE)."""
    model_dir, adapters = lora_setup("llama")
    names = [*ADAPTERS, None, "all-r4", None]
    prompts = [[3 + (5 * i + 7 * j) % 250 for j in range(6 + 4 * i)] for i in range(len(names))]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = {}
    for label, extra in (("eager", {"enable_cuda_graphs": False, "compile": False}), ("graphs", {})):
        llm = LLM(str(model_dir), dtype="float32", block_size=16, lora_modules=adapters, max_loras=3, **extra)
        assert (llm.engine.runner._decode_graphs is not None) == (label == "graphs")
        outputs[label] = [o.outputs[0].token_ids for o in
                          llm.generate(prompts, params, use_tqdm=False, lora=names)]
        llm.engine.shutdown()
    assert outputs["graphs"] == outputs["eager"]
