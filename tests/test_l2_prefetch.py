"""L2 prefetch from the Mosaic split-KV kernels (ops/mosaic/l2_prefetch.py).

A prefetch changes no value, so the kernels with arrays to prefetch must give what they give
without, bit for bit: compiled on a Hopper GPU, where the prefetches run, and in Mosaic GPU's
interpret mode in CI, which skips them but passes the extra operands. The lowering of the
prefetches themselves is checked on any host.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax import quant
from mla_jax.ops import decode, device
from mla_jax.ops.decode import mosaic, mosaic_int8
from mla_jax.ops.mosaic import l2_prefetch
from helpers import check_decode, decode_inputs, decode_tol

ON_GPU = jax.default_backend() == "gpu"
needs_hopper = pytest.mark.skipif(ON_GPU and not device.is_hopper(), reason="wgmma: Hopper")


def test_views_cover_every_leaf_as_rows_of_whole_tma_units():
  """A [3072, 2048] weight is 24576 rows of 256; a quantized weight's leaves (uint8 values,
  float16 scales) each get the widest row that divides them in 16-byte units; a leaf that
  none divides is left out."""
  w = jnp.zeros((3072, 2048), jnp.bfloat16)
  qt = quant.quantize(jnp.ones((64, 96), jnp.float32), "iq4_nl")  # qs [32, 96], d [2, 96]
  odd = jnp.zeros((3, 5), jnp.float32)
  views = l2_prefetch.views((w, {"q": qt, "odd": odd}))
  assert [(v.shape, v.dtype) for v in views] == [
      ((24576, 256), jnp.bfloat16), ((12, 256), jnp.uint8), ((3, 64), jnp.float16)]
  for view in views:
    assert view.shape[1] * view.dtype.itemsize % 16 == 0


def _weights(rng):
  """What a layer's split prefetches: bf16 weights and a quantized one."""
  normal = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32))
  return (normal(2048, 512).astype(jnp.bfloat16), normal(16, 512, 128).astype(jnp.bfloat16),
          quant.quantize(normal(512, 256), "q8_0"))


@needs_hopper
@pytest.mark.parametrize("fmt,H", [("bfloat16", 16), ("int8", 16), ("bfloat16", 64)])
def test_splits_with_arrays_to_prefetch_give_the_same_result(rng, fmt, H):
  """The few-heads (float and int8 cache) and many-heads kernels, with and without arrays to
  prefetch: equal bit for bit, and right against the float32 reference."""
  S = 200
  args = decode_inputs(rng, 3, H, S, fmt)
  lengths = jnp.asarray([S, 65, 0], jnp.int32)
  run = lambda prefetch: decode.mla_decode(*args, lengths, sm_scale=0.1, impl="pallas",
                                           lowering="mosaic", interpret=not ON_GPU,
                                           prefetch=prefetch)
  out, lse = run(_weights(rng))
  check_decode(out, lse, *args, lengths, 0.1, decode_tol(fmt))
  plain_out, plain_lse = run(())
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(plain_out, np.float32))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(plain_lse))


@pytest.mark.parametrize("int8", [False, True])
def test_split_with_prefetches_lowers_for_cuda(int8, rng):
  """Mosaic GPU lowers the predicated TMA prefetches beside the split's own copies (bf16 and int8
  caches, 132 programs), and the kernel takes every view as an operand."""
  B, N, S, C, R = 1, 16, 16384, 512, 64
  q = jax.ShapeDtypeStruct((B, N, C), jnp.bfloat16)
  qr = jax.ShapeDtypeStruct((B, N, R), jnp.bfloat16)
  kr = jax.ShapeDtypeStruct((B, S, R), jnp.bfloat16)
  c = jax.ShapeDtypeStruct((B, S, C), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
  weights = jax.eval_shape(lambda: _weights(rng))
  kernel = mosaic_int8 if int8 else mosaic
  tuning = mosaic_int8.choose_tuning(B, N, S, C, R, 2, num_sms=132) if int8 else \
      mosaic.choose_tuning(B, S, num_sms=132)

  def operands(prefetch):
    """The operands of the lowered split's Mosaic custom call."""
    def split(q, qr, c, kr, lengths, prefetch):
      cache = quant.quantize_rows(c) if int8 else c
      return kernel.split_kv(q, qr, cache, kr, lengths, sm_scale=0.1,
                             num_splits=tuning.num_splits, stages=tuning.stages,
                             prefetch=prefetch)
    text = jax.jit(split).trace(q, qr, c, kr, lengths, prefetch).lower(
        lowering_platforms=("cuda",)).as_text()
    (args,) = re.findall(r"custom_call @mosaic_gpu_v2\(([^)]*)\)", text)
    return args.split(", ")

  assert len(operands(weights)) == len(operands(())) + len(jax.eval_shape(l2_prefetch.views,
                                                                        weights))
