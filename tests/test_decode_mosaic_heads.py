"""The Mosaic GPU split-KV decode kernel for many heads (ops/decode/mosaic_heads.py).

Its numerics run everywhere: compiled on a Hopper GPU, and in Mosaic GPU's interpret mode
(TMA, mbarriers, the three warpgroups and wgmma, on the CPU) in CI, against the float32
reference on fresh random inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.ops import decode, device
from mla_jax.ops.decode import mosaic_heads
from helpers import check_decode, decode_inputs, decode_tol, pallas_decode

ON_GPU = jax.default_backend() == "gpu"
needs_hopper = pytest.mark.skipif(ON_GPU and not device.is_hopper(), reason="wgmma: Hopper")
# The 64-row tile: S=200 (a multiple of 8, not of 64) in 2 pieces of 2 tiles (128 rows) puts
# these lengths on both sides of a tile and of the piece boundary, with a ragged last tile.
S_SMALL = 200
LENGTHS_SMALL = (0, 1, 63, 65, 127, 129, S_SMALL)


# This kernel (interpreted without a GPU), its default tuning with some fields overridden.
_decode = functools.partial(pallas_decode, lowering="mosaic", interpret=not ON_GPU,
                            kernel="mosaic_heads")


@needs_hopper
@pytest.mark.parametrize("fmt,H,num_splits", [("bfloat16", 64, 2), ("float16", 33, 2),
                                              ("bfloat16", 128, 1), ("bfloat16", 100, None)])
def test_ragged_lengths(rng, fmt, H, num_splits):
  """Heads padded to 64 (33, 100) and never returned; empty rows and pieces; partial tiles."""
  args = decode_inputs(rng, len(LENGTHS_SMALL), H, S_SMALL, fmt)
  lengths = jnp.asarray(rng.permutation(LENGTHS_SMALL), jnp.int32)
  sm_scale = float(rng.uniform(0.05, 0.1))
  out, lse = _decode(*args, lengths, sm_scale=sm_scale, num_splits=num_splits)
  check_decode(out, lse, *args, lengths, sm_scale, decode_tol(fmt))


@needs_hopper
@pytest.mark.parametrize("C,merge", [(512, "pallas"), (256, "xla"), (128, "pallas")])
def test_large_logits_widths_and_merges(rng, C, merge):
  args = decode_inputs(rng, 3, 64, 136, "bfloat16", C=C, logit_scale=30.0)
  lengths = jnp.asarray([136, 65, 5], jnp.int32)
  out, lse = _decode(*args, lengths, sm_scale=0.1, num_splits=2, merge=merge)
  assert float(jnp.max(lse)) > 100
  check_decode(out, lse, *args, lengths, 0.1, decode_tol("bfloat16"))


@pytest.mark.parametrize("B,H,S,C", [(64, 128, 16384, 512), (2, 40, 1000, 512),
                                     (1, 128, 131072, 256)])
def test_lowers_for_cuda(B, H, S, C):
  """Layouts, swizzles and the shared-memory budget (about 217 KiB at C=512) are checked here."""
  G = -(-H // mosaic_heads.HEADS)
  shapes = [(B, 64 * G, C), (B, 64 * G, 64), (B, S, C), (B, S, 64), (B,)]
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes[:4]]
  args.append(jax.ShapeDtypeStruct(shapes[4], jnp.int32))
  split = lambda *a: mosaic_heads.split_kv(
      *a, sm_scale=0.1, num_splits=mosaic_heads.choose_splits(B, H, S, 132))
  assert "mosaic_gpu" in jax.jit(split).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_choose_splits_fills_the_gpu():
  for B, H, S in [(64, 128, 16384), (8, 128, 16384), (1, 128, 131072), (1, 64, 4096)]:
    G = -(-H // mosaic_heads.HEADS)
    P = mosaic_heads.choose_splits(B, H, S, 132)
    assert 0.9 * 132 <= G * B * P <= 132 or P >= S // 128, (B, H, S, P)


def test_unsupported_arguments_name_the_reason(rng):
  args = decode_inputs(rng, 2, 64, 64, "bfloat16")
  assert mosaic_heads.unsupported(args[0], args[2], args[3]) is None
  cases = {
      "c_kv.dtype=int8": decode_inputs(rng, 2, 64, 64, "int8"),
      "c_kv.dtype=float32": decode_inputs(rng, 2, 64, 64, "float32"),
      "R=32": decode_inputs(rng, 2, 64, 64, "bfloat16", R=32),
      "C=1024": decode_inputs(rng, 2, 64, 64, "bfloat16", C=1024),
      "S=60": decode_inputs(rng, 2, 64, 60, "bfloat16"),
  }
  for reason, case in cases.items():
    assert reason in mosaic_heads.unsupported(case[0], case[2], case[3])
    with pytest.raises(ValueError, match=f"lowering='mosaic': .*{reason}"):
      decode.mla_decode(*case, jnp.asarray([case[2].shape[1], 3], jnp.int32), sm_scale=0.1,
                        impl="pallas", lowering="mosaic", interpret=not ON_GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("B,S", [(1, 131072), (8, 16384), (64, 4096)])
def test_long_caches_and_merges(rng, B, S):
  args = decode_inputs(rng, B, 128, S, "bfloat16")
  lengths = jnp.asarray(np.concatenate([[S], rng.integers(0, S + 1, B - 1)]), jnp.int32)
  outs = {merge: _decode(*args, lengths, sm_scale=0.07, merge=merge) for merge in ("pallas", "xla")}
  check_decode(*outs["pallas"], *args, lengths, 0.07, decode_tol("bfloat16"))
  np.testing.assert_allclose(np.asarray(outs["xla"][0], np.float32),
                             np.asarray(outs["pallas"][0], np.float32), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_default_lowering_for_many_heads_is_this_kernel_on_hopper(rng, monkeypatch):
  calls = []
  kernel = mosaic_heads.mla_decode
  monkeypatch.setattr(mosaic_heads, "mla_decode",
                      lambda *a, **k: calls.append(1) or kernel(*a, **k))
  args = decode_inputs(rng, 2, 128, 128, "bfloat16")
  decode.mla_decode(*args, jnp.asarray([128, 7], jnp.int32), sm_scale=0.1, impl="pallas")
  assert len(calls) == (1 if device.is_hopper() else 0)
  int8 = decode_inputs(rng, 2, 128, 128, "int8")
  decode.mla_decode(*int8, jnp.asarray([128, 7], jnp.int32), sm_scale=0.1, impl="pallas")
  assert len(calls) == (1 if device.is_hopper() else 0), "an int8 cache stays on Triton"
