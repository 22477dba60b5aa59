"""The small layers around attention: a Linear in transformers' weight layout, RMSNorm, the token
embedding and the gated SiLU MLP."""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_jax import ops, quant
from mla_jax.ops import device, gemv, xla

WEIGHT_FORMATS = (None, "bf16", *quant.FORMATS)
# Rows (tokens) up to which a quantized Linear on a GPU runs the fused GEMV (quantized_gemv).
GEMV_MAX_ROWS = 64


class InitSignature:
  """Makes `inspect.signature(cls)` (and so help(cls)) show cls.__init__'s parameters.

  nnx's module metaclass defines `__call__(cls, *args, **kwargs)`, which inspect would report
  instead. Instances are left alone: the descriptor raises AttributeError for them, so
  inspect.signature(module) still shows __call__.
  """

  def __get__(self, instance, owner):
    if instance is not None:
      raise AttributeError("__signature__")
    signature = inspect.signature(owner.__init__)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


class Linear(nnx.Module):
  """y = x · weightᵀ, with weight [out_features, in_features]: transformers' (torch) layout.

  Why not nnx.Linear's kernel [in, out]: at decode, x is one row, and XLA GPU strength-reduces
  such a dot to a multiply and a reduction. Over [in, out] the reduction runs down the columns
  and XLA writes a weight-sized [in, out] product first, so the weight crosses HBM about three
  times; over [out, in] it is a row reduction that reads the weight once. On the lent H200
  (bf16, B=1, jax 0.11.2, in-jit loop) 2048 -> 3648 took 22.5 µs over [in, out] and 7.8 µs over
  [out, in]; a 27-layer V2-Lite attention step went from 1768 to 965 µs a token at S=128.
  It is also the checkpoint's own layout, so loading copies the weight as it is.

  On a CPU, a one-row product over a bfloat16 weight runs on two rows (ops.xla.weight_einsum),
  the form in which XLA CPU reads the weight as it lies instead of converting it to float32.

  set_weight_format stores the weight in bfloat16 or a GGML block format (to_weight_format).
  A quantized weight meets up to GEMV_MAX_ROWS rows (decode) on a GPU in the fused GEMV
  (quantized_gemv) where its kernel takes the shape (fused_gemv_takes); elsewhere it is
  dequantized when used.
  """

  __signature__ = InitSignature()

  def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    # nnx.Linear's default (LeCun normal over the fan-in), for the transposed layout.
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-1,
                                             out_axis=-2)
    self.weight = nnx.Param(init(rngs.params(), (out_features, in_features), param_dtype))
    self.dtype = dtype

  def set_weight_format(self, weight_format: str | None):
    # set_value, not `weight[...] =`: the new value has another dtype or type.
    self.weight.set_value(to_weight_format(self.weight.get_value(), weight_format))

  def __call__(self, x):
    """x [..., in_features] -> [..., out_features] in self.dtype."""
    w, x = self.weight.get_value(), x.astype(self.dtype)
    rows = math.prod(x.shape[:-1])
    if on_fused_gemv(x, (w,), rows):
      return quantized_gemv(x, w)
    return weight_product(x, as_array(w, self.dtype))


def weight_product(x, w):
  """x [..., in] · w [out, in] (an array) -> [..., out] in x's dtype: one row on a GPU as
  one_row_product, else XLA's einsum (ops.xla.weight_einsum)."""
  rows = math.prod(x.shape[:-1])
  if rows == 1 and device.is_gpu():
    return one_row_product(x, w)
  y = xla.weight_einsum("rd,nd->rn", x.reshape(rows, x.shape[-1]), w)
  return y.reshape(*x.shape[:-1], y.shape[-1])


def project(x, *linears: Linear) -> tuple:
  """(linear(x) for each of linears): Linears that read the same x (gate_proj and up_proj,
  q_proj and kv_a_proj_with_mqa) in one launch where they can: quantized weights of one format
  that the fused GEMV takes meet up to GEMV_MAX_ROWS rows on a GPU in one launch of it
  (quantized_gemv), and unquantized weights meet up to GEMV_MAX_ROWS rows on a GPU in one
  product (joint_product); otherwise each Linear runs as it would alone."""
  weights = tuple(linear.weight.get_value() for linear in linears)
  cast = x.astype(linears[0].dtype)
  if (len({linear.dtype for linear in linears}) == 1
      and on_fused_gemv(cast, weights, math.prod(x.shape[:-1]))):
    return quantized_gemv(cast, weights)
  joint = joint_linears(x, *linears)
  if joint is not None:
    ends = np.cumsum([w.shape[0] for w in weights])[:-1]
    return tuple(jnp.split(joint, ends, axis=-1))
  return tuple(linear(x) for linear in linears)


