"""Reference ops against float64 numpy, the XLA impls against the reference, and the merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hlo
from mla_jax import layers, ops, quant
from mla_jax.ops import reference, xla as ops_xla
from helpers import RTOL, rel_err

B, H, S, C, R = 3, 5, 70, 64, 16
SCALE = 0.11


def decode_inputs(rng, dtype=jnp.float32, lengths=(0, 1, 70), logit_scale=1.0):
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape) * logit_scale, dtype)
  return (draw(B, H, C), draw(B, H, R), draw(B, S, C), draw(B, S, R),
          jnp.asarray(lengths, jnp.int32))


def numpy_decode(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale):
  """float64 loop over rows: softmax over the first lengths[b] slots."""
  q_latent, q_rope, c_kv, k_rope = (np.asarray(a, np.float64) for a in (q_latent, q_rope, c_kv,
                                                                         k_rope))
  out, lse = np.zeros(q_latent.shape), np.full(q_latent.shape[:2], -np.inf)
  for b, n in enumerate(np.asarray(lengths)):
    if n == 0:
      continue
    s = (q_latent[b] @ c_kv[b, :n].T + q_rope[b] @ k_rope[b, :n].T) * sm_scale
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    out[b] = p @ c_kv[b, :n] / p.sum(-1, keepdims=True)
    lse[b] = m[:, 0] + np.log(p.sum(-1))
  return out, lse


def test_reference_decode_matches_float64(rng):
  args = decode_inputs(rng)
  out, lse = reference.mla_decode(*args, sm_scale=SCALE)
  want_out, want_lse = numpy_decode(*args, SCALE)
  assert rel_err(out, want_out) < 1e-6
  np.testing.assert_array_equal(lse[0], -np.inf)
  np.testing.assert_allclose(lse[1:], want_lse[1:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("logit_scale", [1.0, 4.0])
def test_xla_decode_matches_reference(dtype, logit_scale, rng):
  lengths = rng.integers(1, S + 1, B)
  lengths[0] = 0
  args = decode_inputs(rng, dtype, lengths, logit_scale)
  out, lse = ops.mla_decode(*args, sm_scale=SCALE, impl="xla")
  want_out, want_lse = ops.mla_decode(*args, sm_scale=SCALE, impl="reference")
  assert out.dtype == dtype and lse.dtype == jnp.float32
  assert rel_err(out, want_out) < RTOL[dtype]
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_array_equal(lse[0], -np.inf)
  np.testing.assert_allclose(lse[1:], want_lse[1:], rtol=RTOL[dtype], atol=RTOL[dtype])


def test_xla_decode_reads_int8_cache(rng):
  q_latent, q_rope, c_kv, k_rope, lengths = decode_inputs(rng, lengths=(5, 33, 70))
  c_int8 = quant.quantize_rows(c_kv)
  out, _ = ops.mla_decode(q_latent, q_rope, c_int8, k_rope, lengths, sm_scale=SCALE, impl="xla")
  want, _ = reference.mla_decode(q_latent, q_rope, quant.dequantize(c_int8), k_rope, lengths,
                                 sm_scale=SCALE)
  assert rel_err(out, want) < 1e-5
  exact, _ = reference.mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=SCALE)
  assert rel_err(out, exact) < 2e-2


@pytest.mark.parametrize("pieces", [[70], [10, 60], [7, 0, 30, 33], [1] * 70])
def test_merge_of_pieces_equals_whole(pieces, rng):
  q_latent, q_rope, c_kv, k_rope, lengths = decode_inputs(rng, lengths=(0, 9, 70))
  outs, lses, start = [], [], 0
  for n in pieces:
    piece_lengths = jnp.clip(lengths - start, 0, n)
    o, l = reference.mla_decode(q_latent, q_rope, c_kv[:, start:start + n],
                                k_rope[:, start:start + n], piece_lengths, sm_scale=SCALE)
    outs.append(o)
    lses.append(l)
    start += n
  out, lse = ops.merge_partials(jnp.stack(outs), jnp.stack(lses))
  want_out, want_lse = reference.mla_decode(q_latent, q_rope, c_kv, k_rope, lengths,
                                            sm_scale=SCALE)
  assert rel_err(out, want_out) < 1e-5
  np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-6)
  ref_out, ref_lse = reference.merge_partials(jnp.stack(outs), jnp.stack(lses))
  assert rel_err(out, ref_out) < 1e-6
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-6, atol=1e-6)


def test_merge_of_empty_pieces_is_zero_not_nan(rng):
  outs = jnp.asarray(rng.standard_normal((4, 2, 3, 8)), jnp.float32)
  lses = jnp.full((4, 2, 3), -jnp.inf)
  out, lse = ops.merge_partials(outs, lses)
  np.testing.assert_array_equal(out, 0.0)
  np.testing.assert_array_equal(lse, -np.inf)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_batched_gemv_matches_reference(dtype, rng):
  x = jnp.asarray(rng.standard_normal((3, 4, 32)), dtype)
  w = jnp.asarray(rng.standard_normal((4, 32, 48)), dtype)
  y = ops.batched_gemv(x, w, impl="xla")
  want = np.einsum("bhk,hkn->bhn", np.asarray(x, np.float64), np.asarray(w, np.float64))
  assert y.dtype == dtype
  assert rel_err(y, want) < RTOL[dtype]
  assert rel_err(ops.batched_gemv(x, w, impl="reference"), want) < 1e-6
  # A wider x (the whole query [B,H,K+R]) contributes only its first K columns.
  wide = jnp.concatenate([x, jnp.full((3, 4, 16), 1e4, dtype)], axis=-1)
  for impl in ("xla", "reference"):
    np.testing.assert_array_equal(ops.batched_gemv(wide, w, impl=impl),
                                  ops.batched_gemv(x, w, impl=impl))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("rd,nd->rn", (1, 64), (96, 64)),  # a Linear's product, one row and three
    ("rd,nd->rn", (3, 64), (96, 64)),
    ("hbk,hkn->hbn", (4, 1, 32), (4, 32, 48)),  # the batched GEMV at B=1
    ("btc,hkc->bthk", (1, 1, 32), (4, 8, 32)),  # rows along two axes: one, and six
    ("btc,hkc->bthk", (2, 3, 32), (4, 8, 32)),
])
def test_weight_einsum_equals_the_einsum(spec, x_shape, w_shape, dtype, rng):
  """ops.xla.weight_einsum (a one-row product over a bfloat16 weight on a CPU runs on two rows)
  against the float64 einsum, in the einsum's shape and dtype, and with an f32 result."""
  x = jnp.asarray(rng.standard_normal(x_shape), dtype)
  w = jnp.asarray(rng.standard_normal(w_shape), dtype)
  want = np.einsum(spec, np.asarray(x, np.float64), np.asarray(w, np.float64))
  y = ops_xla.weight_einsum(spec, x, w)
  assert y.shape == want.shape and y.dtype == dtype
  assert rel_err(y, want) <= RTOL[dtype]
  y32 = ops_xla.weight_einsum(spec, x, w, preferred_element_type=jnp.float32)
  assert y32.dtype == jnp.float32 and rel_err(y32, want) <= RTOL[dtype]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="how XLA CPU runs a one-row dot")
