"""Tensor parallelism inside one engine: a group of ranks, the step broadcast, and the model's sharding.

Ownership: rank 0 is the engine's own process (scheduler, sampler, the only reader of logits). It
spawns `tp_size - 1` worker processes, joins them over a `TCPStore` that rank 0 opens on a port the
OS picks (no fixed ports), and drives them through `TensorParallelRunner`, which has the
`ModelRunner` interface: every command (plan memory, allocate the cache, run a step, stop) goes to
the workers as one pickled object broadcast over a gloo group, then every rank runs it. The KV
cache is sharded by heads, so every rank holds the same block ids and one block table serves all.

Process groups are built directly (`ProcessGroupGloo`, `ProcessGroupNCCL` on GPUs for the tensors,
plus a gloo side group for Python objects) rather than through `init_process_group`, whose default
group is a process-wide global: two engines can live in one process, and nothing outside is touched.
So the object broadcast is ours (`broadcast_object`: a size, then the pickled bytes, the two
broadcasts `broadcast_object_list` does) instead of `torch.distributed.broadcast_object_list`.

Sharding follows the model's own transformers plan (`config.base_model_tp_plan`: q/k/v and
gate/up "colwise", o_proj and down_proj "rowwise" with one all-reduce each), applied by us on
plain local tensors. We do not load through `from_pretrained(tp_plan="auto")` because: (1) in
transformers 5.24 that path builds DTensors, and `from_pretrained(tp_plan="auto", device_mesh=...)`
on a CPU gloo mesh left every weight whole in our check (no error, no sharding); (2) its colwise
style splits k/v rows evenly (transformers' TP code has no KV-head replication), so with fewer KV
heads than ranks it would cut one head's dimensions across ranks; we keep, on each rank, the one
KV head its query heads read; (3) our paged attention must see plain per-rank tensors with whole
heads. Beyond the plan we shard the LM head by vocabulary rows (all-gather of the logits, as
transformers' "colwise_gather_output") and the input embedding by vocabulary (mask, look up,
all-reduce), each only when the vocabulary divides. MoE experts follow the plan too: where it names them
(transformers 5.17's Qwen3-MoE and Mixtral plans: "packed_colwise" gate_up_proj, "rowwise" down_proj, and
"moe_tp_experts", an all-reduce of the experts' output) each rank keeps a slice of every expert's width, and the
fused MoE kernels run on that slice; where it does not (5.25 moved experts to an expert-parallel plan, which we
do not run), every rank holds every expert whole. FP8 layers (`quantization="fp8"`) are cut the same way with
their per-row scales: a column-parallel rank keeps its rows' scales, a row-parallel rank every scale (a row's
scale covers all its columns). They are FP8 before the cut (engine/runner/loader.py), so every rank holds the
e4m3 weights and scales of a TP=1 engine; only the per-token activation scales of a row-parallel layer differ
(each rank's amax over its own columns), so TP=2 logits are close to TP=1's, not equal bit for bit.
Every rank reads the whole checkpoint on the host and cuts it before moving its part to its device:
device memory holds one shard, host memory briefly one full copy per rank. Random weights
(`load_format="dummy"`) are instead drawn whole on each rank's device from the config's seed, so all
ranks cut the same model, and a TP=1 engine on the same GPU type draws it too (TP=1 vs TP=2 compares).
The collectives are torch custom ops (`pagedserve::tp_all_reduce`, `pagedserve::tp_all_gather_last_dim`),
so compiled decoder layers keep one graph each (tested with gloo) and decode CUDA graphs capture the
NCCL calls (`test_tp2_nccl_on_gpus_matches_tp1`, on two GPUs).

Failure: ranks fail together. A worker that dies is seen before the next step (process liveness)
or inside a collective (gloo's sockets close; the groups also carry a timeout), and rank 0 then
raises `EngineDeadError` and stops the rest. NCCL on one host sees no dead peer: rank 0 would wait in the
collective until the group's timeout, so a server whose core runs in its own process also watches the
workers' processes from its health check (engine/process/client.py) and kills the blocked core. At
start-up rank 0 watches the workers while it joins the group (gloo's rendezvous would wait the group's
whole timeout for a rank that died before joining). A worker whose rank 0 disappears exits the same way.
Shutdown: rank 0 sends "stop", and every rank tears the group down (`RankGroup.close`) before exiting.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import pickle
import re
import threading
import time
import traceback
import weakref
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pagedserve.cache.sizing import MemoryPlan
from pagedserve.config.engine import ConfigError
from pagedserve.config.resolve import ResolvedConfig
from torch import nn

from pagedserve.engine.errors import EngineDeadError
from pagedserve.engine.kernels.fp8_linear import Fp8Linear
from pagedserve.engine.runner.loader import LoadedModel, ShardCut, load_model, read_model_config
from pagedserve.engine.runner.model_runner import ModelRunner
from pagedserve.engine.runner.step_input import StepInput

logger = logging.getLogger(__name__)

# A rank that is stuck (not dead) fails the group after this; it also bounds a collective's wait for a
# rank still loading its shard at start-up. A dead rank is seen at once (liveness, closed sockets).
GROUP_TIMEOUT_S = 600.0
_IDLE_WAIT = timedelta(days=3650)  # a worker waits for the next command as long as the engine idles


# ---- collectives as torch ops ----------------------------------------------------------------------
# The sharded model's hooks call these ops, not the process group: to torch.compile an op is opaque, so
# a decoder layer stays one compiled graph with its all-reduce inside (a direct call on the process group
# would break the graph there), and a decode CUDA graph can capture the NCCL kernels like any other.
# Out of place: the op returns the reduced copy, so compile needs no mutation handling around it.
_GROUPS: "weakref.WeakValueDictionary[int, RankGroup]" = weakref.WeakValueDictionary()
_group_ids = itertools.count()


@torch.library.custom_op("pagedserve::tp_all_reduce", mutates_args=())
def _all_reduce_op(tensor: torch.Tensor, group_id: int) -> torch.Tensor:
    reduced = tensor.clone()
    _GROUPS[group_id].data.allreduce([reduced]).wait()
    return reduced


@_all_reduce_op.register_fake
def _(tensor: torch.Tensor, group_id: int) -> torch.Tensor:
    return torch.empty_like(tensor)


@torch.library.custom_op("pagedserve::tp_all_gather_last_dim", mutates_args=())
def _all_gather_op(tensor: torch.Tensor, group_id: int) -> torch.Tensor:
    group = _GROUPS[group_id]
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(group.world_size)]
    group.data.allgather([parts], [tensor]).wait()
    return torch.cat(parts, dim=-1)


@_all_gather_op.register_fake
def _(tensor: torch.Tensor, group_id: int) -> torch.Tensor:
    return tensor.new_empty((*tensor.shape[:-1], tensor.shape[-1] * _GROUPS[group_id].world_size))


# ---- process groups --------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class RankGroup:
    """One rank's view of the group: `data` carries the model's tensors, `control` Python objects."""

    rank: int
    world_size: int
    data: Any  # a torch.distributed Backend (gloo or NCCL)
    control: Any  # gloo
    id: int = dataclasses.field(default_factory=lambda: next(_group_ids))

    def __post_init__(self) -> None:
        _GROUPS[self.id] = self  # what the ops find by id; gone with the group

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, as a new tensor."""
        return torch.ops.pagedserve.tp_all_reduce(tensor, self.id)

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.ops.pagedserve.tp_all_gather_last_dim(tensor, self.id)

    def min_over_ranks(self, values: list[int]) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.int64)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self.control.allreduce([tensor], options).wait()
        return tensor.tolist()

    def close(self, peers_alive: bool = True) -> None:
        """Tear the group down before the process exits. NCCL's communicators are torn down together
        (every rank calls this when it stops): left to the destructor at exit, rank 0 can hang there.
        With a rank gone, `abort` instead of waiting for it."""
        for backend in (self.data, self.control):
            try:
                backend.shutdown() if peers_alive else backend.abort()
            except Exception:  # noqa: BLE001 -- exiting anyway; a backend without either is fine
                logger.debug("closing a tensor-parallel backend failed", exc_info=True)
        _GROUPS.pop(self.id, None)

    def broadcast_object(self, obj: Any = None, wait_idle: bool = False) -> Any:
        """Rank 0 sends `obj`; every rank returns it. Two broadcasts: the size, then the bytes.

        `wait_idle`: a worker waiting for its next command may wait longer than the group's timeout.
        """
        if self.rank == 0:
            payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            size = torch.tensor([len(payload)], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self.control.broadcast(size, 0, _IDLE_WAIT if wait_idle else None).wait()
        if self.rank == 0:
            buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        else:
            buffer = torch.empty(int(size.item()), dtype=torch.uint8)
        self.control.broadcast(buffer, 0).wait()
        return obj if self.rank == 0 else pickle.loads(buffer.numpy().tobytes())


def join_group(store: Any, rank: int, world_size: int, device: torch.device, timeout_s: float) -> RankGroup:
    timeout = timedelta(seconds=timeout_s)
    control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, world_size, timeout)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        options.is_high_priority_stream = False
        options.global_ranks_in_group = list(range(world_size))  # as new_group sets it (watchdog logs)
        data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, world_size, options)
    else:
        data = dist.ProcessGroupGloo(dist.PrefixStore("data", store), rank, world_size, timeout)
    return RankGroup(rank, world_size, data, control)


