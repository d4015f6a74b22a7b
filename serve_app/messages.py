"""What crosses between the service's deployments: requests to a replica, its errors and model info, and
the routing demand and reports the router weighs. Plain frozen dataclasses, so the ingress, the router and
the replica share them without importing one another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pagedserve.engine.core.request import Continuation, SamplingParams


@dataclass(frozen=True)
class RoutingDemand:
    """What a request will need: tokens it may hold at most, and a key of its first prompt block."""

    num_prompt_tokens: int
    max_new_tokens: int  # n * max_tokens: every completion grows its own blocks
    prefix_key: bytes | None = None  # the cache's key of the first prompt block (cache/prefix_cache.py)
    lora_name: str | None = None  # the LoRA adapter it runs under: replicas with it in a device slot are preferred
    api_key_name: str = ""  # the key that sent it: each key's share of a replica's blocks (serve_app/key_shares.py)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.max_new_tokens


@dataclass(frozen=True)
class ReplicaReport:
    """One replica's routing stats as published by `EngineReplica.record_routing_stats`."""

    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    num_running: int = 0
    num_waiting: int = 0
    report_time_s: float = 0.0  # wall clock of the replica when the snapshot was taken
    engine_dead: bool = False  # the replica lives but its engine does not: it is about to be replaced
    # LoRA adapters on its engine: its device slots (`max_loras`; 0: LoRA off or not reported), the adapters in them
    # now, least recently used first (a request under one runs at once: adapter affinity), and those read into its
    # host memory (a slot load is a copy). Registered alone counts for nothing: with lora_modules every replica
    # registers every adapter.
    num_lora_slots: int = 0
    lora_slot_names: tuple[str, ...] = ()
    lora_host_names: frozenset[str] = frozenset()
    # Requests the replica received lately (within RECENT_ARRIVALS_S of the report): the report counts them, so a
    # router stops subtracting their blocks itself without waiting out its transit grace.
    recent_request_ids: frozenset[str] = frozenset()
    # Blocks committed to each API key's requests on the replica, as in `num_free_blocks` (keys with none absent):
    # what every router charges to the key there, whichever ingress sent its requests (serve_app/key_shares.py).
    blocks_by_key: Mapping[str, int] = field(default_factory=dict, hash=False)
    # Each key's largest total of those within the routers' fair-share window: what it wanted there lately, so a
    # key whose short requests end between two reports is still known to be active (serve_app/key_shares.py).
    peak_blocks_by_key: Mapping[str, int] = field(default_factory=dict, hash=False)

    @classmethod
    def from_routing_stats(cls, stats: dict[str, Any] | None) -> "ReplicaReport | None":
        if not stats or "num_free_blocks" not in stats:
            return None
        return cls(
            num_free_blocks=int(stats["num_free_blocks"]),
            num_total_blocks=int(stats["num_total_blocks"]),
            block_size=int(stats["block_size"]),
            num_running=int(stats.get("num_running", 0)),
            num_waiting=int(stats.get("num_waiting", 0)),
            report_time_s=float(stats.get("report_time_s", 0.0)),
            engine_dead=bool(stats.get("engine_dead", False)),
            num_lora_slots=int(stats.get("num_lora_slots", 0)),
            lora_slot_names=tuple(stats.get("lora_slot_names", ())),
            lora_host_names=frozenset(stats.get("lora_host_names", ())),
            recent_request_ids=frozenset(stats.get("recent_request_ids", ())),
            blocks_by_key=_positive_counts(stats.get("blocks_by_key")),
            peak_blocks_by_key=_positive_counts(stats.get("peak_blocks_by_key")),
        )


def _positive_counts(counts: Mapping[str, Any] | None) -> dict[str, int]:
    return {str(key): int(value) for key, value in (counts or {}).items() if int(value) > 0}


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt for the engine, plus what the router needs to place it."""

    request_id: str
    prompt: str | list[int]
    sampling_params: SamplingParams
    num_prompt_tokens: int
    prefix_key: bytes | None = None  # the cache's key of the first prompt block (the router's affinity key)
    max_new_tokens: int = 0  # n * max_tokens as resolved by the ingress
    # False: the client wants one response, so the replica sends the first delta (the ingress waits for it
    # to turn refusals into HTTP errors) and then everything else as one message at the end.
    stream: bool = True
    # The ingress's tokenization of `prompt`, so the replica does not tokenize it again (None: it does).
    prompt_token_ids: list[int] | None = None
    # Tokens the one completion of this request already produced on a replica that was lost: the engine
    # goes on from them (the ingress resumes a stream so; `n` is then 1).
    continuation: Continuation | None = None
    # The ingress replica whose stream channel carries this request's deltas (serve_app/stream_channel.py).
    reply_to: str = ""
    # vLLM's request priority (lower served earlier; the engine's `priority` scheduling policy reads it).
    priority: int = 0
    # The name of the API key that sent it (serve_app/tenants.py; never the key itself): the ingress's fair queue.
    api_key_name: str = ""
    # The LoRA adapter to run under (None: the base model), and where to load it from on a replica that does
    # not hold it yet (None: every replica has it from start-up).
    lora_name: str | None = None
    lora_path: str | None = None
    # Requests the sending ingress's fair queue held back when this one was sent: the replica passes the latest
    # count of each ingress to the autoscaler, which does not see them otherwise (serve_app/autoscaling.py).
    num_held_by_ingress: int = 0

    @property
    def routing_demand(self) -> RoutingDemand:
        return RoutingDemand(self.num_prompt_tokens, self.max_new_tokens, self.prefix_key, self.lora_name,
                             self.api_key_name)


@dataclass(frozen=True)
class Accepted:
    """`EngineReplica.submit`'s first item: the request runs on this replica; its deltas come through that
    replica's stream channel to the ingress."""

    replica_id: str


@dataclass(frozen=True)
class ChannelOpen:
    """Opens the stream channel of ingress replica `ingress_id` on engine replica `replica_id` (the router
    sends it to that replica and no other)."""

    ingress_id: str
    replica_id: str
    # The ingress's node address ("": unknown), so the replica hands out a loopback address to an ingress on its
    # own node and its node's address to one on another (serve_app/channel_socket.py).
    ingress_node_ip: str = ""


@dataclass(frozen=True)
class ChannelMessage:
    """One message on a stream channel: every item the replica had for that ingress's requests since the
    previous message, (request id, item) in order, and the replica's wall clock when it sent them (the ingress
    measures the channel's transit against its own)."""

    items: list[tuple[str, Any]]
    sent_at_s: float


@dataclass(frozen=True)
class ReplicaError:
    """A request that failed on the replica; the ingress turns it into an OpenAI error body."""

    status_code: int
    error_type: str
    message: str
    param: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    max_model_len: int
    block_size: int
    num_total_blocks: int
    tokenizer: Any  # HF tokenizer; pickles across processes
    lora_names: tuple[str, ...] = ()  # LoRA adapters the engine loaded at start-up (lora_modules)