def test_one_row_products_read_a_bfloat16_weight_in_place():
  """On a CPU, XLA converts a bfloat16 weight that a one-row dot reads into a float32 copy (the
  plain einsum, the control); a bfloat16 Linear at one token and the batched GEMV at B=1 write
  no temporary the size of the weight."""
  bf16 = jnp.bfloat16
  linear = layers.Linear(512, 384, dtype=bf16, param_dtype=bf16, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(linear)
  x, w = jnp.ones((1, 1, 512), bf16), linear.weight.get_value()
  temporaries = lambda f, *args: hlo.large_temporaries(
      jax.jit(f).lower(*args).compile().as_text(), w.nbytes)
  assert temporaries(lambda x, w: jnp.einsum("btd,nd->btn", x, w), x, w)
  assert temporaries(lambda state, x: nnx.merge(graphdef, state)(x), state, x) == []
  heads = jnp.ones((3, 128, 512), bf16)
  assert temporaries(lambda x, w: ops.batched_gemv(x, w, impl="xla"),
                     jnp.ones((1, 3, 128), bf16), heads) == []


@pytest.mark.parametrize("arg,shape", [(0, (B, H)), (1, (B, H + 1, R)), (2, (B, S, C + 1)),
                                       (3, (B, S + 1, R)), (4, (B + 1,))])
def test_decode_shape_errors_name_the_argument(arg, shape, rng):
  args = list(decode_inputs(rng))
  names = ["q_latent", "q_rope", "c_kv", "k_rope", "lengths"]
  args[arg] = jnp.zeros(shape, args[arg].dtype)
  with pytest.raises(ValueError, match=names[arg]):
    ops.mla_decode(*args, sm_scale=SCALE, impl="xla")


def test_unknown_impl_raises(rng):
  with pytest.raises(ValueError, match="impl"):
    ops.mla_decode(*decode_inputs(rng), sm_scale=SCALE, impl="cuda")
  with pytest.raises(ValueError, match="w.shape"):
    ops.batched_gemv(jnp.ones((2, 3, 4)), jnp.ones((3, 5, 6)))
  with pytest.raises(ValueError, match="w.shape"):
    ops.batched_gemv(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 6)))