# ---- sharding ---------------------------------------------------------------------------------------
def check_shardable(model_config: Any, tp_size: int) -> None:
    """Raise `ConfigError` naming tp_size when the model's heads or widths do not split over the ranks."""
    text = model_config.get_text_config()
    num_heads = text.num_attention_heads
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    intermediate = getattr(text, "intermediate_size", None)
    plan = getattr(text, "base_model_tp_plan", None)
    if not plan:
        raise ConfigError(f"EngineConfig.tp_size={tp_size}: model type {text.model_type!r} has no tensor-parallel plan")
    if num_heads % tp_size:
        raise ConfigError(
            f"EngineConfig.tp_size={tp_size} must divide the model's {num_heads} attention heads"
        )
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ConfigError(
            f"EngineConfig.tp_size={tp_size}: the model's {num_kv_heads} KV heads neither split over nor "
            f"replicate evenly onto {tp_size} ranks"
        )
    if intermediate is not None and intermediate % tp_size:
        raise ConfigError(f"EngineConfig.tp_size={tp_size} must divide the MLP width {intermediate}")
    expert_width = getattr(text, "moe_intermediate_size", None) or intermediate
    if "moe_tp_experts" in plan.values() and expert_width is not None and expert_width % tp_size:
        raise ConfigError(f"EngineConfig.tp_size={tp_size} must divide the experts' width {expert_width}")


