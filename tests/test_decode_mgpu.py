"""The Mosaic GPU split-KV decode kernel for few heads (ops/decode_mgpu.py).

Its numerics run compiled on a Hopper GPU and, in CI, in Mosaic GPU's interpret mode (TMA,
mbarriers, both warpgroups of the int8 schedule and wgmma, on the CPU), against the float32
reference on fresh random inputs; long caches are `gpu` only. CI also lowers the kernels for
CUDA (layouts, swizzles and the shared-memory budget are checked there) and checks the merge
kernel (Triton, interpreted) and the dispatch rules.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax import quant
from mla_jax.ops import decode_gpu, decode_mgpu, merge_partials
from conftest import rel_err
from test_decode_gpu import _check, _inputs, _tol

ON_GPU = jax.default_backend() == "gpu"
needs_hopper = pytest.mark.skipif(ON_GPU and not decode_gpu.is_hopper(), reason="wgmma: Hopper")


@pytest.mark.parametrize("P,B,C,N", [(5, 2, 64, 16), (128, 1, 512, 16), (3, 3, 128, 32),
                                     (2, 64, 512, 16)])
def test_merge_pieces_equals_merge_partials(rng, P, B, C, N):
  """Partials [P,B,N,C]; empty pieces (lse -inf), and one head with no piece at all."""
  o_parts = jnp.asarray(rng.standard_normal((P, B, N, C)), jnp.float32)
  lse_parts = np.asarray(rng.standard_normal((P, B, N)) * 3, np.float32)
  lse_parts[0, 0, :] = -np.inf
  lse_parts[:, B - 1, N // 2] = -np.inf
  out, lse = decode_mgpu.merge_pieces(o_parts, jnp.asarray(lse_parts), jnp.float32,
                                      interpret=not ON_GPU)
  ref_out, ref_lse = merge_partials(o_parts, jnp.asarray(lse_parts))
  assert out.shape == (B, N, C) and lse.shape == (B, N)
  assert not np.any(np.isnan(np.asarray(out)))
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  finite = np.isfinite(ref_lse)
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], rtol=1e-6)


def _split_args(B, N, S, C, R, dtype, int8):
  shapes = [((B, N, C), dtype), ((B, N, R), dtype), ((B, S, C), dtype), ((B, S, R), dtype),
            ((B,), jnp.int32)]
  args = [jax.ShapeDtypeStruct(shape, dt) for shape, dt in shapes]
  if int8:
    args[2] = quant.Int8Rows(jax.ShapeDtypeStruct((B, S, C), jnp.int8),
                             jax.ShapeDtypeStruct((B, S), jnp.float32))
  return args


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
  accepted = decode_mgpu.unsupported(args[0], args[2], args[3]) is None
  split = lambda *a: decode_mgpu.split_kv(*a, sm_scale=0.1, num_splits=1)
  try:
    jax.jit(split).trace(*args).lower(lowering_platforms=("cuda",))
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
  shapes = [((B, N, C), dtype), ((B, N, R), dtype), ((B, S, C), dtype), ((B, S, R), dtype),
            ((B,), jnp.int32)]
  args = [jax.ShapeDtypeStruct(shape, dt) for shape, dt in shapes]
  if int8:
    args[2] = quant.Int8Rows(jax.ShapeDtypeStruct((B, S, C), jnp.int8),
                             jax.ShapeDtypeStruct((B, S), jnp.float32))
  split = lambda *a: decode_mgpu.split_kv(
      *a, sm_scale=0.1, num_splits=decode_mgpu.choose_splits(B, S, 132))
  lowered = jax.jit(split).trace(*args).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_three_stages_exceed_shared_memory():
  """The negative control for the lowering check: 3 × 72 KiB bf16 tiles do not fit."""
  shapes = [(2, 16, 512), (2, 16, 64), (2, 1024, 512), (2, 1024, 64)]
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
  args.append(jax.ShapeDtypeStruct((2,), jnp.int32))
  split = lambda *a: decode_mgpu.split_kv(*a, sm_scale=0.1, num_splits=4, stages=3)
  with pytest.raises(ValueError, match="shared memory"):
    jax.jit(split).trace(*args).lower(lowering_platforms=("cuda",))


def test_choose_splits_covers_the_cache_and_fills_the_gpu():
  for B, S in [(1, 131072), (8, 16384), (64, 16384), (64, 4096), (3, 200), (1, 8)]:
    P = decode_mgpu.choose_splits(B, S, 132)
    tiles = -(-S // 64)
    piece = -(-tiles // P)
    assert P * piece >= tiles and (P - 1) * piece < tiles, "pieces cover S, none wholly past it"
    if S >= 4096:
      assert 0.9 * 132 <= B * P <= 132 or P == 1


def test_unsupported_arguments_name_the_reason(rng):
  args = _inputs(rng, 2, 16, 64, "bfloat16")
  lengths = jnp.asarray([64, 3], jnp.int32)
  assert decode_mgpu.unsupported(args[0], args[2], args[3]) is None
  many = _inputs(rng, 2, 33, 64, "bfloat16")  # decode_mgpu_heads takes these
  assert "H=33" in decode_mgpu.unsupported(many[0], many[2], many[3])
  cases = {
      "S=60": _inputs(rng, 2, 16, 60, "bfloat16"),
      "float32": _inputs(rng, 2, 16, 64, "float32"),
      "q_latent.dtype=float32": _inputs(rng, 2, 16, 64, "bfloat16", q_dtype="float32"),
      "int8 cache needs R = 64": _inputs(rng, 2, 16, 64, "int8", R=32),
      "multiple of 128": _inputs(rng, 2, 16, 64, "int8", C=64),
  }
  for reason, case in cases.items():
    assert reason in decode_mgpu.unsupported(case[0], case[2], case[3])
    with pytest.raises(ValueError, match="lowering='mosaic'"):
      decode_gpu.mla_decode(*case, jnp.asarray([case[2].shape[1], 3], jnp.int32),
                            sm_scale=0.1, lowering="mosaic")
  with pytest.raises(ValueError, match="lowering="):
    decode_gpu.mla_decode(*args, lengths, sm_scale=0.1, lowering="cuda")


# Lengths on both sides of the 64-row tile and of the pieces (num_splits=3 over S=704 gives
# 4-tile pieces of 256 rows); S=704 is a multiple of 8 but not of the tile.
S_GPU = 704
LENGTHS_GPU = (0, 1, 63, 64, 65, 255, 257, S_GPU)


def _decode(*args, **options):
  return decode_gpu.mla_decode(*args, lowering="mosaic", interpret=not ON_GPU, **options)


@needs_hopper
@pytest.mark.parametrize("fmt", ["bfloat16", "float16", "int8"])
@pytest.mark.parametrize("H", [1, 16, 20, 32])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_ragged_lengths(rng, fmt, H, num_splits):
  args = _inputs(rng, len(LENGTHS_GPU), H, S_GPU, fmt)
  lengths = jnp.asarray(rng.permutation(LENGTHS_GPU), jnp.int32)
  sm_scale = float(rng.uniform(0.05, 0.1))
  out, lse = _decode(*args, lengths, sm_scale=sm_scale, num_splits=num_splits)
  _check(out, lse, *args, lengths, sm_scale, _tol(fmt))


@needs_hopper
@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
def test_large_logits(rng, fmt):
  args = _inputs(rng, 3, 16, S_GPU, fmt, logit_scale=30.0)
  lengths = jnp.asarray([S_GPU, 65, 5], jnp.int32)
  out, lse = _decode(*args, lengths, sm_scale=0.1)
  assert float(jnp.max(lse)) > 100
  _check(out, lse, *args, lengths, 0.1, _tol(fmt))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
@pytest.mark.parametrize("B,S", [(1, 131072), (8, 16384), (64, 4096)])
def test_long_caches_and_merges(rng, fmt, B, S):
  args = _inputs(rng, B, 16, S, fmt)
  lengths = jnp.asarray(np.concatenate([[S], rng.integers(0, S + 1, B - 1)]), jnp.int32)
  outs = {merge: decode_gpu.mla_decode(*args, lengths, sm_scale=0.07, lowering="mosaic",
                                       merge=merge) for merge in ("pallas", "xla")}
  _check(*outs["pallas"], *args, lengths, 0.07, _tol(fmt))
  assert rel_err(outs["xla"][0], outs["pallas"][0]) <= 1e-2


@pytest.mark.gpu
def test_default_lowering_is_mosaic_on_hopper(rng, monkeypatch):
  calls = []
  kernel = decode_mgpu.mla_decode
  monkeypatch.setattr(decode_mgpu, "mla_decode", lambda *a, **k: calls.append(1) or kernel(*a, **k))
  args = _inputs(rng, 2, 16, 128, "bfloat16")
  decode_gpu.mla_decode(*args, jnp.asarray([128, 7], jnp.int32), sm_scale=0.1)
  assert len(calls) == (1 if decode_gpu.is_hopper() else 0)
  decode_gpu.mla_decode(*args, jnp.asarray([128, 7], jnp.int32), sm_scale=0.1, block_s=32)
  assert len(calls) == (1 if decode_gpu.is_hopper() else 0), "Triton tuning selects Triton"
