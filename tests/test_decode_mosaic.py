"""The Mosaic GPU split-KV decode kernels for few heads: float caches (ops/decode/mosaic.py) and
int8 caches (ops/decode/mosaic_int8.py).

Their numerics run compiled on a Hopper GPU and, in CI, in Mosaic GPU's interpret mode (TMA,
mbarriers, both warpgroups of the int8 schedule and wgmma, on the CPU), against the float32
reference on fresh random inputs; long caches are `gpu` only. CI also lowers the kernels for
CUDA (layouts, swizzles and the shared-memory budget are checked there) and checks what they
refuse and which kernel the dispatcher picks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax import quant
from mla_jax.ops import decode, device, reference
from mla_jax.ops.decode import mosaic, mosaic_common, mosaic_int8
from helpers import check_decode, decode_inputs, decode_tol, pallas_decode, rel_err

ON_GPU = jax.default_backend() == "gpu"
needs_hopper = pytest.mark.skipif(ON_GPU and not device.is_hopper(), reason="wgmma: Hopper")


def _split_args(B, N, S, C, R, dtype, int8):
  shapes = [((B, N, C), dtype), ((B, N, R), dtype), ((B, S, C), dtype), ((B, S, R), dtype),
            ((B,), jnp.int32)]
  args = [jax.ShapeDtypeStruct(shape, dt) for shape, dt in shapes]
  if int8:
    args[2] = quant.Int8Rows(jax.ShapeDtypeStruct((B, S, C), jnp.int8),
                             jax.ShapeDtypeStruct((B, S), jnp.float32))
  return args


def _split(int8, N, C, R, num_splits):
  """The kernel's split_kv with its default stages, as a function of the five arguments."""
  if int8:
    stages = mosaic_int8.choose_stages(N, C, R, 2)
    return lambda *a: mosaic_int8.split_kv(*a, sm_scale=0.1, num_splits=num_splits, stages=stages)
  return lambda *a: mosaic.split_kv(*a, sm_scale=0.1, num_splits=num_splits)


@pytest.mark.parametrize("H,C,R,int8", [(16, 512, 256, False), (32, 512, 256, False),
                                        (32, 256, 256, False), (16, 1024, 64, False),
                                        (32, 1024, 64, False), (16, 128, 1024, False),
                                        (32, 512, 64, True), (16, 1024, 64, True),
                                        (16, 768, 64, True), (16, 2048, 64, True),
                                        (32, 2048, 64, True)])
def test_unsupported_knows_the_shared_memory(H, C, R, int8):
  """unsupported() accepts exactly the shapes whose buffers Mosaic GPU fits in shared memory,
  so that larger ones (C=1024: 308 KiB) fall back to Triton instead of failing to compile."""
  N = 16 if H <= 16 else 32
  args = _split_args(2, N, 64, C, R, jnp.bfloat16, int8)
  kernel = mosaic_int8 if int8 else mosaic
  accepted = kernel.unsupported(args[0], args[2], args[3]) is None
  try:
    jax.jit(_split(int8, N, C, R, 1)).trace(*args).lower(lowering_platforms=("cuda",))
    lowers = True
  except ValueError as err:
    assert "shared memory" in str(err)
    lowers = False
  assert accepted == lowers


@pytest.mark.parametrize("B,H,S,C,R,dtype,int8", [(64, 16, 16384, 512, 64, jnp.bfloat16, False),
                                                  (2, 32, 1000, 512, 64, jnp.float16, False),
                                                  (3, 1, 200, 128, 32, jnp.bfloat16, False),
                                                  (64, 16, 16384, 512, 64, jnp.bfloat16, True),
                                                  (2, 32, 1000, 512, 64, jnp.float16, True),
                                                  (2, 16, 1000, 256, 64, jnp.bfloat16, True),
                                                  (2, 1, 1000, 384, 64, jnp.float16, True)])