IMPLS = ("reference", "xla", "cpu", "pallas")


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_refuses_lengths_outside_the_cache(rng, impl):
  """Outside jit a length below 0 or above S raises, naming lengths; under jit it is clamped."""
  q, qr, c, kr, _ = decode_inputs(rng)
  options = {"interpret": True} if impl == "pallas" else {}
  for lengths in ((0, -1, 5), (0, S + 1, 5)):
    with pytest.raises(ValueError, match=r"lengths\[1\]"):  # names the row
      ops.mla_decode(q, qr, c, kr, jnp.asarray(lengths, jnp.int32), sm_scale=SCALE, impl=impl,
                     **options)
  jitted = jax.jit(lambda lengths: ops.mla_decode(q, qr, c, kr, lengths, sm_scale=SCALE,
                                                  impl=impl, **options))
  out, _ = jitted(jnp.asarray((0, S + 7, 5), jnp.int32))
  want, _ = jitted(jnp.asarray((0, S, 5), jnp.int32))
  assert rel_err(out[1], want[1]) < 1e-6


@pytest.mark.parametrize("arg,shapes", [
    ("q_latent", dict(B=0)), ("q_latent", dict(H=0)), ("c_kv", dict(S=0))])
def test_decode_refuses_empty_sizes(arg, shapes):
  """An empty batch, no heads or an empty cache is refused with a ValueError naming the array."""
  sizes = dict(B=2, H=4, S=8, C=32, R=16) | shapes
  b, h, s, c, r = (sizes[k] for k in "BHSCR")
  z = lambda *shape: jnp.zeros(shape, jnp.float32)
  with pytest.raises(ValueError, match=arg):
    ops.mla_decode(z(b, h, c), z(b, h, r), z(b, s, c), z(b, s, r), jnp.zeros((b,), jnp.int32),
                   sm_scale=SCALE, impl="xla")


@pytest.mark.parametrize("as_type", [list, np.asarray, tuple])
def test_decode_takes_lengths_as_array_likes(as_type, rng):
  args = decode_inputs(rng, lengths=(0, 1, 70))
  want = ops.mla_decode(*args, sm_scale=SCALE, impl="xla")
  got = ops.mla_decode(*args[:4], as_type([0, 1, 70]), sm_scale=SCALE, impl="xla")
  np.testing.assert_array_equal(got[0], want[0])
  with pytest.raises(ValueError, match="expected integers"):
    ops.mla_decode(*args[:4], as_type([0.5, 1, 2]), sm_scale=SCALE, impl="xla")


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_with_values_projects_each_head(rng, impl):
  """wv_b [H,C,V]: out [B,H,V] = out · wv_b[h] in every impl, against the float64 decode; an
  empty row gives 0. A wv_b of the wrong shape names it."""
  args = decode_inputs(rng, lengths=(0, 1, 70))
  wv_b = jnp.asarray(rng.standard_normal((H, C, 8)) / np.sqrt(C), jnp.float32)
  options = {"interpret": True} if impl == "pallas" else {}
  out, lse = ops.mla_decode(*args, sm_scale=SCALE, impl=impl, wv_b=wv_b, **options)
  want, want_lse = numpy_decode(*args, SCALE)
  want = np.einsum("bhc,hcv->bhv", want, np.asarray(wv_b, np.float64))
  assert out.shape == (B, H, 8) and out.dtype == jnp.float32
  assert rel_err(out, want) <= RTOL[jnp.float32]
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_allclose(lse[1:], want_lse[1:], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="wv_b"):
    ops.mla_decode(*args, sm_scale=SCALE, impl=impl, wv_b=wv_b[:, :-1], **options)
