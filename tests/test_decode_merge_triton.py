"""The Triton merge of split-KV partials (ops/decode/merge_triton.py) against ops.merge_partials,
with the launch of each decode that uses it: one head per program (the Triton decode's) and blocks
of heads (the Mosaic decodes'). Interpreted without a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import lower_for_h200
from mla_jax import quant
from mla_jax.ops import merge_partials
from mla_jax.ops.decode import merge_triton, mosaic_common, triton

ON_GPU = jax.default_backend() == "gpu"
LAUNCHES = {"triton": triton.merge_launch, "mosaic": mosaic_common.merge_launch}


@pytest.mark.parametrize("launch", sorted(LAUNCHES))
@pytest.mark.parametrize("P,B,C,N", [(5, 2, 64, 16), (128, 1, 512, 16), (3, 3, 128, 32),
                                     (2, 64, 512, 16)])
def test_merge_pieces_equals_merge_partials(rng, P, B, C, N, launch):
  """Partials [P,B,N,C]; empty pieces (lse -inf), and one head with no piece at all."""
  o_parts = jnp.asarray(rng.standard_normal((P, B, N, C)), jnp.float32)
  lse_parts = np.asarray(rng.standard_normal((P, B, N)) * 3, np.float32)
  lse_parts[0, 0, :] = -np.inf
  lse_parts[:, B - 1, N // 2] = -np.inf
  out, lse = merge_triton.merge_pieces(o_parts, jnp.asarray(lse_parts), jnp.float32,
                                       launch=LAUNCHES[launch](P, B, N, C), interpret=not ON_GPU)
  ref_out, ref_lse = merge_partials(o_parts, jnp.asarray(lse_parts))
  assert out.shape == (B, N, C) and lse.shape == (B, N)
  assert not np.any(np.isnan(np.asarray(out)))
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  finite = np.isfinite(ref_lse)
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize("merge", merge_triton.MERGES)
def test_merge_heads_returns_the_first_heads(rng, merge):
  """Partials of padded heads: only the first H come back, from either merge."""
  P, B, N, C, H = 3, 2, 16, 64, 5
  o_parts = jnp.asarray(rng.standard_normal((P, B, N, C)), jnp.float32)
  lse_parts = jnp.asarray(rng.standard_normal((P, B, N)), jnp.float32)
  out, lse = merge_triton.merge_heads(o_parts, lse_parts, H, jnp.bfloat16, merge=merge,
                                      launch=mosaic_common.merge_launch(P, B, N, C),
                                      interpret=not ON_GPU)
  ref_out, ref_lse = merge_partials(o_parts[:, :, :H], lse_parts[:, :, :H])
  assert out.shape == (B, H, C) and out.dtype == jnp.bfloat16 and lse.shape == (B, H)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-6, atol=1e-6)


def _merged_and_projected(o_parts, lse_parts, wv_b):
  """float64 oracle of merge_values: the merge (ops/merge.py's formulas), then o · wv_b[h]."""
  o, lse, w = (np.asarray(a, np.float64) for a in (o_parts, lse_parts, wv_b))
  H = w.shape[0]
  o, lse = o[:, :, :H], lse[:, :, :H]
  m = np.max(lse, 0)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.exp(lse - m)
  l = p.sum(0)
  out = np.einsum("pbh,pbhc->bhc", p, o) / np.where(l > 0, l, 1.0)[..., None]
  return np.einsum("bhc,hcv->bhv", out, w), np.where(l > 0, m + np.log(np.where(l > 0, l, 1)),
                                                      -np.inf)


def _check_merge_values(rng, P, B, N, H, C, V, fmt=None, **options):
  """merge_values (options: merge, splits) on partials of N padded heads with piece 0 of row 0
  empty and head H // 2 of the last row empty in every piece, against the float64 oracle; fmt:
  wv_b quantized to that format (the oracle on its dequantized values)."""
  o_parts = jnp.asarray(rng.standard_normal((P, B, N, C)), jnp.float32)
  lse_parts = np.asarray(rng.standard_normal((P, B, N)) * 3, np.float32)
  lse_parts[0, 0, :] = -np.inf
  lse_parts[:, B - 1, H // 2] = -np.inf
  wv_b = jnp.asarray(rng.standard_normal((H, C, V)) / np.sqrt(C), jnp.float32)
  wv_b = wv_b if fmt is None else quant.quantize(wv_b, fmt)
  out, lse = merge_triton.merge_values(o_parts, jnp.asarray(lse_parts), wv_b, jnp.float32,
                                       interpret=not ON_GPU, **options)
  want, want_lse = _merged_and_projected(o_parts, lse_parts, quant.dequantize(wv_b))
  assert out.shape == (B, H, V) and out.dtype == jnp.float32 and lse.shape == (B, H)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(out[B - 1, H // 2], 0.0)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  finite = np.isfinite(want_lse)
  # lse = m + log(l) from float32 parts of magnitude ~10: its rounding is absolute, ~1e-6, and
  # an lse near 0 (0.02 in one draw) has no relative bound
  np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("merge", merge_triton.MERGES)
@pytest.mark.parametrize("P,B,N,H,C,V", [(5, 2, 16, 5, 64, 32), (128, 1, 16, 16, 512, 128),
                                         (1, 3, 32, 32, 128, 16), (300, 2, 16, 3, 256, 64)])
def test_merge_values_equals_merge_then_projection(rng, merge, P, B, N, H, C, V):
  """Partials of N padded heads, the first H projected; empty pieces, a head with no piece at all
  (out 0, lse -inf), a single piece (the projection alone) and more pieces than one load holds
  (300: chunked)."""
  _check_merge_values(rng, P, B, N, H, C, V, merge=merge)


@pytest.mark.parametrize("splits", [2, 4, 8])
@pytest.mark.parametrize("P,B,N,H,C,V", [(132, 1, 16, 16, 512, 128), (300, 2, 16, 3, 256, 64)])
def test_merge_values_split_over_columns(rng, splits, P, B, N, H, C, V):
  """splits pieces of C, each with programs of its own, their float32 products summed after
  the kernel: the same result, empty pieces and an empty head included; a count that does not
  divide C is refused."""
  _check_merge_values(rng, P, B, N, H, C, V, merge="pallas", splits=splits)
  parts = jnp.zeros((P, B, N, C)), jnp.zeros((P, B, N)), jnp.zeros((H, C, V))
  with pytest.raises(ValueError, match="splits=3"):
    merge_triton.merge_values(*parts, jnp.float32, merge="pallas", interpret=True, splits=3)


@pytest.mark.parametrize("fmt", ["q8_0", "iq4_nl"])
@pytest.mark.parametrize("P,B,N,H,C,V,options", [
    (5, 2, 16, 5, 64, 32, dict(merge="pallas")), (1, 3, 32, 32, 128, 16, dict(merge="pallas")),
    (40, 1, 16, 4, 256, 64, dict(merge="pallas", splits=8)),
    (5, 2, 16, 5, 64, 32, dict(merge="xla"))])
def test_merge_values_decodes_a_quantized_wv_b(rng, fmt, P, B, N, H, C, V, options):
  """A q8_0 or iq4_nl wv_b (blocks of 32 rows along C) is decoded in the kernel, also in pieces
  of C of 32 columns each (splits=8 at C=256): the product with its dequantized values."""
  _check_merge_values(rng, P, B, N, H, C, V, fmt=fmt, **options)


@pytest.mark.parametrize("P,splits", [(32, 1), (33, 8), (132, 8)])
def test_merge_values_splits_columns_beyond_32_pieces(P, splits):
  """By default the kernel splits C=512 into 8 pieces when more than 32 pieces of S come in:
  the float32 products [8, B, H, V] show in the jaxpr."""
  spec = jax.ShapeDtypeStruct
  jaxpr = str(jax.make_jaxpr(lambda o, lse, w: merge_triton.merge_values(
      o, lse, w, jnp.bfloat16, merge="pallas", interpret=True))(
          spec((P, 1, 16, 512), jnp.bfloat16), spec((P, 1, 16), jnp.float32),
          spec((16, 512, 128), jnp.bfloat16)))
  assert ("f32[8,1,16,128]" in jaxpr) == (splits == 8)
  assert merge_triton.column_splits(P, 512) == splits


@pytest.mark.parametrize("splits", [1, 2])
def test_merge_values_rounds_the_merged_rows_like_merge_heads(rng, splits):
  """bf16: the merged row is rounded to bf16 before the product, as merge_heads' output is,
  also when pieces of C are projected apart."""
  P, B, N, C, V = 4, 2, 16, 64, 32
  o_parts = jnp.asarray(rng.standard_normal((P, B, N, C)), jnp.bfloat16)
  lse_parts = jnp.asarray(rng.standard_normal((P, B, N)), jnp.float32)
  wv_b = jnp.asarray(rng.standard_normal((N, C, V)), jnp.bfloat16)
  out, _ = merge_triton.merge_values(o_parts, lse_parts, wv_b, jnp.bfloat16, merge="pallas",
                                     interpret=not ON_GPU, splits=splits)
  merged, _ = merge_partials(o_parts.astype(jnp.float32), lse_parts)
  want = np.einsum("bhc,hcv->bhv", np.asarray(merged.astype(jnp.bfloat16), np.float64),
                   np.asarray(wv_b, np.float64))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("P,B,H,splits", [(1, 1, 16, None), (128, 1, 16, None), (128, 1, 16, 8),
                                          (300, 8, 128, None)])
def test_merge_values_lowers_for_cuda(P, B, H, splits):
  """The merge with the value projection lowers through Pallas' Triton lowering for an H200."""
  spec = jax.ShapeDtypeStruct
  text = lower_for_h200(
      lambda o, lse, w: merge_triton.merge_values(o, lse, w, jnp.bfloat16, merge="pallas",
                                                  splits=splits),
      spec((P, B, H, 512), jnp.bfloat16), spec((P, B, H), jnp.float32),
      spec((H, 512, 128), jnp.bfloat16))
  assert "mla_decode_merge_values" in text
