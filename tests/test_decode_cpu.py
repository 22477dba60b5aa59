"""The XLA CPU shard path (ops/decode/cpu.py) against the float32 reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import RTOL, rel_err
from mla_jax import ops, quant
from mla_jax.ops import decode
from mla_jax.ops.decode import cpu

FORMATS = ("bfloat16", "float16", "float32", "int8")
SV2_SCALE = (128 + 64) ** -0.5  # V2-Lite's softmax scale (qk_nope + qk_rope head dims)


def _inputs(rng, fmt, B, H, S, C, R, lengths, garbage=1e3):
  """Random decode inputs; cache rows past each row's length hold large stale values."""
  dtype = jnp.bfloat16 if fmt == "int8" else jnp.dtype(fmt)
  q_latent = jnp.asarray(rng.standard_normal((B, H, C)), dtype)
  q_rope = jnp.asarray(rng.standard_normal((B, H, R)), dtype)
  c_kv = rng.standard_normal((B, S, C)).astype(np.float32)
  k_rope = rng.standard_normal((B, S, R)).astype(np.float32)
  stale = np.arange(S)[None, :] >= np.asarray(lengths)[:, None]
  c_kv[stale] = garbage * rng.standard_normal((int(stale.sum()), C))
  k_rope[stale] = garbage
  c_kv = quant.quantize_rows(jnp.asarray(c_kv)) if fmt == "int8" else jnp.asarray(c_kv, dtype)
  return q_latent, q_rope, c_kv, jnp.asarray(k_rope, dtype), jnp.asarray(lengths, jnp.int32)


def _check(args, out, lse, fmt, sm_scale):
  ref_out, ref_lse = ops.reference.mla_decode(*args, sm_scale=sm_scale)
  lengths = np.asarray(args[-1])
  assert out.dtype == args[0].dtype and out.shape == ref_out.shape
  assert lse.dtype == jnp.float32 and lse.shape == ref_lse.shape
  out, lse = np.asarray(out, np.float64), np.asarray(lse)
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  empty = lengths == 0
  assert np.all(out[empty] == 0) and np.all(np.isneginf(lse[empty]))
  tol = RTOL[jnp.bfloat16 if fmt == "int8" else jnp.dtype(fmt).type]
  assert rel_err(out[~empty], np.asarray(ref_out)[~empty]) < tol
  np.testing.assert_allclose(lse[~empty], np.asarray(ref_lse)[~empty], rtol=tol, atol=tol)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("S,shard_size", [(200, 32), (256, 64), (50, 64), (37, 8)])
@pytest.mark.parametrize("H", [4, 16])
def test_matches_reference_ragged(rng, fmt, S, shard_size, H):
  B, C, R = 4, 64, 16
  lengths = [S, 0, int(rng.integers(1, S)), shard_size + 1 if shard_size < S else 1]
  args = _inputs(rng, fmt, B, H, S, C, R, lengths)
  sm_scale = float(rng.uniform(0.05, 0.2))
  out, lse = ops.mla_decode(*args, sm_scale=sm_scale, impl="cpu",
                            tuning=cpu.ShardTuning(shard_size, shards_per_step=2))
  _check(args, out, lse, fmt, sm_scale)


