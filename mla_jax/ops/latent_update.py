"""What an absorbed decode step does between its projections and the split-KV attention, as one
Pallas kernel (Triton lowering).

From the projections' outputs q [B, H·(K+R)] and kv [B, C+R] (q_nope | q_rope per head, and
c_kv | k_rope), one launch:
- completes the layer's input RMSNorm, if the caller folded it into the projections:
  rms_norm(x)·W = (x·g)·W / rms(x), so the projections read x·g, which XLA fuses into their
  reductions, and the kernel multiplies q and kv by each row's 1/rms(x), from Σx² (`input_ss`,
  which XLA fuses with the residual add that makes x); the norm then costs no launch of its own;
- absorbs wk_b into the query, q_latent[b,h] = q_nope[b,h] · wk_b[h] [K, C] (DeepSeek-V2 §2.1.2),
  on the tensor cores with the batch padded to 16 rows; a q8_0 or iq4_nl wk_b block by block,
  each decoded in registers as ops.batched_gemv's Triton kernel decodes it, which saves the
  quantized step that GEMV's launch;
- rotates q_rope (rope.py's YaRN rope on interleaved pairs, cos and sin computed in the kernel
  from the position and the inverse frequencies, so no table is built per layer);
- normalises c_kv (kv_a_layernorm), rotates k_rope, and writes both into the cache slot of the
  token, in place (the cache buffers are aliased to the outputs); an int8 cache row is quantized
  as quant.quantize_rows does (per-row scale max|x|/127, round to nearest even);
- advances the cache's lengths and sticky overflow flags in place, by cache.advance's rule: the
  slot of row b's token is lengths[b], the row writes nothing when it is padding (position -1) or
  full, and a full row that gets a token sets its flag.

XLA runs these as about fourteen small fusions a layer, each a launch (docs/decode_step.md). The
grid is (H, C / block_c): program (h, j) owns columns j·block_c.. of head h's q_latent; one
program of each head rotates its q_rope (_rotating_block), and one program of each column block j
writes the cache rows b ≡ j (mod C / block_c), whole, and their lengths and flags
(_writing_head), so each row's length is read and written by one program only. The arithmetic
rounds where the module does: the norm to the module's dtype before its weight, rope in float32
rounded to the module's dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mla_jax import quant
from mla_jax.cache import advance
from mla_jax.ops import latent_row
from mla_jax.ops.common import (MAGIC, MAGIC_BITS, TRITON_MIN_DOT, check_field, is_pow2,
                                next_pow2)
from mla_jax.ops.gemv import triton as gemv_triton

MAX_BATCH = 64
INT8_MAX = 127.0


@dataclasses.dataclass(frozen=True)
class LatentTuning:
  """block_c columns of q_latent per program."""

  block_c: int = 64
  num_warps: int = 4

  def __post_init__(self):
    for name in ("block_c", "num_warps"):
      value = getattr(self, name)
      check_field(self, name, isinstance(value, int) and is_pow2(value), "a power of two")
    check_field(self, "block_c", self.block_c >= TRITON_MIN_DOT,
                f">= {TRITON_MIN_DOT} (Triton's dot)")


def choose_tuning(C: int) -> LatentTuning:
  """64 columns a program (8 programs a head at C=512), fewer if C is smaller."""
  return LatentTuning(block_c=max(TRITON_MIN_DOT, min(64, C)))


def unsupported(B: int, H: int, K: int, C: int, R: int, tuning: LatentTuning) -> str | None:
  """Why the kernel cannot take these sizes, or None if it can."""
  if B > MAX_BATCH:
    return f"B={B}: at most {MAX_BATCH} batch rows"
  if not (is_pow2(K) and is_pow2(C) and is_pow2(R) and R >= 2 and K >= TRITON_MIN_DOT):
    return f"K={K}, C={C}, R={R}: expected powers of two (Triton blocks), K >= 16, R >= 2"
  if C % tuning.block_c:
    return f"C={C}: expected a multiple of block_c={tuning.block_c}"
  return None


def _round_even(v):
  """round-to-nearest-even of float32 v (|v| < 2^22) as int32: the bits of v + MAGIC, less
  MAGIC_BITS (a bitcast, so that no compiler folds the add and the subtraction away)."""
  return jax.lax.bitcast_convert_type(v + MAGIC, jnp.int32) - MAGIC_BITS


def _rotating_block(h, num_blocks):
  """The column block whose program rotates head h's q_rope: h mod num_blocks. With more heads
  than column blocks (V2-Lite: 16 and 8) no program both rotates and writes cache rows
  (_writing_head): the launch lasts as long as its longest program, and a program with both jobs
  runs three dependent phases of loads instead of two."""
  return h % num_blocks


def _writing_head(j, num_heads):
  """The head whose program in column block j writes that block's cache rows: j + 1 mod H."""
  return (j + 1) % num_heads


