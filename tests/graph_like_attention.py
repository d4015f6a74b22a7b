"""The reference attention as a CUDA-graph replay meets it, for CPU tests of the graphs' padded inputs."""

from __future__ import annotations

import dataclasses

from pagedserve.engine.kernels.attention.reference import ReferenceAttentionBackend


class GraphLikeReference(ReferenceAttentionBackend):
    """Host lengths are bounds, the real ones are in the device tensors, and a negative slot writes nothing
    (what the Triton and flash kernels do)."""

    def write_kv(self, key_cache, value_cache, key, value, slot_mapping, kv_scales=None):
        keep = slot_mapping >= 0
        super().write_kv(key_cache, value_cache, key[keep], value[keep], slot_mapping[keep], kv_scales)

    def forward(self, query, key_cache, value_cache, metadata, group, **kwargs):
        starts = metadata.query_start_loc.tolist()
        metadata = dataclasses.replace(metadata, query_lens_cpu=[b - a for a, b in zip(starts, starts[1:])],
                                       seq_lens_cpu=metadata.seq_lens.tolist())
        return super().forward(query, key_cache, value_cache, metadata, group, **kwargs)
