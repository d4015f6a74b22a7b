"""Prefix caching: full blocks are named by a hash chained over every token before them.

Block `i` of a sequence is keyed by `H(key(i-1), tokens of block i)`, so equal keys mean equal whole
prefixes, not only equal blocks. blake2b keeps collisions out of reach (Python's `hash()` of tuples is
not collision resistant, and a collision would serve one user another's KV).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from pagedserve.cache.block_pool import BlockHash

_ROOT_HASH: BlockHash = b"pagedserve-prefix-root"


def hash_block(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    digest = hashlib.blake2b(parent_hash or _ROOT_HASH, digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def salt_root(salt: str | None) -> BlockHash | None:
    """The parent of a sequence's first block: None (the common root), or one of its own for a salt (a LoRA
    adapter's name), so that K/V computed under one adapter is never found by a request of another."""
    if salt is None:
        return None
    return hashlib.blake2b(_ROOT_HASH + b"/salt/" + salt.encode(), digest_size=16).digest()


def first_block_key(token_ids: Sequence[int], block_size: int, salt: str | None = None) -> BlockHash | None:
    """The cache's key of the first full block of `token_ids` (None when there is none): the router's
    prefix-affinity key, so that a replica that served it holds exactly that block in its prefix cache."""
    if len(token_ids) < block_size:
        return None
    return hash_block(salt_root(salt), token_ids[:block_size])


def extend_block_hashes(hashes: list[BlockHash], token_ids: Sequence[int], block_size: int,
                        salt: str | None = None) -> None:
    """Append the hashes of the full blocks of `token_ids` not yet in `hashes` (incremental, O(new));
    `salt` keys the whole chain (see `salt_root`)."""
    num_full = len(token_ids) // block_size
    for block_index in range(len(hashes), num_full):
        start = block_index * block_size
        parent = hashes[-1] if hashes else salt_root(salt)
        hashes.append(hash_block(parent, token_ids[start : start + block_size]))
