"""Route each request to the replica with the most free KV blocks that can hold it.

Two parts, split so the policy is testable without Ray:

- `FreeBlocksPolicy`: plain Python. Replicas report free/total blocks every few seconds
  (`record_routing_stats`); between reports the policy keeps optimistic local accounting: every request
  it sends reserves `ceil((prompt + n * max_tokens) / block_size)` blocks on its replica until a report
  that counts the request arrives (the replica then counts it itself, as committed blocks): one listing it
  among the requests the replica received lately, or one taken `transit_grace_s` after the send.
  Among replicas with room it prefers the most headroom; a replica that recently served the same
  prompt prefix wins when its headroom is within `affinity_tolerance` of its blocks, or within the
  request's own blocks, of the best (its prefix cache hits; one request's worth is no imbalance, and the
  blocks of one that just ended stay subtracted until the next report); between equal headroom, the
  replica owning fewer recent prefixes, then a random one, so new prefixes spread over the replicas'
  caches. A request for a LoRA adapter goes first to the replicas with room that hold it in one of their
  `max_loras` device slots, then to those with it in host memory, then to the rest (within the last two, the
  replicas with more free slots first, so new adapters spread over the replicas' slots; then by headroom); a
  replica loads it into a slot when the request runs there. Holding the adapter puts a replica first only
  while its headroom is within `lora_affinity_tolerance` of its blocks (or the request's own blocks) of the
  best: past that it goes by headroom after the rest, so a hot adapter's requests spread to a replica that
  loads it too rather than fill its holders while the others idle. A replica this router just sent a request of the
  adapter to counts as holding it until a report taken `transit_grace_s` after that send (the request loads
  it there): otherwise the next requests, routed before that replica's report lists the adapter, would go by
  headroom and load it into the other replicas' slots too. Such sends fill the router's view of the
  replica's slots as the engine fills them, least recently used out, so a replica never counts as holding
  more adapters than it has slots. When no replica has room the request waits in a bounded queue
  (`AdmissionQueue`); past the bound or the timeout it is refused with `ServiceOverloadedError` (the
  ingress answers 429).
  With several API keys, each key's request leaves every replica the room the other recently active keys
  are owed there (serve_app/key_shares.py), less what they hold there service-wide: the blocks the replica
  reports for each key, plus this router's requests of it that no report counts yet. A request that finds
  no room it may take while its key already holds blocks (on any replica, through any ingress) is refused
  with `KeyOverShareError`, which the ingress's fair queue answers by holding the request until one of its
  key's requests ends (serve_app/fair_queue.py): it does not wait in Ray's routing line, where the router
  takes requests in arrival order (two at a time per replica) and it would hold up other keys' requests
  that have room. Only requests of keys holding nothing wait in that line.
- `FreeBlocksRequestRouter`: the thin adapter on Ray Serve's `RequestRouter` extension point
  (`request_router_config.request_router_class`). It reads the replicas' routing stats, asks the policy,
  and fails a request's routing future with a typed error when it must be refused.

Each ingress replica routes with its own policy. The replicas' reports are shared: their free blocks, and
each API key's blocks there, whichever ingress sent the key's requests, so every router sees a key's holding
and (through it) its demand service-wide, and a key that sends only through other ingresses is active here
too. Only the reservations of requests sent since the last report are not shared: with several ingress
replicas they can together send more than a replica's reported room, or a key more than its share, within
one report period; that replica then queues or preempts (never fails), and the next report corrects every
router.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Literal

from pagedserve.cache.blocks import blocks_for
from pagedserve.config.serve import RouterSettings
from pagedserve.engine.core.limits import KV_CACHE, too_large
from pagedserve.engine.errors import RequestTooLargeError
from pagedserve.serve_app.errors import ChannelLostError, KeyOverShareError, ServiceOverloadedError
from pagedserve.serve_app.key_shares import KeyShares
from pagedserve.serve_app.messages import ChannelOpen, ReplicaReport, RoutingDemand
from pagedserve.serve_app.metrics import RouterMetrics

logger = logging.getLogger("ray.serve")

ReplicaKey = Hashable


@dataclass
class _Reservation:
    """A request this router sent that has not ended yet (an ended one's reservation goes at once)."""

    replica: ReplicaKey
    num_blocks: int
    sent_time_s: float
    api_key_name: str = ""
    is_counted_by_report: bool = False  # the replica's latest report holds its blocks (free and per key)


@dataclass(frozen=True)
class RouteDecision:
    """`route`: try `replicas` in order; `wait`: none has room now; `too_large`: none ever could;
    `over_share`: none has room the request's API key may take, and the key already holds blocks while other
    keys are active (serve_app/key_shares.py)."""

    kind: Literal["route", "wait", "too_large", "over_share"]
    replicas: list[ReplicaKey] = field(default_factory=list)
    message: str = ""


class FreeBlocksPolicy:
    """Most-free-blocks placement with optimistic accounting between replica reports. No Ray inside.

    Every request this router sent keeps a reservation until it ends. A reservation's blocks are charged by
    exactly one source: before a report counts it (`is_counted_by_report`), by this router's running sums;
    from then on, by the replica's latest report, in its free blocks and in its key's `blocks_by_key`, which
    cover every ingress's requests. So, per replica:

    - estimated free blocks = the report's free blocks - the blocks of reservations not counted yet;
    - what a key holds (`held_blocks`) = the report's blocks of the key + the blocks of its reservations not
      counted yet; `held_in_all` is that summed over the replicas.

    A request that ends no longer needs its reservation: not counted yet, it held nothing the report shows;
    counted, the latest report still holds its blocks (free and per key) until a report taken after its end
    drops them, and no reservation adds them a second time. The uncounted blocks are kept as running sums, in
    all and per key, per replica and over them, so a routing decision costs O(replicas x active keys), not
    O(requests in flight) (thousands, under load, in every ingress)."""

    def __init__(
        self,
        settings: RouterSettings | None = None,
        max_affinity_entries: int = 4096,
        transit_grace_s: float = 0.5,
        max_reservation_age_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        settings = settings or RouterSettings()
        self.max_reservation_age_s = max_reservation_age_s
        self.affinity_tolerance = settings.affinity_tolerance
        self.lora_affinity_tolerance = settings.lora_affinity_tolerance
        # A request sent at t reaches the replica a little later; only a report taken after t + grace
        # is trusted to include it.
        self.transit_grace_s = transit_grace_s
        self.max_affinity_entries = max_affinity_entries
        self._clock = clock
        self._reports: dict[ReplicaKey, ReplicaReport] = {}
        self._reservations: dict[str, _Reservation] = {}
        self._reservations_of: dict[ReplicaKey, dict[str, _Reservation]] = {}
        self._pending_blocks: dict[ReplicaKey, int] = {}  # blocks of reservations not counted by a report
        # The same blocks by API key, per replica and over all replicas (keys with none absent).
        self._pending_by_key: dict[ReplicaKey, dict[str, int]] = {}
        self._pending_in_all: dict[str, int] = {}
        self._reported_in_all: dict[str, int] = {}  # each key's blocks in the replicas' latest reports, summed
        self._reported_peaks_in_all: dict[str, int] = {}  # and each key's recent peaks there, summed
        self.shares = KeyShares(settings.fair_share_window_s, clock) if settings.fair_share_window_s > 0 else None
        self._prefix_owner: OrderedDict[bytes, ReplicaKey] = OrderedDict()
        self._num_prefixes_owned: dict[ReplicaKey, int] = {}
        # Per replica, when this router last sent it a request under each LoRA adapter, in send order; kept until a
        # report that must show the adapter there (taken transit_grace_s after the send) says what the replica holds.
        self._lora_sent_s: dict[ReplicaKey, dict[str, float]] = {}

    # Reports and replica set -------------------------------------------------------------------------

    def update_report(self, replica: ReplicaKey, report: ReplicaReport) -> None:
        """Take a fresh report; the reservations it counts (listed as received lately, or sent long enough
        before it was taken) are now part of its counts, free and per key, and no longer added by this router.
        Every key the report shows holding blocks, now or within the window (`peak_blocks_by_key`), is active:
        its demand is noted (`shares`), the larger of what it holds service-wide and the sum of its replicas'
        recent peaks, so a key whose requests come through other ingresses is owed its share here too, even one
        whose short requests all ended between two reports."""
        previous = self._reports.get(replica)
        if previous is not None and previous.report_time_s >= report.report_time_s:
            return
        if previous is not None:
            self._add_reported(previous, -1)
        self._add_reported(report, 1)
        self._reports[replica] = report
        sent = self._lora_sent_s.get(replica)
        if sent:
            for name in [n for n, sent_s in sent.items() if sent_s + self.transit_grace_s <= report.report_time_s]:
                del sent[name]
        for request_id, reservation in list(self._reservations_of.get(replica, {}).items()):
            if not reservation.is_counted_by_report and (
                request_id in report.recent_request_ids
                or reservation.sent_time_s + self.transit_grace_s <= report.report_time_s
            ):
                self._add_pending(reservation, -1)
                reservation.is_counted_by_report = True
            # One never completed (its routing was cancelled before the send) must not stay in flight forever.
            if reservation.is_counted_by_report and \
                    report.report_time_s - reservation.sent_time_s > self.max_reservation_age_s:
                self._drop(request_id)
        if self.shares is not None:
            for key in report.blocks_by_key.keys() | report.peak_blocks_by_key.keys():
                self.shares.note_demand(key, max(self.held_in_all(key), self._reported_peaks_in_all.get(key, 0)))

    def remove_replicas_except(self, live: set[ReplicaKey]) -> None:
        gone = (self._reports.keys() | self._reservations_of.keys()) - live
        if not gone:
            return
        for replica in gone:
            report = self._reports.pop(replica, None)
            if report is not None:
                self._add_reported(report, -1)
            for request_id in list(self._reservations_of.get(replica, {})):
                self._drop(request_id)
            self._reservations_of.pop(replica, None)
            self._pending_blocks.pop(replica, None)
            self._pending_by_key.pop(replica, None)
            self._num_prefixes_owned.pop(replica, None)
            self._lora_sent_s.pop(replica, None)
        for key in [k for k, r in self._prefix_owner.items() if r in gone]:
            del self._prefix_owner[key]

    def report(self, replica: ReplicaKey) -> ReplicaReport | None:
        return self._reports.get(replica)

    def _is_dead(self, replica: ReplicaKey) -> bool:
        report = self._reports.get(replica)
        return report is not None and report.engine_dead

    # Accounting --------------------------------------------------------------------------------------

    def blocks_needed(self, replica: ReplicaKey, demand: RoutingDemand) -> int | None:
        report = self._reports.get(replica)
        if report is None:
            return None
        return blocks_for(demand.num_tokens, report.block_size)

    def lora_slots(self, replica: ReplicaKey) -> list[str]:
        """The adapters this router takes to be in the replica's device slots, least recently used first: its latest
        report's, then, moved to the back in send order, each adapter this router sent it a request under that no
        report taken since can be trusted to show (the request loads it into a slot there), the least recently used
        dropped past the replica's slot count (`max_loras`), as the engine evicts them. Without that bound a replica
        kept sent all of the adapters in turn (each send renewing its grace) would count as holding every one and
        draw every request while it has room, swapping its slots all the while."""
        report = self._reports.get(replica)
        slots = list(report.lora_slot_names) if report is not None else []
        sent = self._lora_sent_s.get(replica)
        if sent:
            slots = [name for name in slots if name not in sent] + list(sent)
        num_slots = report.num_lora_slots if report is not None else 0
        return slots[-num_slots:] if num_slots > 0 else slots

    def holds_lora(self, replica: ReplicaKey, lora_name: str) -> bool:
        """Whether the adapter is in one of the replica's device slots as `lora_slots` has them. Registered is not
        enough: a replica registers every `lora_modules` adapter at start-up, but runs a request at once only
        under the `max_loras` adapters in its slots."""
        return lora_name in self.lora_slots(replica)

    def lora_tier(self, replica: ReplicaKey, lora_name: str) -> int:
        """How near the replica has the adapter: 0 in a device slot (`holds_lora`), 1 in host memory (a slot load
        is a copy), 2 neither (it reads the adapter's files first)."""
        return self._lora_tier(replica, lora_name, self.lora_slots(replica))

    def _lora_tier(self, replica: ReplicaKey, lora_name: str, slots: list[str]) -> int:
        if lora_name in slots:
            return 0
        report = self._reports.get(replica)
        return 1 if report is not None and lora_name in report.lora_host_names else 2

    def _lora_rank_key(self, replica: ReplicaKey, lora_name: str) -> tuple[int, int]:
        """(`lora_tier`, minus the free slots when it must load the adapter): lower is better. The slot view is
        built once for both."""
        slots = self.lora_slots(replica)
        tier = self._lora_tier(replica, lora_name, slots)
        if tier == 0:
            return (0, 0)
        report = self._reports.get(replica)
        num_slots = report.num_lora_slots if report is not None else 0
        return (tier, -max(0, num_slots - len(slots)))

    def estimated_free_blocks(self, replica: ReplicaKey) -> int | None:
        """Reported free blocks minus what was sent since that report (never below zero).

        Conservative on purpose: blocks the latest report counted as held stay subtracted until the next
        report, even if their request ended since (a request that ended before any report counted it holds
        nothing and is subtracted no more); the error is at most one report period of under-use, never an
        over-full replica."""
        report = self._reports.get(replica)
        if report is None:
            return None
        return max(0, report.num_free_blocks - self._pending_blocks.get(replica, 0))

    def num_in_flight(self, replica: ReplicaKey) -> int:
        return len(self._reservations_of.get(replica, ()))

    def held_blocks(self, replica: ReplicaKey) -> dict[str, int]:
        """Blocks each API key holds on `replica`: the latest report's (every ingress's requests it counted) plus
        this router's reservations there that no report has counted yet. Keys holding none are absent."""
        report = self._reports.get(replica)
        held = dict(report.blocks_by_key) if report is not None else {}
        for key, num_blocks in self._pending_by_key.get(replica, {}).items():
            held[key] = held.get(key, 0) + num_blocks
        return held

    def held_in_all(self, key: str) -> int:
        """Blocks `key` holds on all replicas: `held_blocks`' value for it, summed over the replicas."""
        return self._reported_in_all.get(key, 0) + self._pending_in_all.get(key, 0)

    def reserve(self, replica: ReplicaKey, request_id: str, demand: RoutingDemand | None) -> None:
        """Record a request sent to `replica` (re-routing the same id moves its reservation)."""
        num_blocks = 0
        if demand is not None:
            num_blocks = self.blocks_needed(replica, demand) or 0
            if demand.prefix_key is not None:
                self._own_prefix(demand.prefix_key, replica)
            if demand.lora_name is not None:
                sent = self._lora_sent_s.setdefault(replica, {})
                sent.pop(demand.lora_name, None)  # to the back: the order is the send order
                sent[demand.lora_name] = self._clock()
        self._drop(request_id)
        key = demand.api_key_name if demand is not None else ""
        reservation = _Reservation(replica, num_blocks, self._clock(), key)
        self._reservations[request_id] = reservation
        self._reservations_of.setdefault(replica, {})[request_id] = reservation
        self._add_pending(reservation, 1)

    def _own_prefix(self, prefix_key: bytes, replica: ReplicaKey) -> None:
        previous = self._prefix_owner.pop(prefix_key, None)
        if previous is not None:
            self._num_prefixes_owned[previous] -= 1
        self._prefix_owner[prefix_key] = replica
        self._num_prefixes_owned[replica] = self._num_prefixes_owned.get(replica, 0) + 1
        while len(self._prefix_owner) > self.max_affinity_entries:
            _, oldest_owner = self._prefix_owner.popitem(last=False)
            self._num_prefixes_owned[oldest_owner] -= 1

    def reserved_replica(self, request_id: str) -> ReplicaKey | None:
        """Where the request in flight `request_id` is reserved (None: not in flight, or already finished)."""
        reservation = self._reservations.get(request_id)
        return None if reservation is None else reservation.replica

    def release(self, request_id: str) -> None:
        """The request finished: its reservation goes. Not counted by a report yet, its blocks come back at once (it
        holds nothing now). Counted, the latest report still holds them, in its free blocks and its key's blocks,
        until a report taken after its end: the estimate errs low, never high, and adds nothing to them."""
        self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        """Forget a reservation, taking it out of the running sums."""
        reservation = self._reservations.pop(request_id, None)
        if reservation is None:
            return
        self._reservations_of.get(reservation.replica, {}).pop(request_id, None)
        if not reservation.is_counted_by_report:
            self._add_pending(reservation, -1)

    def _add_pending(self, reservation: _Reservation, sign: int) -> None:
        """Add (`sign` 1) or take out (-1) the blocks of a reservation no report counts, in its replica's sums and
        its key's."""
        num_blocks = sign * reservation.num_blocks
        replica, key = reservation.replica, reservation.api_key_name
        self._pending_blocks[replica] = self._pending_blocks.get(replica, 0) + num_blocks
        if num_blocks:
            _add_blocks(self._pending_by_key.setdefault(replica, {}), key, num_blocks)
            _add_blocks(self._pending_in_all, key, num_blocks)

    def _add_reported(self, report: ReplicaReport, sign: int) -> None:
        """Add (`sign` 1) or take out (-1) a report's blocks and recent peaks per key in the sums over the replicas."""
        for key, num_blocks in report.blocks_by_key.items():
            _add_blocks(self._reported_in_all, key, sign * num_blocks)
        for key, num_blocks in report.peak_blocks_by_key.items():
            _add_blocks(self._reported_peaks_in_all, key, sign * num_blocks)

    # Placement ---------------------------------------------------------------------------------------

    def decide(self, candidates: list[ReplicaKey], demand: RoutingDemand | None) -> RouteDecision:
        """Rank `candidates` for `demand`. A replica without a report yet (just started) is tried after those
        with room, one request at a time, until its first report says how much it holds."""
        if not candidates:
            return RouteDecision("wait")
        live = [c for c in candidates if not self._is_dead(c)]
        if demand is None:  # not a generation call (model info, stats, health): least in flight, ties random
            pool = live or candidates  # a dead engine answers with its error: only when no other is left
            shuffled = random.sample(pool, len(pool))
            return RouteDecision("route", sorted(shuffled, key=self.num_in_flight))
        unknown = [c for c in live if c not in self._reports and self.num_in_flight(c) == 0]
        # Sizes come from every report, a dead engine's too: its replacement will hold as much.
        known = [c for c in candidates if c in self._reports]
        fits_ever = [c for c in known if self.blocks_needed(c, demand) <= self._reports[c].num_total_blocks]
        if known and not fits_ever and not unknown:
            largest = max(known, key=lambda c: self._reports[c].num_total_blocks)
            report = self._reports[largest]
            error = too_large(demand.num_prompt_tokens, demand.max_new_tokens,
                              report.num_total_blocks * report.block_size, KV_CACHE)
            return RouteDecision("too_large", message=error.message)

        demands = self._note_demand(demand, fits_ever)
        headroom: dict[ReplicaKey, int] = {}
        for replica in fits_ever:
            if self._is_dead(replica):
                continue  # a request waits for the replacement rather than go to a dead engine
            free = self.estimated_free_blocks(replica)
            needed = self.blocks_needed(replica, demand)
            if free is None or needed is None or free < needed:
                continue
            if demands is not None and free - needed < self.shares.owed_to_others(
                    demand.api_key_name, needed, self._reports[replica].num_total_blocks, self.held_blocks(replica),
                    demands):
                continue
            headroom[replica] = free - needed
        # Ties (idle replicas, say) go to the replica owning fewer recent prefixes, so that new prefixes spread
        # over the replicas' caches, then to a random one.
        ranked = sorted(random.sample(list(headroom), len(headroom)),
                        key=lambda c: (-headroom[c], self.num_in_flight(c), self._num_prefixes_owned.get(c, 0)))
        if ranked and demand.prefix_key is not None:
            owner = self._prefix_owner.get(demand.prefix_key)
            if owner in headroom and owner != ranked[0] and self._near_best(
                    owner, demand, headroom[owner], headroom[ranked[0]], self.affinity_tolerance):
                ranked.remove(owner)
                ranked.insert(0, owner)
        if demand.lora_name is not None and ranked:
            # Adapter affinity first, among replicas with room only: one with the adapter in a device slot serves
            # it at once; then one with it in host memory (a copy into a slot); the rest read it first. A replica
            # that must load it goes by free slots next (a load into a free one evicts nothing another adapter's
            # requests come back for), so new adapters spread over the replicas' slots. Then the order above.
            # A replica far behind the best in headroom loses that priority (it keeps its place by headroom after
            # the rest): a hot adapter's requests then go to a replica with room that loads it too.
            best = max(headroom.values())  # ranked[0] may be a prefix owner by now
            keys = {c: self._lora_rank_key(c, demand.lora_name)
                    if self._near_best(c, demand, headroom[c], best, self.lora_affinity_tolerance) else (3, 0)
                    for c in ranked}
            ranked.sort(key=keys.__getitem__)
        ranked.extend(unknown)
        if not ranked:
            # While other keys are active, a key that already holds blocks waits for room in its ingress, not in
            # Ray's routing line, where it would hold up their requests (see the module docstring).
            if demands is not None and self.held_in_all(demand.api_key_name) > 0:
                return RouteDecision("over_share")
            return RouteDecision("wait")
        return RouteDecision("route", ranked)

    def _near_best(self, replica: ReplicaKey, demand: RoutingDemand, headroom: int, best: int, share: float) -> bool:
        """Whether the replica's `headroom` is within `share` of its total blocks, or within the request's own
        blocks if more, of the `best` headroom: how far an affinity (a cached prefix, a held adapter) may pull a
        request from the replica with the most room."""
        margin = max(share * self._reports[replica].num_total_blocks, self.blocks_needed(replica, demand))
        return headroom >= best - margin

    def _note_demand(self, demand: RoutingDemand, replicas: list[ReplicaKey]) -> dict[str, int] | None:
        """Record what the demand's key wants now (what it holds plus this request); the active keys' peak
        demands when there are several (shares apply), else None."""
        if self.shares is None or not replicas:
            return None
        needed = self.blocks_needed(replicas[0], demand) or 0
        key = demand.api_key_name
        self.shares.note_demand(key, self.held_in_all(key) + needed)
        demands = self.shares.active_demands()
        return demands if len(demands) > 1 else None


def _add_blocks(blocks_by_key: dict[str, int], key: str, num_blocks: int) -> None:
    """Add `num_blocks` (negative: take them out) to `key`'s count; a key left with none is removed."""
    total = blocks_by_key.get(key, 0) + num_blocks
    if total:
        blocks_by_key[key] = total
    else:
        blocks_by_key.pop(key, None)


class AdmissionQueue:
    """Bounded wait for requests no replica has room for. Plain Python; ids come from the caller."""

    def __init__(
        self, max_queued_requests: int, queue_timeout_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_queued_requests = max_queued_requests
        self.queue_timeout_s = queue_timeout_s
        self._clock = clock
        self._waiting_since: dict[str, float] = {}

    @property
    def num_waiting(self) -> int:
        return len(self._waiting_since)

    def wait(self, request_id: str) -> Literal["wait", "full", "timed_out"]:
        """Called each time `request_id` finds no room: queue it, or say why it must be refused."""
        since = self._waiting_since.get(request_id)
        if since is None:
            if len(self._waiting_since) >= self.max_queued_requests:
                return "full"
            self._waiting_since[request_id] = self._clock()
            return "wait"
        if self._clock() - since > self.queue_timeout_s:
            del self._waiting_since[request_id]
            return "timed_out"
        return "wait"

    def leave(self, request_id: str) -> None:
        self._waiting_since.pop(request_id, None)

    def waiting_ids(self) -> list[str]:
        return list(self._waiting_since)


def _ray_request_router_base() -> type:
    from ray.serve.request_router import RequestRouter

    return RequestRouter


class FreeBlocksRequestRouter(_ray_request_router_base()):  # type: ignore[misc]
    """Ray Serve adapter: routing stats in, `FreeBlocksPolicy` decisions out, 429/400 via typed errors.

    Runs inside the caller's process (the ingress), once per deployment handle. Configure through
    `request_router_config.request_router_kwargs`: the fields of `RouterSettings` (config/serve.py), the one
    place their defaults live.
    """

    def initialize_state(self, **router_kwargs: Any) -> None:
        settings = RouterSettings(**router_kwargs)
        self.policy = FreeBlocksPolicy(settings)
        self.admission = AdmissionQueue(settings.max_queued_requests, settings.queue_timeout_s)
        self.retry_after_s = settings.retry_after_s
        self._waiting_futures: dict[str, Any] = {}
        deployment_id = getattr(self, "_deployment_id", None)
        self.metrics = RouterMetrics(deployment=getattr(deployment_id, "name", "") or "unknown")

    def _sync_reports(self, candidates: list[Any]) -> None:
        self.policy.remove_replicas_except({r.replica_id for r in self._replicas.values()})
        for replica in candidates:
            report = ReplicaReport.from_routing_stats(replica.routing_stats)
            if report is not None:
                self.policy.update_report(replica.replica_id, report)

    def _forget_abandoned_waiters(self) -> None:
        for request_id in self.admission.waiting_ids():
            future = self._waiting_futures.get(request_id)
            if future is None or future.done():
                self.admission.leave(request_id)
                self._waiting_futures.pop(request_id, None)

    def _refuse(
        self, pending_request: Any, error: Exception, candidates: list[Any], reason: str | None = None
    ) -> list[list[Any]]:
        """Fail the request's routing with `error`; `reason` labels the refusal metric (None: not counted)."""
        request_id = pending_request.metadata.internal_request_id
        self.admission.leave(request_id)
        self._waiting_futures.pop(request_id, None)
        if reason is not None:
            self.metrics.refused(reason)
        self.metrics.queue_length(self.admission.num_waiting)
        if not pending_request.future.done():
            pending_request.future.set_exception(error)
        # Ray's routing task only notices a finished future once it is handed candidates; returning none
        # would keep the task retrying the refused request forever and starve the others.
        return [candidates]

    async def choose_replicas(self, candidate_replicas: list[Any], pending_request: Any = None) -> list[list[Any]]:
        if not hasattr(self, "policy"):  # initialize_state not called (no kwargs configured)
            self.initialize_state()
        self._sync_reports(candidate_replicas)
        self._forget_abandoned_waiters()
        channel = pending_request.args[0] if pending_request is not None and pending_request.args else None
        if isinstance(channel, ChannelOpen):
            return self._route_channel(channel, candidate_replicas, pending_request)
        demand = None
        if pending_request is not None and pending_request.args:
            demand = getattr(pending_request.args[0], "routing_demand", None)
        by_id = {r.replica_id: r for r in candidate_replicas}
        decision = self.policy.decide(list(by_id), demand)
        logger.debug("routing %s: %s", demand, decision)
        if pending_request is None:
            return [[by_id[key] for key in decision.replicas]] if decision.kind == "route" else []
        if pending_request.future.done():  # refused or cancelled: let Ray's loop see it and move on
            return [list(candidate_replicas)]
        # Without this flag Ray's retry loop would spin without sleeping between our "no room" answers.
        pending_request.routing_context.should_backoff = True
        request_id = pending_request.metadata.internal_request_id

        if decision.kind == "too_large":
            return self._refuse(
                pending_request, RequestTooLargeError(decision.message, param="max_tokens"), candidate_replicas,
                "too_large",
            )
        if decision.kind == "over_share":
            # Not a refusal the client sees: the ingress's fair queue holds the request until its key's share
            # frees, outside Ray's routing line (see the module docstring).
            return self._refuse(pending_request, KeyOverShareError(
                f"no replica has room API key {demand.api_key_name!r} may take besides what it holds"),
                candidate_replicas)
        if decision.kind == "wait":
            verdict = self.admission.wait(request_id)
            if verdict == "wait":
                self._waiting_futures[request_id] = pending_request.future
                self.metrics.queue_length(self.admission.num_waiting)
                return []
            reason = (
                f"all replicas are full and {self.admission.max_queued_requests} requests are already waiting"
                if verdict == "full"
                else f"no replica had room within {self.admission.queue_timeout_s:g}s"
            )
            return self._refuse(pending_request, ServiceOverloadedError(reason, self.retry_after_s), candidate_replicas,
                                "queue_full" if verdict == "full" else "queue_timeout")

        self.admission.leave(request_id)
        self._waiting_futures.pop(request_id, None)
        self.metrics.queue_length(self.admission.num_waiting)
        best = decision.replicas[0]
        if demand is not None and demand.lora_name is not None:
            self.metrics.lora_routed(self.policy.holds_lora(best, demand.lora_name))
        # Reserve before Ray's send: the next request routed in this loop must already see these blocks.
        self.policy.reserve(best, request_id, demand)
        return [[by_id[best]]] + ([[by_id[key] for key in decision.replicas[1:]]] if len(decision.replicas) > 1 else [])

    def _route_channel(self, channel: ChannelOpen, candidates: list[Any], pending_request: Any) -> list[list[Any]]:
        """A stream channel goes to the replica it names and no other; if that one is gone, it fails."""
        for replica in candidates:
            if replica.replica_id.unique_id == channel.replica_id:
                return [[replica]]
        if not pending_request.future.done():
            pending_request.future.set_exception(
                ChannelLostError(f"replica {channel.replica_id} is no longer serving"))
        return [candidates]  # as in `_refuse`: Ray's routing loop notices the finished future with candidates

    def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
        if pending_request.args and isinstance(pending_request.args[0], ChannelOpen):
            return  # a channel holds no blocks and is not a request in flight
        demand = getattr(pending_request.args[0], "routing_demand", None) if pending_request.args else None
        request_id = pending_request.metadata.internal_request_id
        # Ray sent it to another replica than the one reserved: move the reservation. None reserved: the request
        # already completed (a short one's completion can be handled before this call), and must not come back.
        reserved = self.policy.reserved_replica(request_id)
        if reserved is not None and reserved != replica_id:
            self.policy.reserve(replica_id, request_id, demand)
        self.metrics.routed(getattr(replica_id, "unique_id", str(replica_id)))

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        if hasattr(self, "policy"):
            self.policy.release(internal_request_id)
