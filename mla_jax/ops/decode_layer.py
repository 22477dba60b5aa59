"""The absorbed decode step of one attention layer, residual included, as one persistent kernel
(ops/persistent.py): x_out = x + o_proj(attention(rms_norm(x))) for one token a row, and the
latent cache updated in place.

At B=1 a layer's six kernels each pay a launch and a dependent load and store, about 25 µs a
layer against 6.9 µs of bytes on the H200 (docs/decode_step.md). Here the layer is one launch of
P programs (one an SM) in five phases, a grid-wide barrier between each two:

  project  q = q_proj(x·g)/rms(x) and kv = kv_a_proj_with_mqa(x·g)/rms(x), the input RMSNorm
           folded into the projections as in absorbed_step.py; each program reduces a run of
           contiguous rows of one of the two weights ([out, in], a row an output), summing
           Σx² of x (a few KB) alongside, into the [B, H·(K+R) + C+R] buffer `qkv`;
  latent   latent_update.py's jobs: q_latent = q_nope·wk_b (DeepSeek-V2 §2.1.2), a unit per
           (head, block of C); each head's q_rope rotated; and a unit per row for the kv norm,
           k_rope's rotation and the cache write, and lengths and overflow advanced
           (cache.advance);
  attend   split-KV attention (FlashDecoding, Dao et al. 2023) with FlashAttention-2's online
           softmax, a unit per (row, piece of the cache), every head at once on the tensor cores
           (the cache tile is both key and value); a partial (o_p, lse_p) per unit;
  values   the pieces merged by log-sum-exp (ops/merge.py) and multiplied by wv_b, a unit per
           (row, head, piece of C), each writing a float32 partial product;
  output   o_proj over the heads (the pieces of C summed, rounded to dtype) plus the residual,
           contiguous rows of the weight a program.

The latent and values phases' weight tiles (wk_b, wv_b) are loaded at the launch's start
(persistent.Phase.prefetch), so that they arrive while the projections run.

The arithmetic rounds where the module's path does (absorbed_step.py): the projections to dtype
before the division by rms(x), q_latent, q_rope and the normed kv to dtype, the merged heads to
dtype before wv_b, o_proj's output before the residual add. Padding rows (position -1) write
nothing into the cache, keep their length and return x unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mla_jax.cache import advance
from mla_jax.ops import latent_row
from mla_jax.ops.common import LN2, LOG2E, TRITON_MIN_DOT, is_pow2, next_pow2
from mla_jax.ops.decode.merge_triton import merged_columns, piece_weights
from mla_jax.ops.decode.triton import dot, softmax_step
from mla_jax.ops.persistent import Phase, persistent_call

MAX_BATCH = 8
_LATENT_BLOCK = 64      # columns of q_latent a latent unit computes
_VALUES_TILE = 16384    # partial values a values unit merges per step
_BLOCK_S = 32           # cache rows per attention tile
_MIN_PIECE_TILES = 1    # tiles in the shortest piece of the attend phase
_MAX_FMA_ROWS = 2       # rows up to which the projections multiply elementwise (_rows_times)

INPUTS = ("x", "positions", "input_norm", "q_proj", "kv_a_proj", "kv_norm", "inv_freq", "wk_b",
          "wv_b", "o_proj", "c_kv", "k_rope", "lengths", "overflow")
OUTPUTS = ("x_out", "c_kv", "k_rope", "lengths", "overflow", "qkv", "q_latent", "q_rope",
           "o_parts", "lse_parts", "value_parts")
_CACHE = ("c_kv", "k_rope", "lengths", "overflow")


@dataclasses.dataclass(frozen=True)
class LayerShape:
  """One layer's sizes (B rows, model width D, H heads of K nope and R rope dims, latent rank C,
  value dim V, S cache slots), its numerics (dtype, the norms' eps, rope and softmax scales) and
  the kernel's choices (plan)."""

  B: int
  D: int
  H: int
  K: int
  R: int
  C: int
  V: int
  S: int
  dtype: str
  input_eps: float
  kv_eps: float
  rope_scale: float
  sm_scale: float
  programs: int      # P, one an SM
  pieces: int        # pieces of the cache in the attend phase
  value_splits: int  # pieces of C in the values phase
  # Launch settings, the best of six timed on an H100 (docs/decode_step.md):
  step_bytes: int = 16384  # weight bytes a projection step loads
  num_warps: int = 8
  num_stages: int = 4      # Triton's software-pipelining depth (of the attention's tile loop)

  @property
  def q_width(self) -> int:
    return self.H * (self.K + self.R)

  @property
  def heads_pad(self) -> int:
    return max(TRITON_MIN_DOT, next_pow2(self.H))


def unsupported(B, D, H, K, R, C, V) -> str | None:
  """Why the kernel cannot take these sizes, or None if it can."""
  if B > MAX_BATCH:
    return f"B={B}: at most {MAX_BATCH} rows"
  if not all(is_pow2(n) for n in (K, R, C, V)) or min(K, R, C) < TRITON_MIN_DOT:
    return f"K={K}, R={R}, C={C}, V={V}: expected powers of two, K, R, C >= {TRITON_MIN_DOT}"
  if C % _LATENT_BLOCK or H > 64:
    return f"C={C}, H={H}: expected C a multiple of {_LATENT_BLOCK}, H <= 64"
  if D % 128 or (H * V) % 128:
    return f"D={D}, H·V={H * V}: expected multiples of 128 (the projections' column blocks)"
  return None


def plan(B, D, H, K, R, C, V, S, *, programs: int, **numerics) -> LayerShape:
  """The attend phase's pieces: enough that B·pieces units fill the programs, each at least
  _MIN_PIECE_TILES tiles; the values phase's pieces of C: B·H·splits units about as many as
  the programs (at most 8 pieces)."""
  tiles = pl.cdiv(S, _BLOCK_S)
  pieces = max(1, min(programs // B, tiles // _MIN_PIECE_TILES))
  pieces = pl.cdiv(tiles, pl.cdiv(tiles, pieces))  # no empty trailing piece
  splits = 1
  while splits < 8 and B * H * splits * 2 <= programs and C // (splits * 2) >= TRITON_MIN_DOT:
    splits *= 2
  return LayerShape(B=B, D=D, H=H, K=K, R=R, C=C, V=V, S=S, programs=programs, pieces=pieces,
                    value_splits=splits, **numerics)


def _f32(v):
  return v.astype(jnp.float32)


def _round(v, dtype):
  """v rounded to dtype, as float32."""
  return v.astype(dtype).astype(jnp.float32)


def _weight_runs(programs: int, sizes) -> list[tuple[int, int, int]]:
  """(first program, programs, rows a program) for weights of `sizes` rows sharing `programs`
  programs, each weight given programs in proportion to its rows (at least one)."""
  total, runs, first = sum(sizes), [], 0
  for i, n in enumerate(sizes):
    count = (programs - first if i == len(sizes) - 1
             else max(1, min(programs - first - 1, round(programs * n / total))))
    runs.append((first, count, pl.cdiv(n, count)))
    first += count
  return runs


def _rows_times(w_ref, first, count: int, xs, shape: LayerShape, side=None):
  """For each row b, [Σ_d w[first + i, d]·xs(b, d) for i < n] float32 (n: count rounded up to
  a power of two, at least TRITON_MIN_DOT for the dot form; rows past count or past w are 0),
  the mask of the rows that exist, and for each row b Σ side(b, cols) over the column blocks
  (side None: 0). xs(b, cols) and side(b, cols) give row b's columns `cols` (a pl.ds) as
  float32 [block]. The weight streams in column blocks of step_bytes, in one of two forms:
  - up to _MAX_FMA_ROWS rows, elementwise products in one [n, block] float32 tile a row, reduced
    once after the loop, so that no step waits on a reduction across the program's warps (at
    B=1 the faster form: 757 against 927 µs a token on an H100, docs/decode_step.md);
  - beyond, where those tiles no longer fit the registers (ptxas for sm_90a: 194 registers at
    B=2, 80 bytes spilled at B=4, 2352 at B=8), the rows as one [16, block] tile against the
    weight block on the tensor cores, whose [16, n] accumulator does not grow with B (B=8: 3381
    against 5466 µs a token)."""
  on_cores = shape.B > _MAX_FMA_ROWS
  n = max(TRITON_MIN_DOT, next_pow2(count)) if on_cores else next_pow2(count)
  mask = (jnp.arange(n) < count) & (first + jnp.arange(n) < w_ref.shape[0])
  width = w_ref.shape[1]
  block = max(128, min(next_pow2(width), shape.step_bytes // (n * w_ref.dtype.itemsize)))
  while width % block:
    block //= 2
  load = lambda cols: pltriton.load(w_ref.at[pl.ds(first, n), cols], mask=mask[:, None],
                                    other=0.0)
  products, init, finish = (_dot_form if on_cores else _fma_form)(shape.B, n, block)

  def step(i, carry):
    accs, sides = carry
    cols = pl.ds(pl.multiple_of(i * block, block), block)
    accs = products(accs, load(cols), [xs(b, cols) for b in range(shape.B)])
    if side is not None:
      sides = tuple(total + side(b, cols) for b, total in enumerate(sides))
    return accs, sides

  sides0 = tuple(jnp.zeros((block,), jnp.float32) for _ in range(shape.B))
  accs, sides = jax.lax.fori_loop(0, width // block, step, (init, sides0))
  return finish(accs), mask, [jnp.sum(t) for t in sides]


def _fma_form(B: int, n: int, block: int):
  """_rows_times' elementwise form: (products(accs, w, xs), initial accs, finish(accs) -> the
  B rows' [n] products)."""
  def products(accs, w, xs):
    return tuple(acc + _f32(w) * x[None, :] for acc, x in zip(accs, xs))

  init = tuple(jnp.zeros((n, block), jnp.float32) for _ in range(B))
  return products, init, lambda accs: [jnp.sum(acc, axis=1) for acc in accs]


def _dot_form(B: int, n: int, block: int):
  """_rows_times' tensor-core form, as _fma_form: row b of a [16, block] tile is xs[b]."""
  rows = jnp.arange(TRITON_MIN_DOT)[:, None]

  def products(acc, w, xs):
    x = sum(jnp.where(rows == b, x[None, :], 0.0) for b, x in enumerate(xs))
    return acc + dot(x.astype(w.dtype), w, 1)

  init = jnp.zeros((TRITON_MIN_DOT, n), jnp.float32)
  return products, init, lambda acc: [jnp.sum(jnp.where(rows == b, acc, 0.0), axis=0)
                                      for b in range(B)]


def _project(shape: LayerShape, p, ins, outs, fetched):
  dtype = jnp.dtype(shape.dtype)
  x_ref, g_ref = ins["x"], ins["input_norm"]

  def xs(b, cols):  # x·g in dtype, what the folded norm's projections read
    return _round(x_ref[jnp.int32(b), cols].astype(dtype) * g_ref[cols].astype(dtype), dtype)

  def squares(b, cols):  # x², summed into Σx² for the norm's 1/rms(x)
    return _f32(x_ref[jnp.int32(b), cols]) ** 2

  weights = (ins["q_proj"], ins["kv_a_proj"])
  runs = _weight_runs(shape.programs, [w.shape[0] for w in weights])
  for w_ref, column, (first_program, count, rows) in zip(weights, (0, shape.q_width), runs):
    @pl.when((p >= first_program) & (p < first_program + count))
    def _(w_ref=w_ref, column=column, first_program=first_program, rows=rows):
      first = (p - first_program) * rows
      accs, mask, ss = _rows_times(w_ref, first, rows, xs, shape, side=squares)
      for b, acc in enumerate(accs):
        inv_rms = jax.lax.rsqrt(ss[b] / shape.D + shape.input_eps)
        out = _round(_round(acc, dtype) * inv_rms, dtype)
        pltriton.store(outs["qkv"].at[jnp.int32(b), pl.ds(column + first, acc.shape[0])],
                       out.astype(outs["qkv"].dtype), mask=mask)


def _rope(v, pos, shape: LayerShape, freq_ref):
  """latent_row.rotate on v [R] float32, interleaved pairs, at integer position pos. The pairs
  are split and joined in registers (a reshape, a masked sum over the pair axis and a stack):
  Pallas' interpret mode has no strided loads or stores."""
  pairs = v.reshape(shape.R // 2, 2)
  even, odd = (jnp.sum(jnp.where(jnp.arange(2)[None, :] == i, pairs, 0.0), axis=1)
               for i in (0, 1))
  rotated = latent_row.rotate(even, odd, pos, freq_ref[...], shape.rope_scale)
  return jnp.stack(rotated, axis=-1).reshape(shape.R)


def _latent(shape: LayerShape, u, ins, outs, wk):
  """Units 0..H·C/64-1: a (head, column block) of q_latent, and the head's q_rope in its first
  block; units H·C/64 + b: row b's cache write, on programs of their own. wk: the unit's tile
  of wk_b (_latent_weights) if prefetched."""
  blocks = shape.C // _LATENT_BLOCK
  wk = _latent_weights(shape, u, ins) if wk is None else wk
  pl.when(u < shape.H * blocks)(lambda: _absorb(shape, u // blocks, u % blocks, wk, ins, outs))
  pl.when(u >= shape.H * blocks)(lambda: _write_row(shape, u - shape.H * blocks, ins, outs))


def _latent_weights(shape: LayerShape, u, ins):
  """wk_b[h, :, block j] [K, 64] of latent unit u = h·C/64 + j (the last one's past them)."""
  blocks = shape.C // _LATENT_BLOCK
  u = jnp.minimum(u, shape.H * blocks - 1)
  cols = pl.ds(pl.multiple_of(u % blocks * _LATENT_BLOCK, _LATENT_BLOCK), _LATENT_BLOCK)
  return ins["wk_b"][u // blocks, :, cols]


def _absorb(shape: LayerShape, h, j, wk, ins, outs):
  dtype = jnp.dtype(shape.dtype)
  K, R = shape.K, shape.R
  qkv = outs["qkv"]
  cols = pl.ds(pl.multiple_of(j * _LATENT_BLOCK, _LATENT_BLOCK), _LATENT_BLOCK)
  wk = _f32(wk)                                                               # [K, block]
  for b in map(jnp.int32, range(shape.B)):
    q_nope = _f32(qkv[b, pl.ds(h * (K + R), K)])
    outs["q_latent"][b, h, cols] = jnp.sum(q_nope[:, None] * wk, axis=0).astype(dtype)

  @pl.when(j == 0)
  def _rotate_query():
    for b in map(jnp.int32, range(shape.B)):
      q_rope = _f32(qkv[b, pl.ds(h * (K + R) + K, R)])
      outs["q_rope"][b, h, :] = _rope(q_rope, ins["positions"][b], shape,
                                      ins["inv_freq"]).astype(dtype)


def _write_row(shape: LayerShape, b, ins, outs):
  """Row b's token into its cache slot, lengths[b], then lengths and overflow advanced."""
  S, C, first = shape.S, shape.C, shape.q_width
  length, pos = outs["lengths"][b], ins["positions"][b]
  valid, ok, at = latent_row.slot(length, pos, S)
  c = _f32(outs["qkv"][b, pl.ds(first, C)])
  row = latent_row.kv_norm(c, ins["kv_norm"][...], shape.kv_eps, jnp.dtype(shape.dtype))
  pltriton.store(outs["c_kv"].at[b, pl.ds(at, 1), :], row.astype(outs["c_kv"].dtype)[None, :],
                 mask=jnp.full((1, C), ok))
  k_rope = _rope(_f32(outs["qkv"][b, pl.ds(first + C, shape.R)]), pos, shape, ins["inv_freq"])
  pltriton.store(outs["k_rope"].at[b, pl.ds(at, 1), :], k_rope.astype(outs["k_rope"].dtype)[None],
                 mask=jnp.full((1, shape.R), ok))
  outs["lengths"][b], outs["overflow"][b] = advance(length, outs["overflow"][b], valid, S)


def _attend(shape: LayerShape, u, ins, outs, fetched):
  """ops/decode/triton.py's split kernel for one (row, piece), every head in one block."""
  Hp, S = shape.heads_pad, shape.S
  b, piece = u // shape.pieces, u % shape.pieces
  heads = (jnp.arange(Hp) < shape.H)[:, None]
  q_latent = pltriton.load(outs["q_latent"].at[b, pl.ds(0, Hp), :], mask=heads, other=0.0)
  q_rope = pltriton.load(outs["q_rope"].at[b, pl.ds(0, Hp), :], mask=heads, other=0.0)
  cache_dtype = outs["c_kv"].dtype
  q_latent, q_rope = q_latent.astype(cache_dtype), q_rope.astype(cache_dtype)
  length = jnp.clip(outs["lengths"][b], 0, S)
  piece_rows = pl.cdiv(pl.cdiv(S, _BLOCK_S), shape.pieces) * _BLOCK_S
  start = piece * piece_rows
  end = jnp.minimum(length, start + piece_rows)
  scale_log2 = shape.sm_scale * LOG2E  # softmax in base 2: exp(x·s) = 2^(x·s·log2 e)

  def step(t, carry):
    first = start + t * _BLOCK_S
    valid = first + jnp.arange(_BLOCK_S) < end
    rows = pl.ds(first, _BLOCK_S)
    c = pltriton.load(outs["c_kv"].at[b, rows, :], mask=valid[:, None], other=0.0)
    k = pltriton.load(outs["k_rope"].at[b, rows, :], mask=valid[:, None], other=0.0)
    s = (dot(q_latent, c, 1) + dot(q_rope, k, 1)) * scale_log2
    return softmax_step(carry, jnp.where(valid[None, :], s, -jnp.inf), c, cache_dtype)

  carry = (jnp.zeros((Hp, shape.C), jnp.float32), jnp.full((Hp,), -jnp.inf, jnp.float32),
           jnp.zeros((Hp,), jnp.float32))
  acc, m_i, l_i = jax.lax.fori_loop(0, pl.cdiv(jnp.maximum(end - start, 0), _BLOCK_S), step,
                                    carry)
  nonempty = l_i > 0
  safe_l = jnp.where(nonempty, l_i, 1.0)
  outs["o_parts"][piece, b] = acc / safe_l[:, None]
  outs["lse_parts"][piece, b] = jnp.where(nonempty, (m_i + jnp.log2(safe_l)) * LN2, -jnp.inf)


def _values_unit(shape: LayerShape, u):
  """(b, h, g) of values unit u: row, head and piece of C."""
  splits = shape.value_splits
  return u // (shape.H * splits), (u // splits) % shape.H, u % splits


def _value_weights(shape: LayerShape, u, ins):
  """wv_b[h, piece g of C, :] of values unit u (the last unit's for u past them)."""
  _, h, g = _values_unit(shape, jnp.minimum(u, shape.B * shape.H * shape.value_splits - 1))
  width = shape.C // shape.value_splits
  return ins["wv_b"][h, pl.ds(pl.multiple_of(g * width, width), width), :]


def _values(shape: LayerShape, u, ins, outs, wv):
  """merge_triton.merge_values for one (row, head, piece of C); wv: the unit's wv_b tile
  (_value_weights) if prefetched."""
  dtype = jnp.dtype(shape.dtype)
  P, V = shape.pieces, shape.V
  b, h, g = _values_unit(shape, u)
  wv = _value_weights(shape, u, ins) if wv is None else wv
  width = shape.C // shape.value_splits
  cols = pl.ds(pl.multiple_of(g * width, width), width)
  m, l = piece_weights(outs["lse_parts"], b, h, P)
  merged = merged_columns(outs["lse_parts"], outs["o_parts"], b, h, cols, m, num_pieces=P,
                          chunk=min(next_pow2(P), max(1, _VALUES_TILE // width)))
  merged = _round(merged / jnp.where(l > 0, l, 1.0), dtype)
  product = jnp.sum(merged[:, None] * _f32(wv), axis=0)                               # [V]
  outs["value_parts"][g, b, pl.ds(h * V, V)] = product


def _output(shape: LayerShape, p, ins, outs, fetched):
  dtype = jnp.dtype(shape.dtype)
  parts = outs["value_parts"]

  def heads(b, cols):  # the attention's heads [H·V] in dtype: merge_values' pieces summed
    return _round(sum(parts[jnp.int32(g), jnp.int32(b), cols]
                      for g in range(shape.value_splits)), dtype)

  [(_, _, rows)] = _weight_runs(shape.programs, [shape.D])
  first = p * rows
  accs, mask, _ = _rows_times(ins["o_proj"], first, rows, heads, shape)
  for b, acc in enumerate(accs):
    cols = pl.ds(first, acc.shape[0])
    y = jnp.where(ins["positions"][jnp.int32(b)] >= 0, _round(acc, dtype), 0.0)
    x = _f32(pltriton.load(ins["x"].at[jnp.int32(b), cols], mask=mask, other=0.0))
    pltriton.store(outs["x_out"].at[jnp.int32(b), cols], (x + y).astype(dtype), mask=mask)


def _phases(shape: LayerShape):
  def named(fn):  # a body: fn(shape, u, ins, outs, fetched), the refs by name
    def run(u, in_refs, out_refs, fetched):
      fn(shape, u, dict(zip(INPUTS, in_refs)), dict(zip(OUTPUTS, out_refs)), fetched)
    return run

  def inputs(fn):  # a prefetch: fn(shape, u, ins)
    return lambda u, in_refs: fn(shape, u, dict(zip(INPUTS, in_refs)))

  return [Phase("project", shape.programs, named(_project)),
          Phase("latent", shape.H * (shape.C // _LATENT_BLOCK) + shape.B, named(_latent),
                inputs(_latent_weights)),
          Phase("attend", shape.B * shape.pieces, named(_attend)),
          Phase("values", shape.B * shape.H * shape.value_splits, named(_values),
                inputs(_value_weights)),
          Phase("output", shape.programs, named(_output))]


def decode_layer(x, positions, weights: dict, cache: dict, shape: LayerShape, *,
                 interpret: bool = False):
  """One launch: (x_out [B, D], cache) for x [B, D] in shape.dtype and positions [B] int32 (-1:
  padding). weights: input_norm [D], q_proj [H·(K+R), D], kv_a_proj [C+R, D], kv_norm [C],
  inv_freq [R/2] float32, wk_b [H, K, C], wv_b [H, C, V], o_proj [D, H·V] (arrays).
  cache: c_kv [B, S, C], k_rope [B, S, R], lengths [B] int32, overflow [B] int32, updated in
  place under jit when donated."""
  B, D, H, R, C, V, S = shape.B, shape.D, shape.H, shape.R, shape.C, shape.V, shape.S
  dtype = jnp.dtype(shape.dtype)
  operands = [x.astype(dtype), positions.astype(jnp.int32),
              *(weights[n] for n in INPUTS[2:10]), *(cache[n] for n in _CACHE)]
  scratch = [((B, shape.q_width + C + R), dtype), ((B, H, C), dtype), ((B, H, R), dtype),
             ((shape.pieces, B, shape.heads_pad, C), jnp.float32),
             ((shape.pieces, B, shape.heads_pad), jnp.float32),
             ((shape.value_splits, B, H * V), jnp.float32)]
  out_shape = [jax.ShapeDtypeStruct((B, D), dtype),
               *(jax.ShapeDtypeStruct(cache[n].shape, cache[n].dtype) for n in _CACHE),
               *(jax.ShapeDtypeStruct(s, d) for s, d in scratch)]
  aliases = {INPUTS.index(n): OUTPUTS.index(n) for n in _CACHE}
  outs = persistent_call(_phases(shape), operands, out_shape, aliases=aliases,
                         programs=shape.programs, name="mla_decode_layer",
                         num_warps=shape.num_warps, num_stages=shape.num_stages,
                         interpret=interpret)
  return outs[0], dict(zip(_CACHE, outs[1:5]))
