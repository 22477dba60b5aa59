"""The small layers around attention: a Linear in transformers' weight layout, and RMSNorm."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from flax import nnx


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
  """

  __signature__ = InitSignature()

  def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    # nnx.Linear's default (LeCun normal over the fan-in), for the transposed layout.
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-1,
                                             out_axis=-2)
    self.weight = nnx.Param(init(rngs.params(), (out_features, in_features), param_dtype))
    self.dtype = dtype

  def __call__(self, x):
    """x [..., in_features] -> [..., out_features] in self.dtype."""
    return jnp.einsum("...d,nd->...n", x.astype(self.dtype), self.weight[...].astype(self.dtype))


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis of x [..., dim] in float32, scaled by `weight` [dim]
  (transformers' DeepseekV2RMSNorm)."""

  __signature__ = InitSignature()

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x):
    """x [..., dim] -> the same shape and dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)