def test_split_kernel_lowers_for_cuda(B, H, S, C, R, dtype, int8):
  """Mosaic GPU lowers the kernels on any host: a layout, swizzle or shared-memory error shows
  here (int8: the ldmatrix operand's registers, the int8 product, 4 stages of 40 KiB beside
  32-head queries)."""
  N = 16 if H <= 16 else 32
  args = _split_args(B, N, S, C, R, dtype, int8)
  split = _split(int8, N, C, R, mosaic_common.choose_splits(B, S, 132))
  lowered = jax.jit(split).trace(*args).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_three_stages_exceed_shared_memory():
  """The negative control for the lowering check: 3 × 72 KiB bf16 tiles do not fit."""
  shapes = [(2, 16, 512), (2, 16, 64), (2, 1024, 512), (2, 1024, 64)]
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
  args.append(jax.ShapeDtypeStruct((2,), jnp.int32))
  split = lambda *a: mosaic.split_kv(*a, sm_scale=0.1, num_splits=4, stages=3)
  with pytest.raises(ValueError, match="shared memory"):
    jax.jit(split).trace(*args).lower(lowering_platforms=("cuda",))


def test_choose_splits_covers_the_cache_and_fills_the_gpu():
  for B, S in [(1, 131072), (8, 16384), (64, 16384), (64, 4096), (3, 200), (1, 8)]:
    P = mosaic_common.choose_splits(B, S, 132)
    tiles = -(-S // 64)
    piece = -(-tiles // P)
    assert P * piece >= tiles and (P - 1) * piece < tiles, "pieces cover S, none wholly past it"
    if S >= 4096:
      assert 0.9 * 132 <= B * P <= 132 or P == 1
  assert mosaic_common.choose_splits(1, 128, 132) == 2  # a short cache: a piece a tile
  assert mosaic_common.choose_splits(1, 2048, 132) == 32
  assert mosaic_common.choose_splits(1, 2048, 132, min_tiles=2) == 16


def _unsupported(case):
  """The reason the few-heads kernel for this cache gives, or None."""
  kernel = mosaic_int8 if isinstance(case[2], quant.Int8Rows) else mosaic
  return kernel.unsupported(case[0], case[2], case[3])


def test_unsupported_arguments_name_the_reason(rng):
  args = decode_inputs(rng, 2, 16, 64, "bfloat16")
  lengths = jnp.asarray([64, 3], jnp.int32)
  assert _unsupported(args) is None
  assert _unsupported(decode_inputs(rng, 2, 16, 64, "int8")) is None
  many = decode_inputs(rng, 2, 33, 64, "bfloat16")  # mosaic_heads takes these
  assert "H=33" in mosaic.unsupported(many[0], many[2], many[3])
  cases = {
      "S=60": decode_inputs(rng, 2, 16, 60, "bfloat16"),
      "float32": decode_inputs(rng, 2, 16, 64, "float32"),
      "q_latent.dtype=float32": decode_inputs(rng, 2, 16, 64, "bfloat16", q_dtype="float32"),
      "int8 cache needs R = 64": decode_inputs(rng, 2, 16, 64, "int8", R=32),
      "multiple of 128": decode_inputs(rng, 2, 16, 64, "int8", C=64),
  }
  for reason, case in cases.items():
    assert reason in _unsupported(case)
    with pytest.raises(ValueError, match="lowering='mosaic'"):
      decode.mla_decode(*case, jnp.asarray([case[2].shape[1], 3], jnp.int32), sm_scale=0.1,
                        impl="pallas", lowering="mosaic")
  with pytest.raises(ValueError, match="lowering="):
    decode.mla_decode(*args, lengths, sm_scale=0.1, impl="pallas", lowering="cuda")


# Lengths on both sides of the 64-row tile and of the pieces (num_splits=3 over S=704 gives
# 4-tile pieces of 256 rows); S=704 is a multiple of 8 but not of the tile.
S_GPU = 704
LENGTHS_GPU = (0, 1, 63, 64, 65, 255, 257, S_GPU)


def _decode(*args, sm_scale, **overrides):
  """The few-heads kernel for the cache (interpreted without a GPU), its default tuning with some
  fields overridden."""
  kernel = "mosaic_int8" if isinstance(args[2], quant.Int8Rows) else "mosaic"
  return pallas_decode(*args, sm_scale=sm_scale, lowering="mosaic", interpret=not ON_GPU,
                       kernel=kernel, **overrides)


@needs_hopper
@pytest.mark.parametrize("fmt", ["bfloat16", "float16", "int8"])
@pytest.mark.parametrize("H", [1, 16, 20, 32])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_ragged_lengths(rng, fmt, H, num_splits):
  args = decode_inputs(rng, len(LENGTHS_GPU), H, S_GPU, fmt)
  lengths = jnp.asarray(rng.permutation(LENGTHS_GPU), jnp.int32)
  sm_scale = float(rng.uniform(0.05, 0.1))
  out, lse = _decode(*args, lengths, sm_scale=sm_scale, num_splits=num_splits)
  check_decode(out, lse, *args, lengths, sm_scale, decode_tol(fmt))


@needs_hopper
@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
def test_large_logits(rng, fmt):
  args = decode_inputs(rng, 3, 16, S_GPU, fmt, logit_scale=30.0)
  lengths = jnp.asarray([S_GPU, 65, 5], jnp.int32)
  out, lse = _decode(*args, lengths, sm_scale=0.1)
  assert float(jnp.max(lse)) > 100
  check_decode(out, lse, *args, lengths, 0.1, decode_tol(fmt))


@needs_hopper
@pytest.mark.parametrize("fmt,H", [("bfloat16", 16), ("int8", 20)])
def test_values_projection_merges_and_projects(rng, fmt, H):
  """wv_b: the pieces merged and projected in one kernel, against the reference decode times
  wv_b; heads padded (20 of 32) and ragged rows."""
  args = decode_inputs(rng, len(LENGTHS_GPU), H, S_GPU, fmt)
  lengths = jnp.asarray(rng.permutation(LENGTHS_GPU), jnp.int32)
  wv_b = jnp.asarray(rng.standard_normal((H, 512, 128)) / np.sqrt(512), jnp.bfloat16)
  out, lse = decode.mla_decode(*args, lengths, sm_scale=0.08, impl="pallas", lowering="mosaic",
                               interpret=not ON_GPU, wv_b=wv_b)
  with jax.default_matmul_precision("highest"):
    ref, ref_lse = reference.mla_decode(*args, lengths, sm_scale=0.08)
  want = np.einsum("bhc,hcv->bhv", np.asarray(ref, np.float64), np.asarray(wv_b, np.float64))
  assert out.shape == (len(LENGTHS_GPU), H, 128) and out.dtype == args[0].dtype
  for b, n in enumerate(np.asarray(lengths)):
    if n == 0:
      assert np.all(np.asarray(out[b], np.float32) == 0) and np.all(np.isneginf(lse[b]))
    else:
      assert rel_err(out[b], want[b]) <= decode_tol(fmt), f"row {b} (length {n})"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
@pytest.mark.parametrize("B,S", [(1, 131072), (8, 16384), (64, 4096)])
def test_long_caches_and_merges(rng, fmt, B, S):
  args = decode_inputs(rng, B, 16, S, fmt)
  lengths = jnp.asarray(np.concatenate([[S], rng.integers(0, S + 1, B - 1)]), jnp.int32)
  outs = {merge: _decode(*args, lengths, sm_scale=0.07, merge=merge) for merge in ("pallas", "xla")}
  check_decode(*outs["pallas"], *args, lengths, 0.07, decode_tol(fmt))
  assert rel_err(outs["xla"][0], outs["pallas"][0]) <= 1e-2


@pytest.mark.gpu
def test_default_lowering_is_mosaic_on_hopper(rng, monkeypatch):
  calls = []
  kernel = mosaic.mla_decode
  monkeypatch.setattr(mosaic, "mla_decode", lambda *a, **k: calls.append(1) or kernel(*a, **k))
  args = decode_inputs(rng, 2, 16, 128, "bfloat16")
  lengths = jnp.asarray([128, 7], jnp.int32)
  decode.mla_decode(*args, lengths, sm_scale=0.1, impl="pallas")
  assert len(calls) == (1 if device.is_hopper() else 0)