def _pattern_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")


def _keep_rows(linear: nn.Linear | Fp8Linear, rows: slice) -> None:
    linear.weight = nn.Parameter(linear.weight.data[rows].clone(), requires_grad=False)
    if isinstance(linear, Fp8Linear):  # a scale per output feature: the rows' own
        linear.weight_scale = nn.Parameter(linear.weight_scale.data[rows].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[rows].clone(), requires_grad=False)
    linear.out_features = linear.weight.shape[0]
    _check_scaled_mm_shape(linear)


def _keep_columns(linear: nn.Linear | Fp8Linear, columns: slice, rank: int) -> None:
    # An FP8 layer keeps every row's scale whole: each rank quantizes its own slice of the activations per
    # token, and its partial product leaves the GEMM dequantized (times both scales), so the all-reduce sums
    # plain partial outputs, as for a bf16 layer.
    linear.weight = nn.Parameter(linear.weight.data[:, columns].clone(), requires_grad=False)
    if linear.bias is not None and rank != 0:
        # The partial outputs are summed: the bias must enter the sum once.
        linear.bias = nn.Parameter(torch.zeros_like(linear.bias.data), requires_grad=False)
    linear.in_features = linear.weight.shape[1]
    _check_scaled_mm_shape(linear)


def _check_scaled_mm_shape(linear: nn.Linear | Fp8Linear) -> None:
    """A cut FP8 layer whose widths are no longer multiples of 16 leaves `_scaled_mm` for the reference."""
    if isinstance(linear, Fp8Linear) and (linear.in_features % 16 or linear.out_features % 16):
        linear.use_scaled_mm = False


