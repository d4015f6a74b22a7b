"""Blocks for tokens: the one rule every layer uses to size a sequence in KV-cache blocks."""

from __future__ import annotations


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks of `block_size` tokens that hold `num_tokens` tokens (the last one may be partly used)."""
    return -(-num_tokens // block_size)
