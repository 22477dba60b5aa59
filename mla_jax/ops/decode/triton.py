"""Split-KV absorbed MLA decode on GPU: Pallas with the Triton lowering.

Absorbed MLA decoding (DeepSeek-V2 §2.1) is multi-query attention over one latent cache shared by
all heads: scores = q_latent·c_kvᵀ + q_rope·k_ropeᵀ and o_latent = softmax(scores·scale)·c_kv, so
the c_kv tile is both key and value. FlashDecoding (Dao et al. 2023) splits the S axis into P
pieces so that one long sequence fills every SM; each program runs the FlashAttention-2 online
softmax (m_i, l_i, acc) over its piece in tiles of block_s rows and writes a partial (o_p, lse_p)
to [P,B,H,C] / [P,B,H]; a second small kernel (merge_triton.py) merges the pieces by log-sum-exp
(ops/merge.py has the math; merge="xla" uses ops.merge_partials instead).

Grid (head blocks, pieces, batch), head blocks fastest: the programs that read one piece of c_kv
for different heads run side by side and share it through L2. Scores are two power-of-two dots
(C=512 and R=64 stay separate operands: the Triton lowering needs power-of-two arrays). Pieces
past a row's length run no tile: they write o_p = 0, lse_p = -inf. docs/decode_gpu.md gives the
tiling and split heuristic and the measured results.

int8 caches (quant.Int8Rows: c ≈ d_s·q_s per token s) are never dequantized in memory: scores get
d_s per column (q·(d_s q_s) = d_s (q·q_s)) and the probabilities are scaled by d_s before p·V,
so the int8 tile only needs an exact conversion to float16. On the GPU that conversion is the
magic-number trick (FasterTransformer's int8→half): byte x+128 placed under the float16 exponent
of 1024 reads as 1024+x+128, one PRMT and one packed subtraction per two values. The query is
divided by its per-head max |q| so that it fits float16; the scores are multiplied back.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mla_jax import quant
from mla_jax.ops.common import (LN2, LOG2E, TRITON_MIN_DOT, check_field, is_pow2,
                                is_positive_int, next_pow2)
from mla_jax.ops.decode.merge_triton import MERGES, MergeLaunch, merge_heads, merge_values

_SMEM_BYTES = 227 * 1024      # shared memory per SM on Hopper
_MAX_PROGRAMS_PER_SM = 4
_MIN_TILES_PER_PIECE = 4      # a shorter piece spends its time on setup and the partial write
_MERGE_PROGRAMS = 512         # enough merge programs to keep every SM loading
_MERGE_TILE = 8192            # float32 elements of o_p the merge loads per step (32 KiB)
PARTIALS = ("float32", "bfloat16")

# int8 x -> float16 x, two values per output register: xor 0x80 makes the byte x+128; PRMT puts
# it under the exponent byte 0x64 (float16 1024 + byte); subtracting 0x6480 (1152) leaves x.
_I8_TO_F16_ASM = """{
.reg .b32 t, k;
xor.b32 t, $2, 0x80808080;
mov.b32 k, 0x64806480;
prmt.b32 $0, t, 0x64646464, 0x4140;
prmt.b32 $1, t, 0x64646464, 0x4342;
sub.f16x2 $0, $0, k;
sub.f16x2 $1, $1, k;
}"""


@dataclasses.dataclass(frozen=True)
class TritonTuning:
  """Tile sizes and launch shape of one decode call (docs/decode_gpu.md explains the choice)."""

  block_h: int      # heads per program (power of two, >= 16; H is padded up to a multiple)
  block_s: int      # cache rows per tile of the inner loop (power of two, >= 16)
  num_splits: int   # P: pieces of the S axis
  num_warps: int
  num_stages: int   # Triton software-pipelining depth of the tile loop
  merge: str = "pallas"  # "pallas": merge_triton's kernel; "xla": ops.merge_partials
  partials: str = "float32"  # dtype of the partial outputs o_p ("bfloat16" halves their bytes)

  def __post_init__(self):
    for name in ("block_h", "block_s"):
      value = getattr(self, name)
      check_field(self, name, isinstance(value, int) and is_pow2(value) and value >= TRITON_MIN_DOT,
                  f"a power of two >= {TRITON_MIN_DOT}")
    check_field(self, "num_splits", is_positive_int(self.num_splits), "an integer >= 1")
    check_field(self, "num_warps", isinstance(self.num_warps, int) and is_pow2(self.num_warps),
                "a power of two")
    check_field(self, "num_stages", is_positive_int(self.num_stages), "an integer >= 1")
    check_field(self, "merge", self.merge in MERGES, f"one of {MERGES}")
    check_field(self, "partials", self.partials in PARTIALS, f"one of {PARTIALS}")

  def piece_tiles(self, S: int) -> int:
    """Tiles of block_s rows in each piece of an S-row cache."""
    return pl.cdiv(pl.cdiv(S, self.block_s), self.num_splits)


def programs_per_sm(block_s: int, num_stages: int, row_bytes: int) -> int:
  """How many programs share one SM: the pipeline's shared memory decides."""
  smem = num_stages * block_s * row_bytes
  return max(1, min(_MAX_PROGRAMS_PER_SM, _SMEM_BYTES // smem))


def choose_tuning(B: int, H: int, S: int, *, num_sms: int, cache_itemsize: int = 2, C: int = 512,
                  R: int = 64, out_dtype=jnp.bfloat16) -> TritonTuning:
  """The split heuristic (FlashDecoding): one wave of programs that fills every SM.

  block_h: heads in as few blocks as the registers allow (acc [block_h, C] float32 lives in
  registers): next power of two >= max(H, 16), at most 64, and at most 32 for an int8 cache,
  whose converted tile also takes registers: at block_h 64 ptxas for sm_90a spilled 580 bytes
  and the tile loop had 86 barriers, at 32 (8 warps) none and 11 (docs/decode_gpu.md; not yet
  timed). Tiles (measured on an H200, docs/decode_gpu.md): with 16 heads, block_s = 32 rows in
  3 pipeline stages (bf16: ~93 KiB of shared memory and ~190 registers a thread, so 2 programs
  per SM), 4 stages for int8 and 16 rows for float32; with more heads, 64 rows in 2 stages (32
  for int8). P is chosen so that B·head_blocks·P is about one wave of programs (a second,
  partial wave would leave most SMs idle while it runs), rounded so that pieces are whole tiles
  and at least _MIN_TILES_PER_PIECE long; P = 1 once B·head_blocks fills a wave by itself.
  Partials are stored in bfloat16 when the output is bfloat16 (it is rounded to that anyway): at
  B=1,S=131072 the float32 partials are 8 MB, 5% of the cache bytes, and halving them saved 2 µs
  of 48.
  """
  int8 = cache_itemsize == 1
  block_h = min(max(next_pow2(H), TRITON_MIN_DOT), 32 if int8 else 64)
  if cache_itemsize >= 4:
    block_s, num_stages = 16, 3 if block_h <= 16 else 2
  elif block_h > 16:  # int8 needs room for the converted tile: 64 rows exceed shared memory
    block_s, num_stages = 32 if int8 else 64, 2
  else:
    block_s, num_stages = 32, 4 if int8 else 3
  row_bytes = C * cache_itemsize + R * max(cache_itemsize, 2)
  wave = num_sms * programs_per_sm(block_s, num_stages, row_bytes)
  head_blocks = pl.cdiv(H, block_h)
  tiles = pl.cdiv(S, block_s)
  num_splits = max(1, min(round(wave / (B * head_blocks)), tiles // _MIN_TILES_PER_PIECE))
  num_splits = pl.cdiv(tiles, pl.cdiv(tiles, num_splits))  # no empty trailing piece
  partials = "bfloat16" if jnp.dtype(out_dtype) == jnp.bfloat16 else "float32"
  num_warps = 8 if block_h >= 64 or (int8 and block_h > 16) else 4
  return TritonTuning(block_h=block_h, block_s=block_s, num_splits=num_splits,
                      num_warps=num_warps, num_stages=num_stages, partials=partials)


def unsupported(q_latent, c_kv, k_rope) -> str | None:
  """Why this kernel cannot take these arguments, or None if it can."""
  B, _, C = q_latent.shape
  S, R = k_rope.shape[1:]
  if not (is_pow2(C) and is_pow2(R)):
    return f"C={C}, R={R}: the Triton lowering needs powers of two"
  if C < TRITON_MIN_DOT:
    return f"q_latent.shape={tuple(q_latent.shape)}: C={C} must be >= {TRITON_MIN_DOT}"
  if isinstance(c_kv, quant.Int8Rows):
    if tuple(c_kv.scales.shape) != (B, S):
      return f"c_kv.scales.shape={tuple(c_kv.scales.shape)}; expected [B,S]=({B}, {S})"
  elif c_kv.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    return (f"c_kv.dtype={c_kv.dtype}; expected bfloat16, float16, float32 or a "
            "quant.Int8Rows")
  return None


def _int8_to_f16(x, interpret: bool):
  if interpret:
    return x.astype(jnp.float16)
  [y] = pltriton.elementwise_inline_asm(
      _I8_TO_F16_ASM, args=[x], constraints="=r,=r,r", pack=4,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float16)])
  return y


def dot(a, b, contract_b):
  """a [m, k] · b (contracting b's axis contract_b) in float32, exact for float32 operands."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def softmax_step(carry, s, values, dtype, value_scales=None):
  """FlashAttention-2's online softmax over one tile: carry (acc [h, C], m [h], l [h]) float32,
  s [h, n] base-2 scores with -inf where masked (every tile has a valid row, so m stays
  finite), values [n, C] (times value_scales [n] if given), the dot's operands in dtype."""
  acc, m_i, l_i = carry
  m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
  alpha = jnp.exp2(m_i - m_new)
  p = jnp.exp2(s - m_new[:, None])
  l_i = l_i * alpha + jnp.sum(p, axis=1)
  pv = p if value_scales is None else p * value_scales[None, :]
  return acc * alpha[:, None] + dot(pv.astype(dtype), values, 0), m_new, l_i


def _decode_kernel(lengths_ref,      # [B] int32
                   q_latent_ref,     # [block_h, C]
                   q_rope_ref,       # [block_h, R]
                   c_kv_ref,         # [S, C]
                   k_rope_ref,       # [S, R]
                   *refs,            # (scales_ref [S] float32 if int8), o_ref, lse_ref
                   sm_scale: float, block_s: int, piece_tiles: int, latent_dtype, rope_dtype,
                   quantized: bool, interpret: bool):
  if quantized:
    scales_ref, o_ref, lse_ref = refs  # [S]; [block_h, C] float32; [block_h] float32
  else:
    scales_ref = None
    o_ref, lse_ref = refs
  block_h, C = q_latent_ref.shape
  piece, b = pl.program_id(1), pl.program_id(2)
  length = jnp.clip(lengths_ref[b], 0, c_kv_ref.shape[0])
  piece_start = piece * (piece_tiles * block_s)
  piece_end = jnp.minimum(length, piece_start + piece_tiles * block_s)
  num_tiles = jnp.maximum(pl.cdiv(piece_end - piece_start, block_s), 0)

  scale_log2 = sm_scale * LOG2E  # softmax in base 2: exp(x·scale) = 2^(x·scale·log2 e)
  q_latent = q_latent_ref[...]
  if quantized and latent_dtype == jnp.float16:
    q_abs_max = jnp.max(jnp.abs(q_latent.astype(jnp.float32)), axis=1)
    q_scale = jnp.where(q_abs_max > 0, q_abs_max, 1.0)                       # [block_h]
    q_latent = (q_latent.astype(jnp.float32) / q_scale[:, None]).astype(jnp.float16)
    row_scale = (q_scale * scale_log2)[:, None]
  else:
    q_latent = q_latent.astype(latent_dtype)
    row_scale = scale_log2
  q_rope = q_rope_ref[...].astype(rope_dtype)

  def load_tile(t, mask):
    """Rows [start, start + block_s) of the piece: raw c_kv, k_rope (and int8 scales)."""
    start = piece_start + t * block_s
    rows = pl.ds(start, block_s)
    other = None if mask is None else 0
    c_kv = pltriton.load(c_kv_ref.at[rows, :], mask=mask, other=other)       # [block_s, C]
    k_rope = pltriton.load(k_rope_ref.at[rows, :], mask=mask, other=other)   # [block_s, R]
    if not quantized:
      return c_kv, k_rope
    d = pltriton.load(scales_ref.at[rows], mask=None if mask is None else mask[:, 0],
                      other=None if mask is None else 0.0)                    # [block_s]
    return c_kv, k_rope, d

  def update(carry, tile, valid):
    """One FlashAttention-2 step over a tile; valid [block_s] masks rows past the length."""
    c_kv, k_rope = tile[0], tile[1].astype(rope_dtype)
    c_kv = (_int8_to_f16(c_kv, interpret) if c_kv.dtype == jnp.int8 and latent_dtype ==
            jnp.float16 else c_kv.astype(latent_dtype))
    s_latent = dot(q_latent, c_kv, 1)                                         # [block_h, block_s]
    if quantized:
      s_latent = s_latent * tile[2][None, :]
    s = s_latent * row_scale + dot(q_rope, k_rope, 1) * scale_log2
    if valid is not None:
      s = jnp.where(valid[None, :], s, -jnp.inf)
    return softmax_step(carry, s, c_kv, latent_dtype, tile[2] if quantized else None)

  carry = (jnp.zeros((block_h, C), jnp.float32), jnp.full((block_h,), -jnp.inf, jnp.float32),
           jnp.zeros((block_h,), jnp.float32))
  # Whole tiles run unmasked; the piece's ragged last tile (if any) runs once with masks.
  full_tiles = jnp.maximum(piece_end - piece_start, 0) // block_s
  carry = jax.lax.fori_loop(0, full_tiles, lambda t, c: update(c, load_tile(t, None), None),
                            carry)

  def ragged(t, c):
    valid = piece_start + t * block_s + jnp.arange(block_s) < length
    return update(c, load_tile(t, valid[:, None]), valid)

  acc, m_i, l_i = jax.lax.fori_loop(full_tiles, num_tiles, ragged, carry)
  nonempty = l_i > 0
  safe_l = jnp.where(nonempty, l_i, 1.0)
  o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(nonempty, (m_i + jnp.log2(safe_l)) * LN2, -jnp.inf)


def _latent_dtype(q_dtype, cache_dtype):
  """Dot operand dtype for q_latent·c_kvᵀ and p·c_kv: int8 caches use float16 (exact for int8)
  unless the query is float32; float caches use the wider of query and cache."""
  if cache_dtype == jnp.int8:
    return jnp.dtype(jnp.float32 if q_dtype == jnp.float32 else jnp.float16)
  return jnp.promote_types(q_dtype, cache_dtype)


def merge_launch(P: int, B: int, H: int, C: int) -> MergeLaunch:
  """One program per (b, h, block_c columns): narrow column blocks when B·H is small, so that
  about _MERGE_PROGRAMS programs share the reads; each step loads up to _MERGE_TILE values."""
  block_c = min(C, 128, max(32, next_pow2(pl.cdiv(C * B * H, _MERGE_PROGRAMS))))
  chunk = min(next_pow2(P), max(16, _MERGE_TILE // block_c))
  return MergeLaunch(heads=H, block_n=1, block_c=block_c, chunk=chunk, heads_outer=False,
                     name="mla_decode_merge")


@functools.partial(jax.jit, static_argnames=("sm_scale", "tuning", "interpret"))
def mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, wv_b=None, *, sm_scale: float,
               tuning: TritonTuning, interpret: bool = False):
  """Absorbed MLA decode: out [B,H,C] in q_latent.dtype, lse [B,H] float32 (natural log); with
  wv_b [H,C,V], out [B,H,V] is the merged o projected by it (merge_triton.merge_values).

  q_latent [B,H,C], q_rope [B,H,R], c_kv [B,S,C] (bf16/f16/f32 or quant.Int8Rows), k_rope
  [B,S,R], lengths [B] (valid rows of b are [0, min(lengths[b], S))); see unsupported().
  interpret: run the kernels in Pallas' interpret mode (on a CPU).
  """
  B, H, C = q_latent.shape
  S, R = k_rope.shape[1:]
  quantized = isinstance(c_kv, quant.Int8Rows)
  values = c_kv.values if quantized else c_kv
  block_h = tuning.block_h
  head_blocks = pl.cdiv(H, block_h)
  H_pad = head_blocks * block_h
  R_pad = max(R, TRITON_MIN_DOT)  # rope dims below the dot minimum: zero columns add nothing
  if H_pad != H:
    q_latent = jnp.pad(q_latent, ((0, 0), (0, H_pad - H), (0, 0)))
  if (H_pad, R_pad) != (H, R):
    q_rope = jnp.pad(q_rope, ((0, 0), (0, H_pad - H), (0, R_pad - R)))
  if R_pad != R:
    k_rope = jnp.pad(k_rope, ((0, 0), (0, 0), (0, R_pad - R)))
  P = tuning.num_splits

  in_specs = [
      pl.BlockSpec((B,), lambda h, p, b: (0,)),
      pl.BlockSpec((None, block_h, C), lambda h, p, b: (b, h, 0)),
      pl.BlockSpec((None, block_h, R_pad), lambda h, p, b: (b, h, 0)),
      pl.BlockSpec((None, S, C), lambda h, p, b: (b, 0, 0)),
      pl.BlockSpec((None, S, R_pad), lambda h, p, b: (b, 0, 0)),
  ]
  operands = [lengths.astype(jnp.int32), q_latent, q_rope, values, k_rope]
  if quantized:
    in_specs.append(pl.BlockSpec((None, S), lambda h, p, b: (b, 0)))
    operands.append(c_kv.scales.astype(jnp.float32))
  kernel = functools.partial(
      _decode_kernel, sm_scale=sm_scale, block_s=tuning.block_s, piece_tiles=tuning.piece_tiles(S),
      latent_dtype=_latent_dtype(q_latent.dtype, values.dtype),
      rope_dtype=jnp.promote_types(q_rope.dtype, k_rope.dtype), quantized=quantized,
      interpret=interpret)
  o_parts, lse_parts = pl.pallas_call(
      kernel,
      grid=(head_blocks, P, B),
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, None, block_h, C), lambda h, p, b: (p, b, h, 0)),
          pl.BlockSpec((None, None, block_h), lambda h, p, b: (p, b, h)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((P, B, H_pad, C), jnp.dtype(tuning.partials)),  # o_p
          jax.ShapeDtypeStruct((P, B, H_pad), jnp.float32),     # lse_p
      ],
      compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps,
                                              num_stages=tuning.num_stages),
      interpret=interpret,
      name="mla_decode_split_kv",
  )(*operands)

  if wv_b is not None:
    return merge_values(o_parts, lse_parts, wv_b, q_latent.dtype, merge=tuning.merge,
                        interpret=interpret)
  return merge_heads(o_parts, lse_parts, H, q_latent.dtype, merge=tuning.merge,
                     launch=merge_launch(P, B, H, C), interpret=interpret)
