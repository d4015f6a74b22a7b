"""Resolved settings for tests that build engine parts by hand (a runner, a loader call, a compile ladder)."""

from __future__ import annotations

from pagedserve.config.engine import EngineConfig
from pagedserve.config.resolve import ModelFacts, Platform, ResolvedConfig, resolve


def resolved(config: EngineConfig, cuda: bool = False, max_position_embeddings: int | None = 512) -> ResolvedConfig:
    """`config` resolved on a CPU-only platform (or one with a CUDA device, `cuda`), for a model of that context."""
    platform = Platform(cuda_available=True, bf16_supported=True, triton_unavailable_reason="") if cuda else Platform.cpu_only()
    return resolve(config, platform, ModelFacts(max_position_embeddings))
