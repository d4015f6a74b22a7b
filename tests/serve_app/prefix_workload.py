"""A shared-prefix workload for prefix-affinity routing (issue 28), and the hit rate random routing gets on it.

`NUM_PREFIXES` long prefixes (a system prompt each, say), visited in turn `NUM_ROUNDS` times, each prompt the
prefix and a few tokens of its own. Sized against two replicas of `NUM_BLOCKS` blocks: all the prefixes
together hold about twice what one replica's cache does, half of them fit. Routed by prefix, each replica
keeps its half cached and every visit after the first hits; routed at random, each replica sees every
prefix and evicts them before they come back. The random baseline replays the same prompts through the
fake engine's cache model (`FakePrefixCache`, the one the replicas run), each prompt to a random replica,
averaged over seeds. Used by tests/serve_app/test_multinode.py and bench/prefix_affinity_bench.py.
"""

from __future__ import annotations

import random

from fake_engine import FakePrefixCache

NUM_BLOCKS, BLOCK_SIZE = 64, 16
NUM_PREFIXES, PREFIX_BLOCKS, NUM_ROUNDS = 10, 12, 3
MAGIC_WORDS = ("SLOW", "FAST", "FAIL", "CRASH", "DIE", "ENGINEDIES")  # the fake engine's fault switches


def prompts(tokenizer, seed: int = 0) -> list[list[int]]:
    """Token ids of every prompt in sending order; none decodes to a word the fake engine acts on."""
    rng = random.Random(seed)
    vocab = range(10, len(tokenizer) - 10)
    prefixes = []
    while len(prefixes) < NUM_PREFIXES:
        prefix = rng.choices(vocab, k=PREFIX_BLOCKS * BLOCK_SIZE)
        if not any(word in tokenizer.decode(prefix) for word in MAGIC_WORDS):
            prefixes.append(prefix)
    return [prefixes[index] + [11 + round_index, 12 + index, 13]
            for round_index in range(NUM_ROUNDS) for index in range(NUM_PREFIXES)]


def hit_rate(queries: int, hits: int) -> float:
    return hits / queries if queries else 0.0


def random_routing_hit_rate(workload: list[list[int]], num_replicas: int = 2, num_seeds: int = 200) -> float:
    """Prompt tokens found in the cache over those looked up, each prompt sent to a random replica (mean over
    seeds)."""
    rates = []
    for seed in range(num_seeds):
        rng = random.Random(seed)
        caches = [FakePrefixCache(NUM_BLOCKS, BLOCK_SIZE) for _ in range(num_replicas)]
        for prompt in workload:
            rng.choice(caches).look_up_and_add(prompt)
        rates.append(hit_rate(sum(c.num_queries_total for c in caches), sum(c.num_hits_total for c in caches)))
    return sum(rates) / len(rates)
