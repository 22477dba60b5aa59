"""The Pallas split-KV decode kernel with the Triton lowering (ops/decode/triton.py) against the
float32 reference.

Without a GPU the kernel runs in interpret mode (CI); on a GPU the same tests run compiled.
Shapes are small so that interpret mode stays fast; `gpu` tests use long caches.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mla_jax
from mla_jax import ops, quant
from mla_jax.ops import decode, reference
from mla_jax.ops.decode import mosaic, triton
import ptxas
from helpers import (check_decode, compile_for_h200, decode_inputs, decode_tol, pallas_decode,
                     rel_err)

INTERPRET = jax.default_backend() != "gpu"
FORMATS = ("bfloat16", "float16", "float32", "int8")
# Small tiles in CI: S=70 with block_s=16 and 2 pieces of 3 tiles (48 rows) puts the lengths below
# on both sides of a tile and a piece boundary, with a ragged last tile.
S_SMALL, BLOCK_S, SPLITS = 70, 16, 2
LENGTHS_SMALL = (0, 1, BLOCK_S - 1, BLOCK_S + 1, 3 * BLOCK_S - 1, 3 * BLOCK_S + 1, S_SMALL)


# The Triton kernel (interpreted without a GPU), its default tuning with some fields overridden:
# block_s=BLOCK_S, num_splits=SPLITS for the small tests.
_decode = functools.partial(pallas_decode, lowering="triton", interpret=INTERPRET)


@pytest.mark.parametrize("fmt,H", [(f, h) for f in FORMATS for h in (1, 20)]
                         + [(f, h) for f in ("bfloat16", "int8") for h in (16, 128)])
def test_ragged_lengths_every_format(rng, fmt, H):
  B = len(LENGTHS_SMALL)
  args = decode_inputs(rng, B, H, S_SMALL, fmt)
  lengths = jnp.asarray(rng.permutation(LENGTHS_SMALL), jnp.int32)
  sm_scale = float(rng.uniform(0.05, 0.1))
  out, lse = _decode(*args, lengths, sm_scale=sm_scale, block_s=BLOCK_S, num_splits=SPLITS)
  check_decode(out, lse, *args, lengths, sm_scale, decode_tol(fmt))


@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
def test_one_piece_needs_no_merge(rng, fmt):
  """num_splits=1: the piece's partial is the result (no merge kernel), empty rows included."""
  B = len(LENGTHS_SMALL)
  args = decode_inputs(rng, B, 16, S_SMALL, fmt)
  lengths = jnp.asarray(rng.permutation(LENGTHS_SMALL), jnp.int32)
  out, lse = _decode(*args, lengths, sm_scale=0.07, block_s=BLOCK_S, num_splits=1)
  check_decode(out, lse, *args, lengths, 0.07, decode_tol(fmt))
  for num_splits, launches in ((1, 1), (2, 2)):  # the split kernel, then the merge if P > 1
    jaxpr = jax.make_jaxpr(functools.partial(_decode, sm_scale=0.07, block_s=BLOCK_S,
                                             num_splits=num_splits))(*args, lengths)
    assert str(jaxpr).count("pallas_call[") == launches


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8"])
def test_large_logits(rng, fmt):
  """Logits of a few hundred: one entry dominates each row; no overflow, no NaN."""
  args = decode_inputs(rng, 3, 16, S_SMALL, fmt, logit_scale=30.0)
  lengths = jnp.asarray([S_SMALL, BLOCK_S + 1, 5], jnp.int32)
  sm_scale = 0.1
  scores = reference.mla_decode(*args, lengths, sm_scale=sm_scale)[1]
  assert float(jnp.max(scores)) > 100.0, "the test must produce large logits"
  out, lse = _decode(*args, lengths, sm_scale=sm_scale, block_s=BLOCK_S, num_splits=SPLITS)
  # A float32 logit s carries a rounding error of a few |s|·2^-24 (its dot's accumulation, in
  # another order than the oracle's), and p = exp(s - m) inherits it as a relative error: at
  # logits of a few hundred that is ~1e-5, at the edge of float32's usual 2e-5 (compiled on the
  # H200, a row just past it), so the bound grows with the largest logit.
  tol = max(decode_tol(fmt), 4 * float(jnp.max(scores)) * 2.0 ** -24)
  check_decode(out, lse, *args, lengths, sm_scale, tol)


@pytest.mark.parametrize("q_dtype,fmt", [("float32", "bfloat16"), ("float32", "int8"),
                                         ("bfloat16", "float32")])
