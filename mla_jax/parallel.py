"""Context-parallel absorbed decode: the latent cache split along the sequence over a device mesh.

MLA keeps one latent cache row per token, shared by every head (DeepSeek-V2 §2.1 absorption makes
decode multi-query), so splitting the heads over devices would put the whole cache on each of
them; splitting the sequence divides it. This is FlashDecoding's split-KV (Dao et al. 2023) with
devices as the pieces: device d of mesh axis `axis` holds slots [d·S_d, (d+1)·S_d) of every row
(S_d = S / axis size), runs ops.mla_decode over them with its own lengths
clip(lengths − d·S_d, 0, S_d), and its (o_d, lse_d) are merged by the log-sum-exp merge of
ops/merge.py,

  lse = logsumexp_d(lse_d),   o = Σ_d exp(lse_d − lse) · o_d.

A device whose slots hold no valid entry of a row gives o_d = 0, lse_d = −inf (weight 0); a row
of length 0 gives o = 0, lse = −inf, as ops.mla_decode does.

The merge runs through collectives over `axis`, chosen by `combine`:
  "psum"    (default) pmax of lse_d; then one psum of exp(lse_d − max)·o_d and of exp(lse_d − max);
            two all-reduces, each device sends and receives O(B·H·C) floats whatever the axis size;
  "gather"  one all-gather of every device's (o_d, lse_d), then ops.merge_partials on each device;
            one collective, but each device receives (P−1)·B·H·(C+1) floats and merges P partials.
On a 4-device CPU mesh the two merged in about the same time at B·H = 16 and "psum" was faster
from B·H = 128 on (docs/parallel.md has the figures); which is faster between GPUs needs a
measurement on several GPUs.

A mesh axis named `batch_axis` ("batch"), if the mesh has one, shards B as well (data
parallel). Mesh axes must be of type Auto (`jax.make_mesh(..., axis_types=(AxisType.Auto,)*n)`):
the module runs eager jnp ops on the sharded cache, which Explicit axes refuse outside a
`jax.set_mesh` context. The same code runs over the devices of several hosts after
`jax.distributed.initialize()` (README).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mla_jax import ops
from mla_jax.ops.common import check_decode_args, check_lengths, resolve_impl

BATCH_AXIS = "batch"  # the mesh axis that shards B, where a mesh has it


def check_mesh(mesh, axis: str, batch_axis: str, B: int, S: int) -> str | None:
  """ValueError unless mesh has an Auto axis `axis` dividing S (and an Auto `batch_axis`
  dividing B, if it has one); returns the batch axis to shard B over, or None."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  if axis not in types:
    raise ValueError(f"axis={axis!r}: the mesh has no such axis; its axes are "
                     f"{tuple(mesh.axis_names)}")
  if axis == batch_axis:
    raise ValueError(f"axis={axis!r} and batch_axis={batch_axis!r} must differ")
  used = [axis] + ([batch_axis] if batch_axis in types else [])
  for name in used:
    if types[name] != AxisType.Auto:
      raise ValueError(f"mesh axis {name!r} is {types[name]}; build the mesh with "
                       "axis_types=(jax.sharding.AxisType.Auto, ...)")
  if S % mesh.shape[axis]:
    raise ValueError(f"S={S} is not divisible by the size {mesh.shape[axis]} of mesh axis "
                     f"{axis!r}: each device holds S / {mesh.shape[axis]} slots")
  if batch_axis not in types:
    return None
  if B % mesh.shape[batch_axis]:
    raise ValueError(f"B={B} is not divisible by the size {mesh.shape[batch_axis]} of mesh axis "
                     f"{batch_axis!r}")
  return batch_axis


def sequence_sharding(mesh, axis: str = "kv", batch_axis: str = BATCH_AXIS) -> NamedSharding:
  """How a cache buffer [B,S,...] is laid out: S over `axis`, B over `batch_axis` if the mesh
  has it (quant.Int8Rows: its values [B,S,C] and scales [B,S] alike)."""
  batch = batch_axis if batch_axis in mesh.axis_names else None
  return NamedSharding(mesh, P(batch, axis))