def _split(size: int, rank: int, world_size: int) -> slice:
    part = size // world_size
    return slice(rank * part, (rank + 1) * part)


def shard_model(model: nn.Module, group: RankGroup) -> dict[str, ShardCut]:
    """Cut `model` in place to this rank's shard, with the collectives as forward hooks; returns what each cut
    linear layer kept, by its name in `model` (LoRA adapters are cut the same way: engine/runner/lora.py)."""
    rank, world = group.rank, group.world_size
    text = model.config.get_text_config()
    num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    plan = dict(text.base_model_tp_plan)
    base = model.base_model
    base_prefix = next(name for name, module in model.named_modules() if module is base)
    cuts: dict[str, ShardCut] = {}
    applied = 0
    for name, module in base.named_modules():
        style = next((s for p, s in plan.items() if _pattern_regex(p).match(name)), None)
        if style is None:
            continue
        if style == "replicated_with_grad_allreduce":  # Qwen3's per-head q/k norms: whole on every rank
            continue
        if style == "moe_tp_experts":  # transformers <= 5.2x's plans for Qwen3-MoE and Mixtral name the experts
            _shard_experts(module, name, plan, rank, world)
            module.register_forward_hook(lambda _m, _i, output: group.all_reduce(output))
            applied += 1
            continue
        if not isinstance(module, (nn.Linear, Fp8Linear)):
            raise ConfigError(f"tensor-parallel plan entry {name!r} ({style}) is not a linear layer")
        leaf = name.rsplit(".", 1)[-1]
        full_name = f"{base_prefix}.{name}" if base_prefix else name
        if style == "colwise" and leaf in ("k_proj", "v_proj") and num_kv_heads < world:
            # Fewer KV heads than ranks: each rank keeps the one KV head its query heads read.
            head = rank * num_kv_heads // world
            cuts[full_name] = ShardCut("colwise", slice(head * head_dim, (head + 1) * head_dim), module.out_features)
            _keep_rows(module, cuts[full_name].kept)
        elif style == "colwise":
            cuts[full_name] = ShardCut("colwise", _split(module.out_features, rank, world), module.out_features)
            _keep_rows(module, cuts[full_name].kept)
        elif style == "rowwise":
            cuts[full_name] = ShardCut("rowwise", _split(module.in_features, rank, world), module.in_features)
            _keep_columns(module, cuts[full_name].kept, rank)
            module.register_forward_hook(lambda _m, _i, output: group.all_reduce(output))
        else:
            raise ConfigError(f"tensor-parallel style {style!r} of {name!r} is not supported by pagedserve")
        applied += 1
    if not applied:
        raise ConfigError(f"the tensor-parallel plan {plan} matched no layer of {type(base).__name__}")
    _shard_vocab(model, group)
    return cuts


def _shard_experts(experts: nn.Module, name: str, plan: dict[str, str], rank: int, world: int) -> None:
    """A MoE block's experts module under the plan's "moe_tp_experts": each rank keeps its slice of every
    expert's intermediate features, the gate and up rows of `gate_up_proj` [E, 2I, H] ("packed_colwise": the
    same slice of each half) and the columns of `down_proj` [E, H, I] ("rowwise"), so its output is a partial
    sum that the module's all-reduce hook completes (transformers' MoeExpertsParallel). The fused MoE kernels
    (engine/kernels/moe/) and transformers' experts code both run on the cut as on a narrower model."""
    styles = {param: next((s for p, s in plan.items() if _pattern_regex(p).match(f"{name}.{param}")), None)
              for param in ("gate_up_proj", "down_proj")}
    if styles != {"gate_up_proj": "packed_colwise", "down_proj": "rowwise"}:
        raise ConfigError(f"tensor-parallel plan for the experts {name!r}: {styles} is not supported by pagedserve")
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True) \
            or getattr(experts, "has_bias", False) or gate_up.dim() != 3:
        raise ConfigError(f"tensor parallel of the experts {name!r}: transposed, interleaved or biased expert weights "
                          "are not supported by pagedserve")
    intermediate = gate_up.shape[1] // 2
    rows = _split(intermediate, rank, world)
    gate_rows = gate_up.data[:, rows]
    up_rows = gate_up.data[:, intermediate + rows.start : intermediate + rows.stop]
    experts.gate_up_proj = nn.Parameter(torch.cat([gate_rows, up_rows], dim=1).contiguous(), requires_grad=False)
    experts.down_proj = nn.Parameter(down.data[:, :, rows].contiguous(), requires_grad=False)
    gate_up_scale = getattr(experts, "gate_up_proj_scale", None)  # FP8 experts (engine/kernels/moe/fp8.py)
    if gate_up_scale is not None:  # the kept gate and up rows' scales; down_proj keeps every row, and its scales
        kept = torch.cat([gate_up_scale.data[:, rows], gate_up_scale.data[:, intermediate + rows.start:
                                                                           intermediate + rows.stop]], dim=1)
        experts.gate_up_proj_scale = nn.Parameter(kept.contiguous(), requires_grad=False)
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = rows.stop - rows.start


