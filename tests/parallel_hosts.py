"""One process of a two-process run of context-parallel decode: what the README's multi-host
example does, with processes on one machine standing in for hosts.

tests/test_parallel.py starts two of these: `python tests/parallel_hosts.py <process_id> <port>
<seed>`. Each joins the job through jax.distributed.initialize (CPU collectives over gloo), owns
2 CPU devices, builds the mesh over all 4 devices of the job, and runs a module's prefill and
decode steps (eager and jitted) on a cache sharded along S across both processes. Every process
compares the outputs with the same module without a mesh on its own CPU; it exits 0 when they
agree and prints the difference otherwise.
"""

import dataclasses
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType

import mla_jax

TINY = dataclasses.replace(mla_jax.MLAConfig.deepseek_v2_lite(), hidden_size=64, num_heads=4,
                           kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                           num_layers=1)
B, PREFILL, STEPS, S = 2, 6, 3, 16
TOL = 2e-5


def run(attn, x, positions, call):
  """Prefill, then single-token steps; the outputs [B,T,D] as one numpy array on every process."""
  y, cache = call(x[:, :PREFILL], positions[:, :PREFILL], attn.init_cache(B, S, jnp.float32))
  ys = [y]
  for t in range(PREFILL, PREFILL + STEPS):
    y, cache = call(x[:, t:t + 1], positions[:, t:t + 1], cache)
    ys.append(y)
  return np.concatenate([global_value(y) for y in ys], axis=1)


def global_value(y):
  """y as numpy: a process-local array as it is, an array over the whole mesh gathered."""
  return np.asarray(y) if y.is_fully_addressable else multihost_utils.process_allgather(y, tiled=True)


def main(process_id: int, port: int, seed: int) -> int:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id,
                             initialization_timeout=120)  # fail soon if the other one died
  mesh = jax.make_mesh((jax.device_count(),), ("kv",), axis_types=(AxisType.Auto,))
  rng = np.random.default_rng(seed)  # the same inputs on every process
  x = rng.standard_normal((B, PREFILL + STEPS, TINY.hidden_size)).astype(np.float32)
  positions = (np.arange(PREFILL + STEPS) + rng.integers(0, 5000, (B, 1))).astype(np.int32)
  sharded = mla_jax.MLAttention(TINY, backend="cpu", mesh=mesh, rngs=nnx.Rngs(0))
  plain = mla_jax.MLAttention(TINY, backend="cpu", rngs=nnx.Rngs(0))
  want = run(plain, jnp.asarray(x), jnp.asarray(positions), plain)
  failed = False
  for name, call in (("eager", sharded), ("jit_step", mla_jax.jit_step(sharded))):
    got = run(sharded, x, positions, call)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    print(f"process {process_id} of 2 ({jax.local_devices()} of {jax.devices()}): {name} "
          f"relative error {err:.2e}", flush=True)
    failed |= not err <= TOL
  jax.distributed.shutdown()
  return int(failed)


if __name__ == "__main__":
  sys.exit(main(*map(int, sys.argv[1:])))
