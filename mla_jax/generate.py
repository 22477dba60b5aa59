"""Decode loops: N decode steps inside one jit, the caches carried and donated.

One jitted call per token costs host dispatch (about 60 µs on the lent H200, more than a small
step takes on the GPU); a loop inside one jit pays it once. The caches are donated, so every step
writes its token in place (the loop's carry aliases the input buffers).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def decode_loop_fn(module: nnx.Module, num_steps: int, *,
                   next_input: Callable[[jax.Array], jax.Array] | None = None):
  """Returns run(x, positions, caches) -> (ys [B,num_steps,D], caches): num_steps decode steps
  of `module` inside one jit, the caches donated.

  module: an MLAttention, an AttentionStack, or anything with their calling convention
  `y, caches = module(x, positions, caches)`. x [B,1,D] and positions [B,1] are the first step's
  input; step t+1 gets next_input(y_t) (default: y_t itself, what an attention-only stack can
  feed back) at positions + 1, padding rows (position -1) staying padding.

  Like jit_step, run follows the module's current parameter values (the split state holds the
  module's own Variables) but not a Variable or submodule replaced by a new object. Inside jit
  the caches' overflow flags are not checked: call `cache.check()` on the returned caches.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps}; expected >= 1")
  graphdef, state = nnx.split(module)
  loop = functools.partial(_decode_loop, graphdef, num_steps=num_steps,
                           next_input=next_input or _identity)

  def run(x, positions, caches):
    if x.ndim != 3 or x.shape[1] != 1:
      raise ValueError(f"x.shape={tuple(x.shape)}; expected [B,1,D] (one token a row)")
    if positions.shape != x.shape[:2]:
      raise ValueError(f"positions.shape={tuple(positions.shape)}; expected [B,1]="
                       f"{tuple(x.shape[:2])}")
    return loop(state, x, positions, caches)

  return run


def decode_loop(module: nnx.Module, x, positions, caches, num_steps: int, *,
                next_input: Callable[[jax.Array], jax.Array] | None = None):
  """`decode_loop_fn(module, num_steps, next_input=next_input)(x, positions, caches)`: one
  call. Build the function once with decode_loop_fn to run the loop many times."""
  return decode_loop_fn(module, num_steps, next_input=next_input)(x, positions, caches)


def _identity(y):
  return y


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("num_steps", "next_input"),
                   donate_argnames=("caches",))
def _decode_loop(graphdef, state, x, positions, caches, *, num_steps, next_input):
  module = nnx.merge(graphdef, state)

  def step(carry, _):
    x, positions, caches = carry
    y, caches = module(x, positions, caches)
    positions = jnp.where(positions >= 0, positions + 1, positions)
    return (next_input(y).astype(x.dtype), positions, caches), y[:, 0]

  (_, _, caches), ys = jax.lax.scan(step, (x, positions, caches), None, length=num_steps)
  return jnp.moveaxis(ys, 0, 1), caches