def mla_decode_sharded(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float, mesh,
                       axis: str = "kv", batch_axis: str = BATCH_AXIS, impl: str = "auto",
                       combine: str = "psum", **kernel_options):
  """ops.mla_decode with c_kv and k_rope sharded along S over mesh axis `axis`: out [B,H,C] in
  q_latent.dtype, lse [B,H] float32 (natural log), replicated over `axis`.

  q_latent [B,H,C], q_rope [B,H,R], c_kv [B,S,C] or quant.Int8Rows, k_rope [B,S,R], lengths [B]
  (valid entries of row b are [0, lengths[b]); the slots past it may hold anything, NaN included);
  queries and lengths are replicated (or sharded over `batch_axis` with B, if the mesh has it).
  Arguments placed otherwise are resharded first (`sequence_sharding` is the cache's layout).
  impl and kernel_options (lowering=, tuning=, interpret=) are each device's ops.mla_decode's;
  impl="auto" resolves for the default backend. combine: "psum" or "gather", how the devices'
  partials merge (the module docstring). Raises ValueError for shapes ops.mla_decode refuses,
  concrete lengths outside [0, S], an unknown combine, or a mesh that check_mesh refuses (no
  axis `axis`, an axis that is not Auto, S or B not divisible by the size of its axis).
  """
  if combine not in MERGES:
    raise ValueError(f"combine={combine!r}; expected one of {tuple(MERGES)}")
  lengths = jnp.asarray(lengths)  # an integer array-like, as ops.mla_decode takes
  B, _, S, _, _ = check_decode_args(q_latent, q_rope, c_kv, k_rope, lengths)
  check_lengths(lengths, S)
  batch = check_mesh(mesh, axis, batch_axis, B, S)
  return _sharded(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=float(sm_scale), mesh=mesh,
                  axis=axis, batch=batch, impl=resolve_impl(impl), combine=combine,
                  options=tuple(sorted(kernel_options.items())))


@functools.partial(jax.jit, static_argnames=("sm_scale", "mesh", "axis", "batch", "impl",
                                             "combine", "options"))
def _sharded(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale, mesh, axis, batch, impl,
             combine, options):
  merge = MERGES[combine]

  def local(q_latent, q_rope, c_kv, k_rope, lengths):
    S_d = k_rope.shape[1]
    local_lengths = jnp.clip(lengths - lax.axis_index(axis) * S_d, 0, S_d)
    o, lse = ops.mla_decode(q_latent, q_rope, c_kv, k_rope, local_lengths, sm_scale=sm_scale,
                            impl=impl, **dict(options))
    out, lse = merge(o, lse, axis)
    return out.astype(q_latent.dtype), lse

  rows, cache = P(batch), P(batch, axis)
  # check_vma=False: pallas_call refuses to trace under the check unless each kernel's out_shape
  # names the mesh axes it varies over, which is no concern of a kernel. The merge's collectives
  # leave out and lse equal on every device of `axis`, as out_specs says.
  return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, cache, cache, rows),
                       out_specs=(rows, rows), check_vma=False)(
                           q_latent, q_rope, c_kv, k_rope, lengths)


def psum_merge(o, lse, axis):
  """Inside shard_map: this device's o [B,H,C], lse [B,H] -> the merged out [B,H,C] float32 and
  lse [B,H], the same on every device of `axis`: pmax of lse, then one psum of the rescaled
  partials and their weights."""
  m = lax.pmax(lse, axis)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse - m)  # exp(-inf) = 0 for an empty shard
  l, o = lax.psum((w, w[..., None] * o.astype(jnp.float32)), axis)
  nonempty = l > 0
  l = jnp.where(nonempty, l, 1.0)
  return o / l[..., None], jnp.where(nonempty, m + jnp.log(l), -jnp.inf)


def gather_merge(o, lse, axis):
  """As psum_merge, but every device gathers all partials [P,B,H,C], [P,B,H] and merges them
  itself (ops.merge_partials)."""
  outs, lses = lax.all_gather((o, lse), axis)
  return ops.merge_partials(outs, lses)


MERGES = {"psum": psum_merge, "gather": gather_merge}  # mla_decode_sharded's `combine`
