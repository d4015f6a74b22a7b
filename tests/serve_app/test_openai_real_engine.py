"""The service with the real `AsyncLLMEngine` on a tiny random Llama, through the official `openai` client.

Greedy outputs over HTTP must equal the offline engine's (`LLM.generate`) token for token, alone and
under 32 concurrent requests; sampling knobs (n, seed, stop, logprobs) must arrive in the engine; a
client that disconnects mid-stream must get its blocks freed; a replica whose engine dies is replaced
and the service answers again; a LoRA adapter chosen by `"model"` (one from start-up, one loaded over HTTP)
equals the offline engine under it. One Ray cluster for the module; the engine core runs in its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Iterator

import httpx
import pytest

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from pagedserve.engine.llm import LLM  # noqa: E402
from pagedserve.engine.core.request import SamplingParams  # noqa: E402
from ray import serve  # noqa: E402
from ray_harness import build_app_with, deployed, wait_for  # noqa: E402

ENGINE_ARGS = {"num_blocks": 96, "block_size": 16, "max_model_len": 512, "max_num_seqs": 64}
PROMPTS = [
    "Hello world",
    "The quick brown fox",
    "Paged attention stores keys",
    "Ray Serve routes requests to replicas through deployment handles.",
]


APP = "real"
ADAPTER = "tiny-lora"


@pytest.fixture(scope="module")
def adapter_paths(tiny_model_path: str, tmp_path_factory) -> dict[str, str]:
    """Two random peft adapters of the tiny model: one served from start-up, one loaded over HTTP."""
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    paths = {}
    for seed, (name, targets) in enumerate([(ADAPTER, ["q_proj", "v_proj", "down_proj"]), ("late", ["o_proj"])]):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
        paths[name] = str(tmp_path_factory.mktemp(name))
        peft.get_peft_model(base, config).save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_model_path: str, adapter_paths: dict[str, str]):
    # The engine core in its own process, as on a GPU (on CPU it defaults to a thread).
    args = {"model": tiny_model_path, "num_replicas": 1, "engine_process": True, **ENGINE_ARGS,
            "lora_modules": {ADAPTER: adapter_paths[ADAPTER]},
            "router": {"stats_period_s": 0.5, "max_queued_requests": 256}}
    # Serve checks replica health every second (not every 10 s): the dead-engine test waits for that check.
    with deployed(ray_cluster, APP, build_app_with(args, health_check_period_s=1)) as base:
        yield {"base": base, "model": tiny_model_path}


@pytest.fixture(scope="module")
def offline(tiny_model_path: str, adapter_paths: dict[str, str]) -> LLM:
    return LLM(tiny_model_path, **ENGINE_ARGS, lora_modules=adapter_paths)


@pytest.fixture
def client(service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service['base']}/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(max_tokens: int = 16) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def test_greedy_completions_match_offline(service, client, offline: LLM) -> None:
    expected = offline.generate(PROMPTS, greedy(), use_tqdm=False)
    for prompt, want in zip(PROMPTS, expected):
        got = client.completions.create(model=service["model"], prompt=prompt, max_tokens=16, temperature=0)
        assert got.choices[0].text == want.outputs[0].text
        assert got.choices[0].finish_reason == want.outputs[0].finish_reason
        assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)


def test_streaming_sends_deltas_that_add_up(service, client, offline: LLM) -> None:
    want = offline.generate([PROMPTS[1]], greedy(), use_tqdm=False)[0].outputs[0]
    chunks = list(client.completions.create(
        model=service["model"], prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == want.text
    assert text_chunks[-1].choices[0].finish_reason == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_chat_matches_offline(service, client, offline: LLM) -> None:
    messages = [{"role": "user", "content": "Tell me about paged attention."}]
    tokenizer = offline.get_tokenizer()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    want = offline.generate([prompt_ids], greedy(12), use_tqdm=False)[0].outputs[0]
    got = client.chat.completions.create(model=service["model"], messages=messages, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(prompt_ids)
    streamed = client.chat.completions.create(
        model=service["model"], messages=messages, max_completion_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want.text


def test_n_seed_stop_logprobs(service, client, offline: LLM) -> None:
    model = service["model"]
    sampled = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, n=3, seed=7, temperature=1.0)
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    again = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, n=3, seed=7, temperature=1.0)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]

    full = offline.generate([PROMPTS[2]], greedy(), use_tqdm=False)[0].outputs[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    if stop.strip() and "\ufffd" not in stop:
        stopped = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=[stop])
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == full[:full.index(stop)]

    with_logprobs = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2)
    logprobs = with_logprobs.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == with_logprobs.usage.completion_tokens
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_32_concurrent_greedy_requests_match_offline(service, offline: LLM) -> None:
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    expected = [o.outputs[0].text for o in offline.generate(prompts, greedy(12), use_tqdm=False)]

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{service['base']}/v1", api_key="x", max_retries=0,
                                      timeout=300) as aclient:
            responses = await asyncio.gather(*(
                aclient.completions.create(model=service["model"], prompt=p, max_tokens=12, temperature=0)
                for p in prompts))
        return [r.choices[0].text for r in responses]

    assert asyncio.run(run()) == expected


LONG_STREAM = {"prompt": PROMPTS[3], "max_tokens": 400, "ignore_eos": True, "temperature": 0.0}


@contextlib.contextmanager
def long_stream(service) -> Iterator[Iterator[str]]:
    """A greedy streamed 400-token completion, open once its first chunk arrived; yields its lines (that
    first one included)."""
    with httpx.Client(base_url=service["base"], timeout=120) as http:
        with http.stream("POST", "/v1/completions", json={"model": service["model"], **LONG_STREAM,
                                                          "stream": True}) as response:
            lines = response.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            yield itertools.chain([first], lines)


def test_disconnect_mid_stream_frees_blocks(service) -> None:
    handle = serve.get_deployment_handle("EngineReplica", APP)
    total = handle.health.remote().result()["num_total_blocks"]
    with long_stream(service):
        assert handle.health.remote().result()["num_free_blocks"] < total
    wait_for(lambda: handle.health.remote().result()["num_free_blocks"] == total, 20,
             lambda: f"all {total} blocks free; now {handle.health.remote().result()['num_free_blocks']}")


def engine_cores() -> list:
    """Engine core processes of this module's replicas: descendants of this test process only, children of
    a replica of this module's application (the session's cluster may still be stopping another one's)."""
    import psutil

    cores = []
    for process in psutil.Process().children(recursive=True):
        try:
            parent = process.parent()
            if ("spawn_main" in " ".join(process.cmdline()) and parent is not None
                    and f"ServeReplica:{APP}:EngineReplica" in " ".join(parent.cmdline())):
                cores.append(process)
        except psutil.Error:
            continue
    return cores