def joint_linears(x, *linears: Linear):
  """The linears' products of x side by side, [..., Σ out_features] in their dtype, as one
  joint_product, where on_joint_product takes them and they share a dtype; else None."""
  weights = tuple(linear.weight.get_value() for linear in linears)
  if len({linear.dtype for linear in linears}) == 1 and on_joint_product(x, weights):
    return joint_product(x.astype(linears[0].dtype), weights)
  return None


def on_joint_product(x, weights: tuple) -> bool:
  """Whether joint_product takes x and weights: up to GEMV_MAX_ROWS rows of x (decode) on a
  GPU, several weights of one in_features, none of them quantized."""
  return (device.is_gpu() and math.prod(x.shape[:-1]) <= GEMV_MAX_ROWS and len(weights) > 1
          and not any(isinstance(w, quant.QuantizedTensor) for w in weights)
          and len({w.shape[-1] for w in weights}) == 1)


def joint_product(x, weights: tuple):
  """x [..., in] · [w_1; w_2; ...]ᵀ for weights w_i [out_i, in] -> [..., Σ out_i] in x's
  dtype: the weights' products side by side, as one product over their concatenation. XLA
  fuses the concatenation into the product, which reads each weight where it lies (no
  concatenated copy is made). Compiled for an H200, q_proj and kv_a_proj_with_mqa take one
  row-reduction fusion at one row instead of two; at 2–64 rows XLA already ran the two as one
  split-K GEMM, whose sum is then one fusion instead of two slices."""
  return weight_product(x, jnp.concatenate([w.astype(x.dtype) for w in weights], axis=0))


def one_row_product(x, w):
  """x [..., in] (one row) · w [out, in] -> [..., out] in x's dtype, as the multiply and the row
  reduction (float32) that XLA GPU makes of a one-row dot anyway. Written so, long rows are not
  padded first: compiled for an H200, the dot padded V2-Lite's 10944-long down_proj rows to
  11008, a 45 MB copy of the weight every step."""
  return jnp.sum(w * x[..., None, :], axis=-1, dtype=jnp.float32).astype(x.dtype)


def quantized_gemv(x, w, *, interpret: bool = False):
  """x [..., in] · w, a quantized weight of to_weight_format ([in, out] blocks) -> [..., out] in
  x's dtype, through the project's fused GEMV (ops.batched_gemv, one head, on the kernel its
  dispatcher chooses), which decodes the blocks in registers. XLA GPU writes the dequantized
  weight out before its product instead (compiled for an H200: 12.6 MB for a 2048 -> 3072 q8_0
  or iq4_nl weight), so that a quantized weight would move more bytes than a bfloat16 one. w may
  be a tuple of such weights (one format and `in`): the tuple of products, from one launch.
  interpret: Pallas' interpret mode."""
  rows = x.reshape(-1, 1, x.shape[-1])
  heads = jax.tree.map(lambda a: a[None], w)  # a tuple stays a tuple of one-head weights
  y = ops.batched_gemv(rows, heads, impl="pallas", interpret=interpret)
  unflat = lambda y: y.reshape(*x.shape[:-1], y.shape[-1])
  return tuple(map(unflat, y)) if isinstance(w, tuple) else unflat(y)


def on_fused_gemv(x, weights: tuple, rows: int) -> bool:
  """Whether `rows` rows of x meet `weights` in one launch of the fused GEMV (quantized_gemv):
  on a GPU, at most GEMV_MAX_ROWS rows (decode), and quantized weights of one format that its
  kernel takes (fused_gemv_takes)."""
  return (device.is_gpu() and rows <= GEMV_MAX_ROWS
          and len({getattr(w, "fmt", None) for w in weights}) == 1
          and all(fused_gemv_takes(x, w) for w in weights))