@pytest.mark.parametrize("fmt", FORMATS)
def test_default_shard_size_several_steps(rng, fmt):
  """The heuristic's sizes with an S that spans several steps and is no multiple of a shard,
  under jit with traced lengths; the loop stops at the longest row."""
  B, H, C, R = 2, 8, 128, 32
  shard = cpu.default_shard_size(H, C, R, jnp.dtype(fmt))
  step = shard * cpu.default_shards_per_step(shard, C, R)
  S = 2 * step + shard // 2 + 3
  lengths = [S - 1, int(rng.integers(shard, 2 * shard))]
  args = _inputs(rng, fmt, B, H, S, C, R, lengths)
  out, lse = jax.jit(lambda *a: ops.mla_decode(*a, sm_scale=0.1, impl="cpu"))(*args)
  _check(args, out, lse, fmt, 0.1)
  short = _inputs(rng, fmt, B, H, S, C, R, [3, 0])
  out, lse = jax.jit(lambda *a: ops.mla_decode(*a, sm_scale=0.1, impl="cpu"))(*short)
  _check(short, out, lse, fmt, 0.1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_benchmark_shapes_with_the_heuristic(rng, fmt):
  """V2-Lite's heads and widths, the sizes the heuristic picks, and a module's cache of two
  steps' rows plus 32 (max_len = prompt + 32; S = 8224, the benchmarks' pp8192, on a 32 MiB L3):
  two steps, then a shard of the last rows; rows end inside a step, in the last rows, and at 0."""
  H, C, R = 16, 512, 64
  tuning = cpu.choose_tuning(H, C, R, jnp.dtype(fmt))
  S = 2 * tuning.shard_size * tuning.shards_per_step + 32
  assert cpu.cut(S, tuning) == (2, 0, 32)
  args = _inputs(rng, fmt, 3, H, S, C, R, [S - 7, S // 2 + 3, 0])
  out, lse = jax.jit(lambda *a: ops.mla_decode(*a, sm_scale=SV2_SCALE, impl="cpu"))(*args)
  _check(args, out, lse, fmt, SV2_SCALE)


def test_cut_visits_each_row_once():
  """Hand-computed cuts for 256-row shards, 8 a step (W = 2048 rows)."""
  tuning = cpu.ShardTuning(shard_size=256, shards_per_step=8)
  assert cpu.cut(2047, tuning) == (0, 0, 2047)  # under one step: one shard
  assert cpu.cut(2080, tuning) == (1, 0, 32)
  assert cpu.cut(4095, tuning) == (1, 7, 255)
  assert cpu.cut(4096, tuning) == (2, 0, 0)
  assert cpu.cut(8224, tuning) == (4, 0, 32)
  assert cpu.cut(5152, tuning) == (2, 4, 32)  # 2048·2 + 256·4 + 32


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("H", [4, 16])
def test_tail_shards_and_rest_match_reference(rng, fmt, H):
  """Two steps, one whole tail shard and a 5-row rest (S = 2·32 + 16 + 5); rows end inside and
  at the edges of each piece, and the slots past them hold NaN."""
  S, tuning = 85, cpu.ShardTuning(shard_size=16, shards_per_step=2)
  lengths = [S, 70, 82, 64, 80, 0, 33]
  args = _inputs(rng, fmt, len(lengths), H, S, 64, 16, lengths, garbage=np.nan)
  out, lse = jax.jit(lambda *a: cpu.mla_decode(*a, sm_scale=0.1, tuning=tuning))(*args)
  _check(args, out, lse, fmt, 0.1)


def test_shards_per_step_do_not_change_the_result(rng):
  S = 300
  args = _inputs(rng, "float32", 2, 4, S, 64, 16, [S, 123])
  outs = [cpu.mla_decode(*args, sm_scale=0.1, tuning=cpu.ShardTuning(32, n)) for n in (1, 3)]
  for out, lse in outs:
    _check(args, out, lse, "float32", 0.1)


def test_shard_sizes_follow_the_caches():
  """A step's float32 rows fill at most L3_FILL of the L3 (and no less than half of it); shards
  whose rows are the score product's right operand fit L2_FILL of one core's L2; those whose rows
  are its left operand split a step over the cores, up to MAX_SHARD rows each."""
  W = cpu.default_rows_per_step(512, 64)
  f32_row = (512 + 64) * 4
  assert W & (W - 1) == 0 and W * f32_row <= cpu.L3_FILL * cpu.L3_BYTES < 2 * W * f32_row
  for d in ("float32", "float16", "bfloat16", "int8"):
    tuning = cpu.choose_tuning(16, 512, 64, jnp.dtype(d))
    size, dtype = tuning.shard_size, cpu.compute_dtype(d)
    assert size & (size - 1) == 0
    assert tuning.shard_size * tuning.shards_per_step == max(W, size * cpu.CORES)
    if cpu.rows_left(dtype):
      assert d in ("float32", "float16")
      # clamped to MAX_SHARD: a host's L3 as sysfs reports it (480 MiB on one CI machine) can
      # hold more rows a step than the cores' shards take
      assert size == max(cpu.MIN_SHARD, min(cpu.MAX_SHARD, 1 << int(math.log2(W / cpu.CORES))))
    else:
      row = (512 + 64) * dtype.itemsize + 16 * (8 + dtype.itemsize)
      assert size * row <= cpu.L2_FILL * cpu.L2_BYTES < 2 * size * row


def test_bad_arguments_raise(rng):
  args = _inputs(rng, "float32", 2, 4, 40, 64, 16, [40, 3])
  with pytest.raises(ValueError, match="shard_size"):
    cpu.ShardTuning(shard_size=0, shards_per_step=1)
  with pytest.raises(ValueError, match="shards_per_step"):
    cpu.ShardTuning(shard_size=64, shards_per_step=0)
  with pytest.raises(ValueError, match="k_rope"):
    decode.mla_decode(*args[:3], args[3][:, :-1], args[4], sm_scale=0.1, impl="cpu")