def test_lora_adapters_by_model_name_match_offline(service, client, offline: LLM, adapter_paths) -> None:
    """`"model": <adapter>` runs it (start-up and run-time adapters alike); /v1/models lists them; vLLM's
    load/unload routes; an unknown adapter is a 404, an adapter that cannot load a 400."""
    base = service["base"]
    listed = {card.id: card for card in client.models.list().data}
    assert set(listed) == {service["model"], ADAPTER} and listed[ADAPTER].parent == service["model"]
    loaded = httpx.post(f"{base}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": adapter_paths["late"]},
                        timeout=60)
    assert loaded.status_code == 200, loaded.text
    assert httpx.post(f"{base}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nonexistent"},
                      timeout=60).status_code == 400
    for model in (ADAPTER, "late", service["model"]):
        want = offline.generate([PROMPTS[2]], greedy(), use_tqdm=False,
                                lora=None if model == service["model"] else model)[0].outputs[0]
        got = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=16, temperature=0)
        assert got.choices[0].text == want.text, model
        assert got.model == model
    base_text = offline.generate([PROMPTS[2]], greedy(), use_tqdm=False)[0].outputs[0].text
    assert offline.generate([PROMPTS[2]], greedy(), use_tqdm=False, lora=ADAPTER)[0].outputs[0].text != base_text
    unloaded = httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=60)
    assert unloaded.status_code == 200, unloaded.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt=PROMPTS[2], max_tokens=4)


def test_a_dead_engine_is_replaced_and_its_stream_goes_on(service, client) -> None:
    """Last in the module: it kills the replica's engine core (a process this session started, by PID).
    Serve's health check replaces the replica; the stream that was open on it waits for the replacement
    (the router sends nothing to a dead engine) and goes on there from the tokens it had: the client gets
    the whole greedy text of an unbroken run, with no error."""
    import psutil

    cores = engine_cores()
    assert len(cores) == 1, cores
    core, replica_pid = cores[0], cores[0].parent().pid
    with long_stream(service) as lines:
        core.kill()
        events = [line[len("data: "):] for line in lines if line]
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["text"] for chunk in chunks for c in chunk["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    new_cores = engine_cores()
    assert len(new_cores) == 1 and new_cores[0].pid != core.pid
    assert new_cores[0].parent().pid != replica_pid
    assert not psutil.pid_exists(core.pid) or core.status() == psutil.STATUS_ZOMBIE
    # The same request on the new replica, unbroken: the same text.
    whole = client.completions.create(model=service["model"], prompt=LONG_STREAM["prompt"], max_tokens=400,
                                      temperature=0.0, extra_body={"ignore_eos": True})
    assert whole.usage.completion_tokens == 400 and whole.choices[0].text == text
