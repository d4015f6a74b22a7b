"""The HTTP stack on a real Ray Serve cluster with `FakeAsyncEngine` replicas: errors, auth, streaming,
routing by free blocks across two replicas of different cache sizes, 429, and disconnect-abort.

One Ray cluster and one application for the whole module (the dashboard is on, so its REST API is
checked too). The fake engine makes each test take well under a second of engine time.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from fake_engine import health_check_gate  # noqa: E402
from ray_harness import fake_engine_app, wait_for  # noqa: E402

API_KEY = "test-key-123"
# Two more keys (tenants), beside API_KEY (named `default`): one with a request limit, one without.
LIMITED_KEY, OTHER_KEY = "limited-key-456", "other-key-789"
MAX_MODEL_LEN = 2048
BLOCK_SIZE = 16
BIG_BLOCKS, SMALL_BLOCKS = 64, 8


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_model_path: str):
    args = {
        "model": tiny_model_path, "max_model_len": MAX_MODEL_LEN, "block_size": BLOCK_SIZE, "num_cpus_per_replica": 1,
        # Autoscaling on ongoing requests, held at two replicas here (load never reaches 2 x 16 ongoing).
        "autoscaling": {"min_replicas": 2, "max_replicas": 3, "target_ongoing_requests": 16},
        "engine_overrides_by_rank": [{"num_blocks": BIG_BLOCKS}, {"num_blocks": SMALL_BLOCKS}],
        "router": {"max_queued_requests": 2, "queue_timeout_s": 3, "retry_after_s": 2, "stats_period_s": 0.5},
        "api_key": API_KEY, "max_request_body_bytes": 4096,
        "api_keys": [{"name": "limited", "key": LIMITED_KEY, "requests_per_s": 0.5}, {"name": "other", "key": OTHER_KEY}],
    }
    # With three keys the ingress's fair queue is on; its bound is set past what any test here sends at once, so
    # the router's own queue (max_queued_requests 2) is what the 429 test below meets.
    args["router"]["max_routing_per_key"] = 64
    # Serve checks replica health every second (not every 10 s), so a lost replica is replaced within seconds.
    with fake_engine_app(ray_cluster, "fake", args, health_check_period_s=1) as base:
        wait_for_both_reports(base, tiny_model_path)
        yield {"base": base, "dashboard": ray_cluster.dashboard_url, "model": tiny_model_path}


def wait_for_both_reports(base: str, model: str) -> None:
    """Until the ingress's router holds both replicas' first routing stats (published every 0.5 s): only
    then does it refuse a request too large for every replica itself, naming the largest cache; before, it
    tries the unreported replica, whose engine refuses with its own message."""
    def refused_by_the_router() -> bool:
        response = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30,
                              json={"model": model, "prompt": "Hello world", "max_tokens": 1500})
        return response.status_code == 400 and "whole KV cache holds" in response.json()["error"]["message"]

    wait_for(refused_by_the_router, 30, "the router to hold both replicas' routing stats", period_s=0.1)


@pytest.fixture
def client(service) -> httpx.Client:
    with httpx.Client(base_url=service["base"], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def completion(client: httpx.Client, model: str, **fields) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": "Hello world", "max_tokens": 4, **fields})


def replica_free_blocks() -> dict[str, tuple[int, int]]:
    handle = serve.get_deployment_handle("EngineReplica", "fake")
    seen: dict[str, tuple[int, int]] = {}
    for _ in range(20):
        info = handle.health.remote().result(timeout_s=10)
        seen[info["replica"]] = (info["num_free_blocks"], info["num_total_blocks"])
        if len(seen) == 2:
            break
    return seen


def test_models_and_health(service, client: httpx.Client) -> None:
    assert httpx.get(f"{service['base']}/health").json() == {"status": "ok"}
    head = httpx.head(f"{service['base']}/health")  # a load balancer's probe
    assert head.status_code == 200 and head.content == b""
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == service["model"]


def test_api_key_required(service) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(f"{service['base']}/v1/completions", headers=headers,
                              json={"model": service["model"], "prompt": "hi"})
        error = assert_error(response, 401)
        assert API_KEY not in error["message"]
    assert_error(httpx.get(f"{service['base']}/v1/models"), 401)


def test_each_api_key_has_its_own_limit(service) -> None:
    """A key over its requests_per_s gets 429s with Retry-After and an OpenAI body; another key is untouched. The
    limits are kept by the service's one `KeyLimiter` (the same for any number of ingress replicas:
    tests/serve_app/test_key_limiter.py)."""
    assert serve.status().applications["fake"].deployments["KeyLimiter"].status == "HEALTHY"
    def send(key: str) -> httpx.Response:
        return httpx.post(f"{service['base']}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                          json={"model": service["model"], "prompt": "Hello world", "max_tokens": 2})

    started = time.monotonic()
    limited = [send(LIMITED_KEY) for _ in range(5)]
    other = [send(OTHER_KEY) for _ in range(5)]
    assert [r.status_code for r in other] == [200] * 5
    passed = [r for r in limited if r.status_code == 200]
    refused = [r for r in limited if r.status_code == 429]
    assert len(passed) + len(refused) == 5 and 1 <= len(passed) <= 1 + int((time.monotonic() - started) / 2)
    for response in refused:
        error = assert_error(response, 429)
        assert error["type"] == "rate_limit_exceeded" and "'limited'" in error["message"]
        assert response.headers["retry-after"] in ("1", "2")
        assert LIMITED_KEY not in response.text


def test_bad_bodies(service, client: httpx.Client) -> None:
    model = service["model"]
    assert_error(client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    assert_error(client.post("/v1/completions", json=[1, 2]), 400)
    assert_error(completion(client, model, max_tokens="many"), 400, "max_tokens")
    assert_error(completion(client, model, temperature=-1), 400, "temperature")
    assert_error(completion(client, model, top_p=0), 400, "top_p")
    assert_error(completion(client, model, n=0), 400, "n")
    assert_error(completion(client, model, logprobs=99), 400, "logprobs")
    assert_error(client.post("/v1/completions", json={"model": model}), 400, "prompt")
    assert_error(client.post("/v1/completions", json={"model": model, "prompt": {"a": 1}}), 400, "prompt")
    assert_error(completion(client, model, stop=[""]), 400, "stop")
    assert_error(client.post("/v1/chat/completions", json={"model": model, "messages": []}), 400, "messages")
    assert_error(client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}],
                                                            "top_logprobs": 2}), 400)
    assert_error(completion(client, "no-such-model"), 404, "model")
    # A check of the whole body names its field and the values, and does not echo the body back.
    error = assert_error(completion(client, model, best_of=3), 400, "best_of")
    assert error["message"] == "best_of other than n is not supported (best_of 3, n 1)", error
    error = assert_error(completion(client, model, max_tokens=MAX_MODEL_LEN), 400, "max_tokens")
    assert str(MAX_MODEL_LEN) in error["message"] and str(MAX_MODEL_LEN + 4) in error["message"]
    assert_error(completion(client, model, prompt="x" * 5000), 413)


def test_completion_and_usage(service, client: httpx.Client) -> None:
    body = completion(client, service["model"], n=2, logprobs=2).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 8
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 4 and 1 <= len(logprobs["top_logprobs"][0]) <= 2


def read_sse(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_streaming_deltas_usage_and_done(service, client: httpx.Client) -> None:
    with client.stream("POST", "/v1/completions", json={
        "model": service["model"], "prompt": "Hello world", "max_tokens": 6, "stream": True,
        "stream_options": {"include_usage": True},
    }) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_sse(response)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    text_chunks = events[:-2]
    assert len(text_chunks) == 6 and all(len(c["choices"][0]["text"]) > 0 for c in text_chunks)  # deltas only
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"

    with client.stream("POST", "/v1/chat/completions", json={
        "model": service["model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
    }) as response:
        events = read_sse(response)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == "[DONE]" and "usage" not in events[-2]


def test_engine_failure_fails_only_its_request(service, client: httpx.Client) -> None:
    assert_error(completion(client, service["model"], prompt="please FAIL now", max_tokens=8), 500)
    assert_error(completion(client, service["model"], prompt="CRASH", max_tokens=8), 500)
    with client.stream("POST", "/v1/completions", json={
        "model": service["model"], "prompt": "FAIL", "max_tokens": 8, "stream": True}) as response:
        events = read_sse(response)
    assert any(isinstance(e, dict) and "error" in e for e in events) and events[-1] == "[DONE]"
    assert completion(client, service["model"]).status_code == 200


def test_tokenize_detokenize(service, client: httpx.Client) -> None:
    tokens = client.post("/tokenize", json={"model": service["model"], "prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = client.post("/detokenize", json={"model": service["model"], "tokens": tokens["tokens"]}).json()
    assert text["prompt"] == "Hello world"
    assert_error(client.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens")
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > tokens["count"] - 5


def test_routes_to_the_replica_with_room(service, client: httpx.Client) -> None:
    # 200 new tokens need 13 blocks: only the 64-block replica can hold them; the 8-block one would
    # answer 400. Two at a time fit even while the router's view lags one report behind.
    def one(_: int) -> int:
        return completion(client, service["model"], max_tokens=200).status_code

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert list(pool.map(one, range(8))) == [200] * 8


def test_too_large_for_every_replica(service, client: httpx.Client) -> None:
    error = assert_error(completion(client, service["model"], max_tokens=1500), 400, "max_tokens")
    # The largest replica's cache, in tokens, and what the request needs (engine/core/limits.py's one message).
    assert f"whole KV cache holds {BIG_BLOCKS * BLOCK_SIZE}" in error["message"] and "needs 1504 tokens" in error["message"]


def test_full_service_answers_429_and_blocks_return_on_disconnect(service) -> None:
    # Each SLOW request holds 26 of the big replica's 64 blocks for ~80 s: two fit, two wait, the rest 429.
    body = {"model": service["model"], "prompt": "SLOW", "max_tokens": 400, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    clients = [httpx.Client(base_url=service["base"], headers=headers, timeout=30) for _ in range(6)]
    streams, line_iterators = [], []
    try:
        for c in clients[:2]:
            stream = c.stream("POST", "/v1/completions", json=body)
            response = stream.__enter__()
            assert response.status_code == 200
            lines = response.iter_lines()  # keep a reference: a collected iterator closes the response
            next(lines)
            streams.append(stream)
            line_iterators.append(lines)
        # Both streams hold their 26 blocks on the big replica before the late requests come.
        wait_for(lambda: BIG_BLOCKS - 2 * 26 in {free for free, _ in replica_free_blocks().values()}, 10,
                 "two SLOW streams holding their blocks")

        def late(c: httpx.Client) -> tuple[httpx.Response, float]:
            started = time.time()
            response = c.post("/v1/completions", json=body)
            return response, time.time() - started

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(late, clients[2:]))
        # Never hangs: two are refused at once (queue full), two after waiting queue_timeout_s.
        assert all(seconds < 10 for _, seconds in results), [(r.status_code, s) for r, s in results]
        responses = [r for r, _ in results]
        for response in responses:
            error = assert_error(response, 429)
            assert response.headers["retry-after"] == "2"
            assert "overloaded" in error["message"]
        assert replica_free_blocks()  # replicas still answer
    finally:
        for stream in streams:  # client disconnect mid-stream
            stream.__exit__(None, None, None)
        for c in clients:
            c.close()
    seen: list[dict] = []

    def every_block_free() -> bool:
        seen.append(replica_free_blocks())
        return len(seen[-1]) == 2 and all(f == t for f, t in seen[-1].values())

    wait_for(every_block_free, 15, lambda: f"every block back on both replicas; last seen: {seen[-1:]}", period_s=0.3)


def test_dashboard_shows_app_running(service) -> None:
    status = serve.status()
    assert status.applications["fake"].status == "RUNNING"
    apps = httpx.get(f"{service['dashboard']}/api/serve/applications/", timeout=30).json()
    assert apps["applications"]["fake"]["status"] == "RUNNING"
    deployments = apps["applications"]["fake"]["deployments"]
    assert set(deployments) == {"EngineReplica", "OpenAIIngress", "KeyLimiter"}  # a key has limits: the limiter
    autoscaling = deployments["EngineReplica"]["deployment_config"]["autoscaling_config"]
    assert autoscaling["min_replicas"] == 2 and autoscaling["max_replicas"] == 3
    assert autoscaling["target_ongoing_requests"] == 16


def test_chat_without_max_tokens_fits_a_replica(service, client: httpx.Client) -> None:
    # max_model_len (2048) is larger than either cache: the default max_tokens is capped to what one holds
    # (about a thousand tokens, generated without the fake engine's 5 ms a step).
    response = client.post("/v1/chat/completions", json={
        "model": service["model"], "messages": [{"role": "user", "content": "FAST hi"}]})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"


def _wait_for_running_replicas(count: int, timeout_s: float = 90.0) -> None:
    """`count` replicas RUNNING, and as many answering: Serve may list a replica whose process just died
    as RUNNING for seconds, until it notices the crash (seen: a test began with one live replica)."""
    deadline = time.time() + timeout_s
    states: dict = {}
    answering: dict = {}
    while time.time() < deadline:
        states = serve.status().applications["fake"].deployments["EngineReplica"].replica_states
        if states.get("RUNNING", 0) >= count and sum(states.values()) == states.get("RUNNING", 0):
            try:
                answering = replica_free_blocks()
            except Exception:  # noqa: BLE001 -- a dead replica's call fails: not back yet
                answering = {}
            if len(answering) >= count:
                return
        time.sleep(0.5)
    raise AssertionError(f"replicas not back to {count} RUNNING and answering: {states}, {answering}")


# Last in the module: each case ends a replica's process (a fake-engine fault), which Serve replaces.
@pytest.mark.parametrize("fault, stream, n", [("DIEONCE", False, 1), ("DIEEARLY", True, 1), ("DIEONCE", True, 2)],
                         ids=["one-response-replica-dies-mid-generation", "stream-replica-dies-before-first-token",
                              "stream-replica-dies-mid-generation"])
def test_a_request_whose_replica_is_lost_gets_its_whole_answer(
    service, client: httpx.Client, fault: str, stream: bool, n: int
) -> None:
    """Lost before its first token, the request is sent again; lost after tokens reached the client (a
    stream), each completion goes on from them on a live replica. Either way the client gets the whole
    answer, the one the same prompt gives on a healthy replica, and a usage that counts each token once."""
    import uuid

    _wait_for_running_replicas(2)
    prompt = f"{fault} {uuid.uuid4().hex[:8]} tell me"
    body = {"model": service["model"], "prompt": prompt, "max_tokens": 6, "stream": stream, "n": n, "seed": 3}
    texts = [""] * n
    if stream:
        body["stream_options"] = {"include_usage": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events
        chunks = [json.loads(e) for e in events[:-1]]
        for chunk in chunks:
            for choice in chunk["choices"]:
                texts[choice["index"]] += choice["text"]
        usage = chunks[-1]["usage"]
    else:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        texts = [choice["text"] for choice in response.json()["choices"]]
        usage = response.json()["usage"]
    assert usage["completion_tokens"] == 6 * n
    # The marker now exists: the same prompt runs normally, and gives the same (deterministic) text.
    again = client.post("/v1/completions", json={**body, "stream": False, "stream_options": None})
    assert again.status_code == 200 and [c["text"] for c in again.json()["choices"]] == texts
    assert usage == again.json()["usage"]  # the continued tokens are not counted as prompt tokens
    _wait_for_running_replicas(2)  # the lost replica was replaced


def test_a_dead_engine_gets_no_requests_while_its_replica_is_replaced(service, client: httpx.Client) -> None:
    """The big replica's engine dies (its process lives on until Serve's health check replaces it): the
    stream on it goes on on the small replica, and requests sent meanwhile are all answered there, though
    the dead replica, holding nothing, would otherwise look the emptiest. The fake engine's health check
    fails only once this test opens its gate, so "meanwhile" lasts as long as the test needs."""
    import uuid

    _wait_for_running_replicas(2)
    word = uuid.uuid4().hex[:8]
    body = {"model": service["model"], "prompt": f"ENGINEDIES {word} tell me", "max_tokens": 6, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events
    text = "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])

    # One at a time: the small replica's 8 blocks and this service's 2-request queue answer a burst with 429.
    answers = [completion(client, service["model"], prompt=f"after the death {i}", max_tokens=4) for i in range(12)]
    assert [a.status_code for a in answers] == [200] * 12, [a.text for a in answers if a.status_code != 200]
    again = client.post("/v1/completions", json={**body, "stream": False})
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == text
    gate = health_check_gate(word)
    gate.touch()
    try:
        _wait_for_running_replicas(2)  # the health check failed and Serve replaced the replica
    finally:
        gate.unlink()