def fused_gemv_takes(x, w) -> bool:
  """Whether quantized_gemv's kernel takes rows of x with w, a quantized weight of
  to_weight_format (its last two axes [in, out], any leading ones): the kernel needs both
  multiples of 32 (ops.gemv.unsupported). A weight it does not take is dequantized."""
  if not isinstance(w, quant.QuantizedTensor):
    return False
  heads = jax.eval_shape(lambda t: jax.tree.map(lambda a: a.reshape(-1, *a.shape[-2:]), t), w)
  return gemv.unsupported(x, heads, lowering="triton") is None


def to_weight_format(w, weight_format: str | None):
  """A weight [..., out, in] (an array, or what this returned) in weight_format: None keeps it,
  "bf16" casts it to bfloat16, "q8_0" / "iq4_nl" make a quant.QuantizedTensor of its transpose
  [..., in, out], so that GGML's blocks of 32 run along the contraction axis `in` (quant.py).
  Quantized weights start from their dequantized values, so converting twice only re-rounds."""
  if weight_format not in WEIGHT_FORMATS:
    raise ValueError(f"weight_format={weight_format!r}; expected one of {WEIGHT_FORMATS}")
  if weight_format is None:
    return w
  if weight_format == "bf16":
    return as_array(w, jnp.bfloat16)
  return quant.quantize(jnp.swapaxes(as_array(w, jnp.float32), -1, -2), weight_format)


def as_array(w, dtype):
  """A weight of to_weight_format as a dtype array [..., out, in]."""
  if isinstance(w, quant.QuantizedTensor):
    return jnp.swapaxes(quant.dequantize(w, dtype), -1, -2)
  return w.astype(dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis of x [..., dim] in float32, scaled by `weight` [dim]
  (transformers' DeepseekV2RMSNorm)."""

  __signature__ = InitSignature()

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x):
    """x [..., dim] -> the same shape and dtype."""
    xf = x.astype(jnp.float32) * self.inv_rms(x)
    return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)

  def inv_rms(self, x):
    """rsqrt(mean(x²) + eps) over the last axis of x [..., dim]: [..., 1] float32."""
    return jax.lax.rsqrt(self.sq_sum(x) / x.shape[-1] + self.eps)

  @staticmethod
  def sq_sum(x):
    """Σ x² over the last axis of x [..., dim], in float32: [..., 1]."""
    xf = x.astype(jnp.float32)
    return jnp.sum(xf * xf, axis=-1, keepdims=True)


class Embedding(nnx.Module):
  """Token embedding: weight [vocab_size, dim] (transformers' nn.Embedding), rows looked up."""

  __signature__ = InitSignature()

  def __init__(self, vocab_size: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.weight = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (vocab_size, dim),
                                                         param_dtype))
    self.dtype = dtype

  def __call__(self, ids):
    """ids [...] int in [0, vocab_size) -> [..., dim] in self.dtype; NaN rows for ids outside
    it, negative ones too (which indexing would take from the table's end)."""
    table = self.weight[...]
    ids = jnp.where(ids < 0, table.shape[0], ids)
    return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan).astype(self.dtype)


class MLP(nnx.Module):
  """The gated SiLU MLP of DeepSeek (and LLaMA): down_proj(silu(gate_proj(x)) · up_proj(x))
  (Shazeer 2020, "GLU Variants Improve Transformer", SwiGLU); transformers' DeepseekV2MLP."""

  __signature__ = InitSignature()

  def __init__(self, dim: int, intermediate_size: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.gate_proj = Linear(dim, intermediate_size, dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs)
    self.up_proj = Linear(dim, intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.down_proj = Linear(intermediate_size, dim, dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs)

  def __call__(self, x, *, scale=None):
    """x [..., dim] -> [..., dim]. scale [..., 1] or None multiplies the gate_proj and up_proj
    products before the SiLU (an RMSNorm folded into them, moe.MoE)."""
    return self.down_proj(gated(*project(x, self.gate_proj, self.up_proj), scale))


def gated(gate, up, scale=None):
  """silu(gate) · up, a gated MLP's hidden values; scale (or None) multiplies gate and up first
  (an RMSNorm folded into the products that made them)."""
  if scale is not None:
    gate, up = gate * scale.astype(gate.dtype), up * scale.astype(up.dtype)
  return jax.nn.silu(gate) * up
