"""What the test files share: tolerances, error measures, random inputs and oracles."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.mesh import AbstractDevice  # no public name in jax 0.11
from jax.experimental import topologies

import mla_jax
from mla_jax import quant
from mla_jax.ops import decode, reference

GOLDEN_DIR = pathlib.Path(__file__).parent / "data" / "deepseek_v2_tiny"

# ‖out − ref‖ / ‖ref‖ bounds per compute dtype (METHOD.md's ranges for each precision).
RTOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}
R = 64  # rope columns: what follows q_nope in the query (the GEMV reads x as a strided view)


# An H200 for tracing without one: Pallas' Triton lowering and mla_jax.ops.device read it.
H200 = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")
# The H200's properties as XLA's GPU compiler takes them (stream_executor.GpuTargetConfigProto).
H200_TARGET = pathlib.Path(__file__).parent / "data" / "h200_target.txtpb"


def _on_h200():
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ("x",), abstract_device=H200))


def lower_for_h200(f, *args) -> str:
  """f's jitted lowering for an H200 (CUDA), as text, without a GPU. Catches what a kernel's
  lowering refuses (layouts, shapes, unsupported operations); compile_for_h200 goes further."""
  with _on_h200():
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def h200_compile_only_device():
  """A compile-only H200: XLA's GPU compiler for that target, with no GPU attached (deviceless
  ahead-of-time compilation through jax's CUDA plugin). Skips the test where the plugin is not
  installed (`make test` installs it into .aot and runs the tests marked aot with it)."""
  try:
    topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                            target_config=H200_TARGET.read_text())
  except (NotImplementedError, RuntimeError) as e:
    pytest.skip(f"no compile-only CUDA device (jax's CUDA plugin): {e}")
  return topology.devices[0]


def compile_for_h200(f, *args, donate_argnums=(), compiler_options=None):
  """jit(f) compiled for an H200 (a jax.stages.Compiled: as_text() is its optimised HLO): on the
  GPU where one is attached, else for a compile-only H200 (h200_compile_only_device). args are
  arrays or jax.ShapeDtypeStruct pytrees; nothing runs. compiler_options: XLA debug options for
  this compilation, e.g. {"xla_dump_to": path}. The whole GPU pipeline runs: XLA's fusion and
  scheduling, and the compilation of every Triton kernel to the H200, whose shared-memory limit
  it checks."""
  jitted = jax.jit(f, donate_argnums=donate_argnums)
  # The program users run: conftest's "highest" matmul precision changes how XLA fuses.
  with jax.default_matmul_precision("default"):
    if jax.default_backend() == "gpu":
      return jitted.lower(*args).compile(compiler_options)
    sharding = jax.sharding.SingleDeviceSharding(h200_compile_only_device())
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                         args)
    with _on_h200():
      lowered = jitted.lower(*specs)
    return lowered.compile(compiler_options)


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  assert np.all(np.isfinite(x)), "output has NaN/inf"
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def run_chunks(attn, x, positions, chunks, max_len=None, cache_dtype=jnp.float32):
  """Feeds x [B,T,D] to the module in consecutive chunks of the given sizes (e.g. a prefill of
  n tokens then single-token decode steps: [n, 1, 1, ...]); returns (outputs [B,T,D], cache).
  The calls go through mla_jax.jit_step, as users run the module: one compilation a shape
  instead of one a primitive, and a jit of its own, so that no trace, with the monkeypatches it
  saw, passes from one test to another (tests/test_attention.py checks that eager calls
  agree)."""
  step = mla_jax.jit_step(attn)
  cache = attn.init_cache(x.shape[0], max_len or x.shape[1], cache_dtype)
  ys, t = [], 0
  for n in chunks:
    y, cache = step(x[:, t:t + n], positions[:, t:t + n], cache)
    ys.append(y)
    t += n
  return jnp.concatenate(ys, axis=1), cache


def decode_inputs(rng, B, H, S, fmt, *, C=512, R=64, q_dtype=None, logit_scale=1.0):
  """Fresh normal decode inputs (q_latent, q_rope, c_kv, k_rope); fmt is the cache format
  ("int8": a quant.Int8Rows), queries use q_dtype (bf16 for int8)."""
  cache_dtype = jnp.bfloat16 if fmt == "int8" else jnp.dtype(fmt)
  q_dtype = q_dtype or cache_dtype
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  q_latent = jnp.asarray(normal(B, H, C) * logit_scale, q_dtype)
  q_rope = jnp.asarray(normal(B, H, R) * logit_scale, q_dtype)
  c_kv = jnp.asarray(normal(B, S, C), cache_dtype)
  if fmt == "int8":
    c_kv = quant.quantize_rows(c_kv)
  k_rope = jnp.asarray(normal(B, S, R), cache_dtype)
  return q_latent, q_rope, c_kv, k_rope


def check_decode(out, lse, q_latent, q_rope, c_kv, k_rope, lengths, sm_scale, tol):
  """out and lse against the float32 reference: per row within tol; length 0 gives 0 and -inf."""
  with jax.default_matmul_precision("highest"):  # no TF32 in the oracle on a GPU
    ref_out, ref_lse = reference.mla_decode(q_latent, q_rope, c_kv, k_rope, lengths,
                                            sm_scale=sm_scale)
  assert out.shape == ref_out.shape and out.dtype == q_latent.dtype
  assert lse.shape == ref_lse.shape and lse.dtype == jnp.float32
  lengths = np.asarray(lengths)
  lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
  assert not np.any(np.isnan(lse))
  empty = lengths == 0
  assert np.all(np.isneginf(lse[empty])), "length 0 must give lse = -inf"
  assert np.all(np.asarray(out, np.float32)[empty] == 0), "length 0 must give out = 0"
  np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=tol, atol=tol)
  for b in np.flatnonzero(~empty):  # per row, so that a short row's error is not diluted
    assert rel_err(out[b], ref_out[b]) <= tol, f"row {b} (length {lengths[b]})"


def pallas_decode(*args, sm_scale, lowering, interpret, kernel=None, **overrides):
  """decode.mla_decode(impl="pallas") with the plan's tuning, the fields in overrides that are
  not None replaced; kernel: the Pallas kernel that the plan must name."""
  plan = decode.plan(*args, impl="pallas", lowering=lowering, interpret=interpret)
  assert kernel is None or plan.kernel == kernel, plan
  overrides = {name: value for name, value in overrides.items() if value is not None}
  return decode.mla_decode(*args, sm_scale=sm_scale, impl="pallas", lowering=lowering,
                           tuning=dataclasses.replace(plan.tuning, **overrides),
                           interpret=interpret)


def decode_tol(fmt, q_dtype=None):
  dtype = jnp.dtype(q_dtype or (jnp.bfloat16 if fmt == "int8" else fmt))
  return {jnp.dtype(k): v for k, v in RTOL.items()}[dtype]


def gemv_weights(rng, H, K, N, fmt):
  """Fresh weights [H,K,N]: bfloat16 ("bf16") or a quant.QuantizedTensor of that format."""
  w = jnp.asarray(rng.standard_normal((H, K, N)) * K ** -0.5, jnp.float32)
  return w.astype(jnp.bfloat16) if fmt == "bf16" else quant.quantize(w, fmt)


def gemv_oracle(x, w):
  """reference.batched_gemv in true float32 (XLA:GPU's default f32 dot is TF32)."""
  with jax.default_matmul_precision("float32"):
    return reference.batched_gemv(x, w)