def _shard_vocab(model: nn.Module, group: RankGroup) -> None:
    """LM head by vocabulary rows (logits all-gathered); input embedding by vocabulary (all-reduced)."""
    rank, world = group.rank, group.world_size
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    if isinstance(head, nn.Linear) and head.out_features % world == 0:
        # Tied weights: the head gets its own slice, so the embedding's cut below stays independent.
        _keep_rows(head, _split(head.out_features, rank, world))
        head.register_forward_hook(lambda _m, _i, output: group.all_gather_last_dim(output))
    if isinstance(embedding, nn.Embedding) and embedding.num_embeddings % world == 0:
        rows = _split(embedding.num_embeddings, rank, world)
        embedding.weight = nn.Parameter(embedding.weight.data[rows].clone(), requires_grad=False)
        embedding.num_embeddings = embedding.weight.shape[0]
        if embedding.padding_idx is not None:
            embedding.padding_idx = None  # only matters for training
        masks: list[torch.Tensor] = []

        def local_ids(_module: nn.Module, args: tuple) -> tuple:
            ids = args[0]
            outside = (ids < rows.start) | (ids >= rows.stop)
            masks.append(outside)
            return ((ids - rows.start).masked_fill(outside, 0), *args[1:])

        def reduce_rows(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
            return group.all_reduce(output.masked_fill(masks.pop()[..., None], 0.0))

        embedding.register_forward_pre_hook(local_ids)
        embedding.register_forward_hook(reduce_rows)


def load_sharded(settings: ResolvedConfig, group: RankGroup) -> LoadedModel:
    return load_model(settings.load, shard=lambda model: shard_model(model, group))


# ---- device per rank ---------------------------------------------------------------------------------
def _rank_device(settings: ResolvedConfig, rank: int) -> torch.device:
    if settings.runner.device == "cpu":
        return torch.device("cpu")
    torch.cuda.set_device(rank)  # the replica sees its group's GPUs as cuda:0..tp_size-1
    return torch.device("cuda", rank)


# ---- worker ranks ------------------------------------------------------------------------------------
def _status_key(rank: int, stage: str) -> str:
    return f"pagedserve/rank{rank}/{stage}"


def _worker_main(rank: int, settings: ResolvedConfig, host: str, port: int, timeout_s: float) -> None:
    """A worker rank: join, load its shard, then run every command rank 0 broadcasts until "stop".

    Start-up status goes through the rendezvous store: "started" once connected, then "ready" or
    "error" with the message that rank 0 raises for the user.
    """
    tp_size = settings.runner.tp_size
    store = dist.TCPStore(host, port, tp_size, is_master=False, timeout=timedelta(seconds=timeout_s))
    store.set(_status_key(rank, "started"), b"")
    try:
        device = _rank_device(settings, rank)
        group = join_group(store, rank, tp_size, device, timeout_s)
        runner = ModelRunner(load_sharded(settings, group), settings.runner, settings.cache)
    except BaseException as exc:
        store.set(_status_key(rank, "error"), pickle.dumps((f"{type(exc).__name__}: {exc}", isinstance(exc, ConfigError))))
        raise SystemExit(1) from exc
    store.set(_status_key(rank, "ready"), b"")
    while True:
        try:
            command, payload = group.broadcast_object(wait_idle=True)
        except BaseException as exc:  # noqa: BLE001
            # Rank 0 is gone (its process ended without shutdown): there is nothing left to serve.
            logger.info("tensor-parallel rank %d: rank 0 closed the group (%s); exiting", rank, exc)
            os._exit(0)
        try:
            if command == "step":
                runner.execute(payload)
            elif command == "plan":
                plan = runner.plan_memory(*payload)
                group.min_over_ranks(list(plan.num_blocks))
            elif command == "allocate":
                runner.allocate_kv_cache(payload)
            elif command == "graphs":
                *args, graph_kinds = payload
                runner.capture_cuda_graphs(*args, **graph_kinds)
            elif command == "lora_add":  # rank 0 read and checked the same adapter first
                runner.lora.add(*payload)
            elif command == "lora_remove":
                runner.lora.remove(payload)
            elif command == "stop":
                group.close()
                return
            else:
                raise RuntimeError(f"unknown tensor-parallel command {command!r}")
        except BaseException:  # noqa: BLE001 - exit so that rank 0's collectives fail instead of waiting
            logger.error("tensor-parallel rank %d failed in %r:\n%s", rank, command, traceback.format_exc())
            os._exit(1)


# ---- rank 0 ------------------------------------------------------------------------------------------
class TensorParallelRunner:
    """Rank 0's runner: the `ModelRunner` interface, with every call mirrored on the worker ranks."""

    def __init__(self, runner: ModelRunner, group: RankGroup, workers: list[Any]) -> None:
        self.local = runner
        self.group = group
        self.workers = workers
        self.dead_reason: str | None = None

    def __getattr__(self, name: str) -> Any:
        # shape, device, dtype, block_size, kv_caches, weights_bytes ...: rank 0's own (per-rank) values.
        return getattr(self.local, name)

    @property
    def lora(self) -> "MirroredLora | None":
        return None if self.local.lora is None else MirroredLora(self)

    def check_alive(self) -> None:
        if self.dead_reason is None:
            dead = [(rank, p.exitcode) for rank, p in enumerate(self.workers, start=1) if not p.is_alive()]
            if dead:
                self._fail("tensor-parallel worker " + ", ".join(f"rank {r} exited ({code})" for r, code in dead))
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)

    def _fail(self, reason: str) -> None:
        self.dead_reason = reason
        logger.error("%s; stopping the group", reason)
        self._stop_workers(graceful=False)

    def _mirrored(self, command: str, payload: Any, local_call: Any) -> Any:
        self.check_alive()
        try:
            self.group.broadcast_object((command, payload))
            return local_call()
        except ConfigError:  # a user mistake found on rank 0 (e.g. num_blocks too large): say so as is
            self._fail(f"tensor-parallel {command} refused by the configuration")
            raise
        except Exception as exc:
            # A collective broke or one rank's forward failed: the ranks are out of step for good.
            self._fail(f"tensor-parallel {command} failed: {type(exc).__name__}: {exc}")
            raise EngineDeadError(self.dead_reason) from exc

    def plan_memory(self, max_num_seqs: int, max_model_len: int, max_batch_tokens: int) -> MemoryPlan:
        def plan() -> MemoryPlan:
            local = self.local.plan_memory(max_num_seqs, max_model_len, max_batch_tokens)
            # Every rank must hold the same block ids: the smallest rank's count binds.
            num_blocks = tuple(self.group.min_over_ranks(list(local.num_blocks)))
            return dataclasses.replace(local, num_blocks=num_blocks)

        return self._mirrored("plan", (max_num_seqs, max_model_len, max_batch_tokens), plan)

    def allocate_kv_cache(self, num_blocks: tuple[int, ...]) -> None:
        self._mirrored("allocate", tuple(num_blocks), lambda: self.local.allocate_kv_cache(num_blocks))

    def capture_cuda_graphs(self, max_batch_size: int, max_model_len: int, reserved_bytes: int = 0,
                            **graph_kinds: int) -> bool:
        """Every rank captures the same graphs (`ModelRunner.capture_cuda_graphs`; `graph_kinds`: its keywords
        for the verification and mixed-step graphs): each step then replays the same graph on every rank."""
        payload = (max_batch_size, max_model_len, reserved_bytes, graph_kinds)
        return self._mirrored(
            "graphs", payload,
            lambda: self.local.capture_cuda_graphs(max_batch_size, max_model_len, reserved_bytes, **graph_kinds),
        )

    def execute(self, step: StepInput, previous_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if step.pending_input_indices:  # the worker ranks never see rank 0's sampled tokens
            raise ValueError("tensor-parallel steps take no pending device tokens (async scheduling is off)")
        return self._mirrored("step", step, lambda: self.local.execute(step))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every worker: a "stop" command when the group is healthy, a kill otherwise; then close the
        group on this side as the workers close theirs. Idempotent."""
        if self.dead_reason is None and all(p.is_alive() for p in self.workers):
            try:
                self.group.broadcast_object(("stop", None))
            except Exception:
                logger.warning("could not send stop to the tensor-parallel workers", exc_info=True)
            else:
                # Bounded: a teardown that waits on a rank which never comes must not hold the shutdown.
                closer = threading.Thread(target=self.group.close, name="pagedserve-tp-close", daemon=True)
                closer.start()
                closer.join(timeout_s)
                if closer.is_alive():
                    logger.warning("the tensor-parallel group did not close within %.0f s", timeout_s)
            self.dead_reason = "the engine was shut down"
        elif self.group.id in _GROUPS:
            self.group.close(peers_alive=False)
        self._stop_workers(graceful=True, timeout_s=timeout_s)

    def _stop_workers(self, graceful: bool, timeout_s: float = 10.0) -> None:
        for process in self.workers:
            if graceful:
                process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join(timeout_s)


class MirroredLora:
    """Rank 0's `LoraManager` with every change of the adapters mirrored on the worker ranks, each of which
    keeps its own part of every adapter (engine/runner/lora.py). Rank 0 reads and checks an adapter first, so
    a refusal (a `ConfigError`: the user's) reaches no worker and leaves the group as it was. Device slots
    need no mirroring: each rank maps the step's adapter names to its own slots (`StepInput.lora_names`)."""

    def __init__(self, runner: TensorParallelRunner) -> None:
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner.local.lora, name)  # has, adapters, slot and host names, counters: rank 0's

    def add(self, name: str, path: str) -> Any:
        adapter = self._runner.local.lora.add(name, path)
        # The folder rank 0 resolved (a hub id is fetched once); the ranks share the host.
        self._runner._mirrored("lora_add", (name, adapter.path), lambda: None)
        return adapter

    def remove(self, name: str) -> None:
        self._runner.local.lora.remove(name)
        self._runner._mirrored("lora_remove", name, lambda: None)


def start_tensor_parallel(
    settings: ResolvedConfig, timeout_s: float | None = None
) -> tuple[LoadedModel, TensorParallelRunner]:
    """Check the model splits, spawn the workers, join them, load rank 0's shard; errors are clear."""
    timeout_s = GROUP_TIMEOUT_S if timeout_s is None else timeout_s

    load = settings.load
    tp_size = settings.runner.tp_size
    if load.quantization not in ("none", "fp8"):
        raise ConfigError(f"EngineConfig.tp_size={tp_size} cannot be combined with quantization={load.quantization!r}")
    check_shardable(read_model_config(load.model, load.revision, load.trust_remote_code), tp_size)
    device = _rank_device(settings, 0)
    if device.type == "cuda" and torch.cuda.device_count() < tp_size:
        raise ConfigError(
            f"EngineConfig.tp_size={tp_size} needs {tp_size} GPUs, but {torch.cuda.device_count()} are visible"
        )
    host = "127.0.0.1"
    store = dist.TCPStore(
        host, 0, tp_size, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )
    context = mp.get_context("spawn")  # fork would copy rank 0's threads and CUDA state
    workers = []
    for rank in range(1, tp_size):
        process = context.Process(
            target=_worker_main, args=(rank, settings, host, store.port, timeout_s),
            name=f"pagedserve-tp-rank{rank}", daemon=True,
        )
        process.start()
        workers.append(process)
    # The workers' start-up statuses are read over a connection of their own: a store client runs one operation at
    # a time, and the group's rendezvous holds `store`'s in a wait for up to the timeout (while a worker that died
    # never answers it), which would hold every status read behind it.
    status = dist.TCPStore(host, store.port, None, False, timeout=timedelta(seconds=timeout_s))
    try:
        # Joining blocks until every rank connects: first see each worker start (or die), not hang.
        _wait_for(status, workers, "started", timeout_s)
        group = _join_watching_workers(store, status, workers, device, timeout_s)
        loaded = load_sharded(settings, group)
        local = ModelRunner(loaded, settings.runner, settings.cache)  # its probe forward runs beside the workers' probes
        _wait_for(status, workers, "ready", timeout_s)
    except BaseException as exc:
        for process in workers:
            process.kill()
            process.join(5)
        worker_error = _first_worker_error(status, len(workers))
        if worker_error is not None and worker_error is not exc:
            raise worker_error from exc
        raise
    return loaded, TensorParallelRunner(local, group, workers)


def _wait_for(store: Any, workers: list[Any], stage: str, timeout_s: float) -> None:
    """Poll the store until every worker reached `stage`; a worker's error or death raises at once."""
    waiting = set(range(1, len(workers) + 1))
    deadline = time.monotonic() + timeout_s
    while waiting:
        _raise_worker_error(store, len(workers))
        waiting = {rank for rank in waiting if not store.check([_status_key(rank, stage)])}
        _raise_if_dead(workers, waiting)
        if waiting and time.monotonic() > deadline:
            raise EngineDeadError(f"tensor-parallel ranks {sorted(waiting)} not {stage} after {timeout_s} s")
        if waiting:
            time.sleep(0.05)


def _join_watching_workers(store: Any, status: Any, workers: list[Any], device: torch.device,
                           timeout_s: float) -> RankGroup:
    """Rank 0's `join_group` on `store`, run in a helper thread while this one watches the workers (their
    processes, and the errors they report, read over `status`: another connection to the same store).

    Gloo's rendezvous waits on the store for every peer's address, then for its connection, each up to the group's
    timeout, and sees no process die: a worker that dies (or fails) between "started" and its own join would hold
    rank 0 there that long. So a death or a reported error raises here at once. The helper, blocked in a constructor
    that nothing can interrupt, is then left to end at that timeout; it holds only the store.
    """
    outcome: list[Any] = []

    def join() -> None:
        try:
            outcome.append(join_group(store, 0, len(workers) + 1, device, timeout_s))
        except BaseException as exc:  # noqa: BLE001 -- raised below, on the engine's thread
            outcome.append(exc)

    joiner = threading.Thread(target=join, name="pagedserve-tp-join", daemon=True)
    joiner.start()
    while joiner.is_alive():
        _raise_worker_error(status, len(workers))
        _raise_if_dead(workers, range(1, len(workers) + 1))
        joiner.join(0.05)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _raise_worker_error(store: Any, num_workers: int) -> None:
    error = _first_worker_error(store, num_workers)
    if error is not None:
        raise error


def _raise_if_dead(workers: list[Any], ranks: Any) -> None:
    dead = [rank for rank in ranks if not workers[rank - 1].is_alive()]
    if dead:
        raise EngineDeadError(f"tensor-parallel rank {dead[0]} exited during start-up")


def _first_worker_error(store: Any, num_workers: int) -> Exception | None:
    """The first worker's start-up error as the error rank 0 raises: ConfigError stays ConfigError."""
    for rank in range(1, num_workers + 1):
        key = _status_key(rank, "error")
        if store.check([key]):
            message, is_config_error = pickle.loads(store.get(key))
            return (ConfigError if is_config_error else EngineDeadError)(f"tensor-parallel rank {rank}: {message}")
    return None