def test_mixed_query_and_cache_dtypes(rng, q_dtype, fmt):
  """Queries and cache of different dtypes compute in the wider one (int8: in the query's)."""
  args = decode_inputs(rng, 2, 16, S_SMALL, fmt, q_dtype=q_dtype)
  lengths = jnp.asarray([S_SMALL, 33], jnp.int32)
  out, lse = _decode(*args, lengths, sm_scale=0.08, block_s=BLOCK_S, num_splits=SPLITS)
  tol = decode_tol(fmt, q_dtype)
  if fmt != "int8":
    tol = max(decode_tol(fmt), tol)
  check_decode(out, lse, *args, lengths, 0.08, tol)


@pytest.mark.parametrize("C,R", [(128, 32), (64, 8), (256, 16)])
def test_other_power_of_two_widths(rng, C, R):
  """R below the dot minimum (8) is zero-padded to 16 inside the wrapper."""
  args = decode_inputs(rng, 2, 4, 40, "float32", C=C, R=R)
  lengths = jnp.asarray([40, 17], jnp.int32)
  out, lse = _decode(*args, lengths, sm_scale=0.1, block_s=BLOCK_S, num_splits=2)
  check_decode(out, lse, *args, lengths, 0.1, decode_tol("float32"))


def test_wide_latent_default_dispatch(rng):
  """C=1024: the Mosaic kernel's buffers exceed shared memory (mosaic.unsupported), so the
  default dispatch runs Triton's kernel, with its default tuning."""
  args = decode_inputs(rng, 2, 16, 40, "bfloat16", C=1024, R=64)
  assert "shared memory" in mosaic.unsupported(args[0], args[2], args[3])
  lengths = jnp.asarray([40, 23], jnp.int32)
  assert decode.plan(*args, lengths, impl="pallas").kernel == "triton"
  out, lse = decode.mla_decode(*args, lengths, sm_scale=0.1, impl="pallas", interpret=INTERPRET)
  check_decode(out, lse, *args, lengths, 0.1, decode_tol("bfloat16"))


def test_more_pieces_than_tiles_and_default_tuning(rng):
  """Pieces wholly past S or past a row's length are skipped and never produce NaN; the partials
  may be float32 or bfloat16 (the default for a bfloat16 query)."""
  args = decode_inputs(rng, 3, 16, S_SMALL, "bfloat16")
  lengths = jnp.asarray([S_SMALL, 0, 20], jnp.int32)
  for options in ({"block_s": BLOCK_S, "num_splits": 8}, {}, {"partials": "float32"},
                  {"block_s": BLOCK_S, "num_splits": 4, "merge": "xla"}):
    out, lse = _decode(*args, lengths, sm_scale=0.09, **options)
    check_decode(out, lse, *args, lengths, 0.09, decode_tol("bfloat16"))


def test_dispatch_through_ops(rng):
  args = decode_inputs(rng, 2, 16, S_SMALL, "int8")
  lengths = jnp.asarray([S_SMALL, 40], jnp.int32)
  tuning = dataclasses.replace(
      decode.plan(*args, lengths, impl="pallas", lowering="triton").tuning, block_s=BLOCK_S)
  out, lse = ops.mla_decode(*args, lengths, sm_scale=0.1, impl="pallas", interpret=INTERPRET,
                            lowering="triton", tuning=tuning)
  check_decode(out, lse, *args, lengths, 0.1, decode_tol("int8"))


@pytest.mark.parametrize("B,H,S", [(1, 16, 131072), (8, 16, 16384 + 37), (4, 128, 4096),
                                   (2, 20, 1000)])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.gpu
def test_long_caches_default_tuning(rng, fmt, B, H, S):
  args = decode_inputs(rng, B, H, S, fmt)
  lengths = jnp.asarray(np.concatenate([[S], rng.integers(0, S + 1, B - 1)]), jnp.int32)
  out, lse = decode.mla_decode(*args, lengths, sm_scale=0.07, impl="pallas", lowering="triton")
  check_decode(out, lse, *args, lengths, 0.07, decode_tol(fmt))


