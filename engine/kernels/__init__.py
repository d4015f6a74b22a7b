"""GPU kernels and their CPU references: paged attention backends, the one-row GEMM, fused projections."""