def _kernel(pos_ref, q_ref, qp_ref, kv_ref, kvp_ref, g_ref, freq_ref, *refs, B, S, K, R, C,
            kv_at, block_c, absorb, wk_fmt, int8, eps, rope_scale, dtype, norm_input, scale_q,
            input_dim, input_eps, interpret):
  # pos_ref [B] int32 (-1: padding); q_ref [B, H·(K+R) ...] and qp_ref, the same array as
  # [B, H·(K+R)/2 ..., 2] (rope pairs); kv_ref [B, ...] with c_kv | k_rope at its columns
  # kv_at.. kv_at+C+R, and kvp_ref, its pairs [B, .../2, 2]; g_ref [C];
  # freq_ref [R/2] float32; wk_ref [H, K, C], or a quant.QuantizedTensor's qs_ref and d_ref
  # (absorb; wk_fmt its format); ss_ref [B] float32 (norm_input); then the
  # aliased cache inputs (unused: the outputs are the same buffers); outputs q_latent [B, H, C]
  # (absorb), q_rope [B, H, R/2, 2], c_kv [B, S, C], scales [B, S] (int8), k_rope
  # [B, S, R/2, 2], lengths [B] int32 and overflow [B] int32.
  refs = list(refs)
  wk_refs = [refs.pop(0) for _ in range(2 if wk_fmt else 1)] if absorb else None
  ss_ref = refs.pop(0) if norm_input else None
  refs = refs[5 if int8 else 4:]
  ql_ref = refs.pop(0) if absorb else None
  qr_ref, c_ref, *rest = refs
  s_ref, kr_ref, len_ref, ovf_ref = rest if int8 else (None, *rest)
  h, j = pl.program_id(0), pl.program_id(1)
  Bp = max(TRITON_MIN_DOT, next_pow2(B))
  rows = pl.ds(0, Bp)
  row_ok = jnp.arange(Bp) < B
  half = R // 2
  base = h * (K + R)
  # each row's 1/rms(x), layers.RMSNorm's rsqrt(mean(x²) + eps): the input norm's end
  input_inv_rms = (jax.lax.rsqrt(pltriton.load(ss_ref.at[rows], mask=row_ok, other=0.0)
                                 / input_dim + input_eps) if norm_input else None)

  def finish_q(v):  # v [Bp, n] float32, a slice of q, rounded as the module rounds q
    return (v * input_inv_rms[:, None]).astype(dtype).astype(jnp.float32) if scale_q else v

  def finish_kv(v, b):  # v [n] float32, a slice of row b of kv
    if not norm_input:
      return v
    row_inv_rms = jnp.sum(jnp.where(jnp.arange(Bp) == b, input_inv_rms, 0.0))
    return (v * row_inv_rms).astype(dtype).astype(jnp.float32)

  def rotate(even, odd, pos):
    return latent_row.rotate(even, odd, pos, freq_ref[...], rope_scale)

  def q_nope(k0, width):  # [Bp, width] float32: columns k0.. of head h's q_nope
    mask = jnp.broadcast_to(row_ok[:, None], (Bp, width))
    return finish_q(pltriton.load(q_ref.at[rows, pl.ds(base + k0, width)], mask=mask,
                                  other=0.0).astype(jnp.float32))

  if absorb:
    cols = pl.ds(pl.multiple_of(j * block_c, block_c), block_c)
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    product = functools.partial(jax.lax.dot, precision=precision,
                                preferred_element_type=jnp.float32)
    if wk_fmt is None:
      q_latent = product(q_nope(0, K).astype(dtype), wk_refs[0][h, :, cols].astype(dtype))
    else:  # ops.batched_gemv's arithmetic: a GGML block's values decoded, dotted, then scaled
      q_latent = jnp.zeros((Bp, block_c), jnp.float32)
      for kb in range(K // quant.BLOCK):
        parts, d = gemv_triton.block_of(wk_refs, h, kb, cols=cols, fmt=wk_fmt, lookup="poly",
                                        interpret=interpret)
        q_latent += d * sum(product(q_nope(kb * quant.BLOCK + off, v.shape[0]).astype(dtype),
                                    gemv_triton.as_dot_operand(v, dtype)) for off, v in parts)
    pltriton.store(ql_ref.at[rows, h, cols], q_latent.astype(ql_ref.dtype),
                   mask=jnp.broadcast_to(row_ok[:, None], (Bp, block_c)))

  @pl.when(j == _rotating_block(h, pl.num_programs(1)))
  def _rotate_query():
    mask = jnp.broadcast_to(row_ok[:, None], (Bp, half))
    pos = pltriton.load(pos_ref.at[rows], mask=row_ok, other=0)
    pairs = pl.ds(h * ((K + R) // 2) + K // 2, half)
    even, odd = (finish_q(pltriton.load(qp_ref.at[rows, pairs, jnp.int32(i)], mask=mask,
                                        other=0.0).astype(jnp.float32)) for i in (0, 1))
    for i, part in enumerate(rotate(even, odd, pos)):
      pltriton.store(qr_ref.at[rows, h, :, jnp.int32(i)], part.astype(dtype).astype(qr_ref.dtype),
                     mask=mask)

  @pl.when(h == _writing_head(j, pl.num_programs(0)))
  def _write_cache():
    def write_row(n, carry):
      b = j + n * (C // block_c)
      length, pos = len_ref[b], pos_ref[b]
      valid, ok, at = latent_row.slot(length, pos, S)
      c_row = finish_kv(kv_ref[b, pl.ds(kv_at, C)].astype(jnp.float32), b)
      row = latent_row.kv_norm(c_row, g_ref[...], eps, dtype)
      if int8:  # quant.quantize_rows
        scale = jnp.max(jnp.abs(row)) / INT8_MAX
        inv = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)
        row = jnp.clip(_round_even(row * inv), -INT8_MAX, INT8_MAX)
        pltriton.store(s_ref.at[b, pl.ds(at, 1)], jnp.full((1,), scale, jnp.float32),
                       mask=jnp.full((1,), ok))
      pltriton.store(c_ref.at[b, pl.ds(at, 1), :], row.astype(c_ref.dtype)[None, :],
                     mask=jnp.full((1, C), ok))

      @pl.when(ok)
      def _write_rope():
        even, odd = (finish_kv(kvp_ref[b, pl.ds((kv_at + C) // 2, half), i]
                               .astype(jnp.float32), b)
                     for i in (0, 1))
        for i, part in enumerate(rotate(even, odd, pos)):
          kr_ref[b, at, :, i] = part.astype(dtype).astype(kr_ref.dtype)

      len_ref[b], ovf_ref[b] = advance(length, ovf_ref[b], valid, S)
      return carry

    jax.lax.fori_loop(0, pl.cdiv(B - j, C // block_c), write_row, 0)


@functools.partial(jax.jit, static_argnames=("num_heads", "rope_scale", "eps", "dtype",
                                             "tuning", "interpret", "input_dim", "input_eps",
                                             "scale_q"))
def latent_update(q, kv, positions, kv_norm_weight, inv_freq, wk_b, c_kv, scales, k_rope, lengths,
                  overflow, *, num_heads: int, rope_scale: float, eps: float, dtype,
                  tuning: LatentTuning, interpret: bool = False, input_ss=None,
                  input_dim: int = 1, input_eps: float = 0.0, scale_q: bool = True):
  """One launch of the kernel above: (q_latent [B,H,C] in dtype, or None when wk_b is None;
  q_rope [B,H,R] in dtype; c_kv; scales; k_rope; lengths; overflow).

  q [B, H·(K+R)] and kv [B, C+R]: the projections' outputs (H = num_heads); or kv None and q
  [B, H·(K+R) + C+R], the two side by side (layers.joint_product), read in place. positions
  [B]: each row's rope position, -1 for padding (nothing is written). kv_norm_weight [C]:
  kv_a_layernorm's weight (eps). inv_freq [R/2] float32 and rope_scale: rope.inv_freq and
  rope.attention_factor. wk_b [H,K,C], a float array or a quant.QuantizedTensor (q8_0 or
  iq4_nl, K a multiple of its 32-row blocks, decoded in registers as ops.batched_gemv's Triton
  kernel decodes them), or None (q_latent is then left to the caller). c_kv
  [B,S,C] (a float array, or int8 values with scales [B,S] float32; scales None otherwise),
  k_rope [B,S,R], lengths [B] int32 and overflow [B] int32: a LatentCache's buffers, updated in
  place under jit when donated.

  input_ss [B] float32 or None: Σx² over each row of the layer's input x [B, input_dim], when
  the caller folded its input RMSNorm into the projections (q and kv are projections of x·g, g
  the norm's weight); the kernel then multiplies kv, and q if scale_q, by each row's
  rsqrt(input_ss / input_dim + input_eps) before using them.
  """
  B, S, C = c_kv.shape
  R = k_rope.shape[-1]
  H = num_heads
  joint = kv is None
  q_width = q.shape[1] - (C + R) if joint else q.shape[1]
  K = q_width // H - R
  if q_width != H * (K + R) or (not joint and kv.shape[1] != C + R):
    raise ValueError(f"q.shape={q.shape}, kv.shape={None if joint else kv.shape}: expected "
                     f"[B, H·(K+R)] and [B, C+R={C + R}] (H={H}, R={R}), or kv None and q "
                     "[B, H·(K+R) + C+R]")
  kv_at, kv = (q_width, q) if joint else (0, kv)  # kv's first column in its operand
  int8 = scales is not None
  absorb = wk_b is not None
  wk_fmt = getattr(wk_b, "fmt", None)
  reason = unsupported(B, H, K, C, R, tuning)
  if reason is None and wk_fmt is not None and K % quant.BLOCK:
    reason = f"K={K}: a quantized wk_b needs K a multiple of its {quant.BLOCK}-row blocks"
  if reason is not None:
    raise ValueError(reason)
  pairs = k_rope.reshape(B, S, R // 2, 2)  # the rope pairs as an axis: no strided access
  cache = (c_kv, scales, pairs, lengths, overflow) if int8 else (c_kv, pairs, lengths, overflow)
  operands = [positions.astype(jnp.int32), q, q.reshape(B, -1, 2), kv, kv.reshape(B, -1, 2),
              kv_norm_weight, inv_freq.astype(jnp.float32)]
  if absorb:
    operands.extend((wk_b.qs, wk_b.d) if wk_fmt else (wk_b,))
  if input_ss is not None:
    if input_ss.shape != (B,):
      raise ValueError(f"input_ss.shape={input_ss.shape}; expected [B={B}], Σx² of each row")
    operands.append(input_ss.astype(jnp.float32))
  out_shape = [jax.ShapeDtypeStruct((B, H, R // 2, 2), dtype),
               *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in cache)]
  if absorb:
    out_shape.insert(0, jax.ShapeDtypeStruct((B, H, C), dtype))
  first_out = 1 + int(absorb)  # the cache outputs follow q_latent and q_rope
  aliases = {len(operands) + i: first_out + i for i in range(len(cache))}
  kernel = functools.partial(
      _kernel, B=B, S=S, K=K, R=R, C=C, kv_at=kv_at, block_c=tuning.block_c, absorb=absorb,
      wk_fmt=wk_fmt, int8=int8, eps=eps, rope_scale=rope_scale, dtype=jnp.dtype(dtype),
      norm_input=input_ss is not None, scale_q=input_ss is not None and scale_q,
      input_dim=input_dim, input_eps=input_eps, interpret=interpret)
  outs = list(pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(H, C // tuning.block_c),
      input_output_aliases=aliases,
      compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps, num_stages=1),
      interpret=interpret,
      name="mla_latent_update",
  )(*operands, *cache))
  q_latent = outs.pop(0) if absorb else None
  q_rope, *cache = outs
  if not int8:
    cache.insert(1, None)
  c_kv, scales, pairs, lengths, overflow = cache
  return q_latent, q_rope.reshape(B, H, R), c_kv, scales, pairs.reshape(B, S, R), lengths, overflow