def test_choose_tuning_covers_the_cache_and_fills_the_gpu():
  for B, H, S in [(1, 16, 131072), (64, 16, 16384), (8, 128, 16384), (3, 1, 70), (1, 20, 5)]:
    t = triton.choose_tuning(B, H, S, num_sms=132)
    assert t.partials == "bfloat16"
    assert triton.choose_tuning(B, H, S, num_sms=132, out_dtype=jnp.float32).partials == "float32"
    assert t.block_h >= 16 and t.block_h & (t.block_h - 1) == 0
    head_blocks = -(-H // t.block_h)
    assert t.num_splits * t.piece_tiles(S) * t.block_s >= S, "pieces must cover S"
    assert (t.num_splits - 1) * t.piece_tiles(S) * t.block_s < S, "no piece wholly past S"
    if S >= 4096:
      assert B * head_blocks * t.num_splits >= 0.9 * 132, "one wave must fill the SMs"


@pytest.mark.aot
@pytest.mark.parametrize("B,H", [(1, 64), (1, 128), (64, 128)])
def test_int8_cache_with_many_heads_spills_no_registers(B, H):
  """Compiled for an H200 at its chosen tuning, the split kernel over an int8 cache with more
  than 32 heads (which no Mosaic kernel takes) keeps its accumulator and its converted tile in
  registers: at block_h 64 ptxas spilled 572-580 bytes a thread."""
  C, R, S = 512, 64, 4096
  spec = jax.ShapeDtypeStruct
  cache = quant.Int8Rows(spec((B, S, C), jnp.int8), spec((B, S), jnp.float32))
  run = lambda q, qr, c, kr, n: decode.mla_decode(q, qr, c, kr, n, sm_scale=0.07,
                                                  impl="pallas", lowering="triton")
  usage = ptxas.usage(lambda options: compile_for_h200(
      run, spec((B, H, C), jnp.bfloat16), spec((B, H, R), jnp.bfloat16), cache,
      spec((B, S, R), jnp.bfloat16), spec((B,), jnp.int32), compiler_options=options))
  split = usage["mla_decode_split_kv"]
  assert split.spill_store_bytes == 0 and split.spill_load_bytes == 0, split


def test_bad_arguments_raise():
  q = jnp.ones((2, 16, 512), jnp.bfloat16)
  qr = jnp.ones((2, 16, 64), jnp.bfloat16)
  c = jnp.ones((2, 32, 512), jnp.bfloat16)
  kr = jnp.ones((2, 32, 64), jnp.bfloat16)
  lengths = jnp.full((2,), 32, jnp.int32)
  run = lambda *a, **k: decode.mla_decode(*a, lengths, sm_scale=1.0, impl="pallas",
                                          lowering="triton", interpret=INTERPRET, **k)
  with pytest.raises(ValueError, match="c_kv.shape"):
    run(q, qr, c[:, :, :256], kr)
  with pytest.raises(ValueError, match="k_rope.shape"):
    run(q, qr, c, kr[:, :16])
  with pytest.raises(ValueError, match="powers of two"):
    run(q[..., :500], qr, c[..., :500], kr)
  with pytest.raises(ValueError, match="block_s"):
    dataclasses.replace(triton.choose_tuning(2, 16, 32, num_sms=132), block_s=24)
  with pytest.raises(ValueError, match="c_kv.dtype"):
    run(q, qr, c.astype(jnp.int32), kr)
  with pytest.raises(ValueError, match="partials"):
    dataclasses.replace(triton.choose_tuning(2, 16, 32, num_sms=132), partials="float16")


# A small MLA layer: the rope width (R=8, padded to 16) and the heads (H=4, padded to the dot
# minimum) exercise the wrapper's padding; K, C, V suit the Pallas GEMV's 32-wide tiles.
SMALL = dataclasses.replace(mla_jax.MLAConfig.deepseek_v2_lite(), hidden_size=64, num_heads=4,
                            kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=8,
                            v_head_dim=32, num_layers=1)


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.int8])
def test_module_pallas_decode_equals_xla(rng, cache_dtype):
  """MLAttention(backend="pallas") decode steps equal backend="xla" on the same weights."""
  seed = int(rng.integers(1 << 30))
  modules = {b: mla_jax.MLAttention(SMALL, mode="absorbed", backend=b, rngs=nnx.Rngs(seed))
             for b in ("xla", "pallas")}
  B, T, steps, max_len = 3, 9, 2, 24
  x = jnp.asarray(rng.standard_normal((B, T + steps, SMALL.hidden_size)), jnp.float32)
  positions = np.arange(T + steps)[None].repeat(B, 0)
  positions[1, 5:T] = -1  # a ragged batch: row 1 has a 5-token prompt
  positions[1, T:] = 5 + np.arange(steps)
  positions = jnp.asarray(positions, jnp.int32)
  ys = {}
  with jax.default_matmul_precision("highest"):
    for name, attn in modules.items():
      cache = attn.init_cache(B, max_len, cache_dtype)
      _, cache = attn(x[:, :T], positions[:, :T], cache)  # prefill: XLA in both backends
      outs = []
      for t in range(T, T + steps):
        y, cache = attn(x[:, t:t + 1], positions[:, t:t + 1], cache)
        outs.append(y)
      ys[name] = jnp.concatenate(outs, axis=1)
  assert rel_err(ys["pallas"], ys["xla"]) <= 1e-5
