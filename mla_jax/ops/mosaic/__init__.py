"""Mosaic GPU pieces that the decode and GEMV kernels share: running in interpret mode, shared
memory laid out for TMA and wgmma (common.py), and the PTX that puts 8-bit data into wgmma's
operand registers (int8_ptx.py, q8_0_registers.py, int8_cache_registers.py, iq4_nl_prmt.py,
iq4_nl_registers.py).
This package is the one place that reaches into jax._src (Mosaic GPU's MLIR dialects)."""
