"""Context-parallel decode (mla_jax.parallel): the cases that need several devices run on a
4-device CPU mesh in a subprocess (tests/parallel_cases.py, whose docstring says why), the
multi-host recipe in two processes (tests/parallel_hosts.py); the rest, on a one-device mesh,
here."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AxisType

import mla_jax
from mla_jax import ops, parallel
from helpers import check_decode, decode_inputs, rel_err

ROOT = pathlib.Path(__file__).parent.parent
CASES = pathlib.Path(__file__).parent / "parallel_cases.py"
HOSTS = pathlib.Path(__file__).parent / "parallel_hosts.py"
SM_SCALE = 0.2


def test_cases_on_a_4_device_cpu_mesh():
  """tests/parallel_cases.py in its own process with 4 CPU devices; its output on failure."""
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                         str(CASES)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=1800, check=False)
  output = proc.stdout + proc.stderr
  if proc.returncode != 0:
    pytest.fail(f"{CASES.name} failed (exit {proc.returncode}):\n{output[-30000:]}",
                pytrace=False)
  assert " passed" in output and "skipped" not in output, output[-3000:]


def test_two_processes_decode_on_one_mesh(rng):
  """jax.distributed.initialize in two processes of 2 CPU devices each, one mesh over the 4:
  the module's prefill and decode on a cache sharded across both processes, as without a mesh."""
  with socket.socket() as s:  # a free port for the coordinator
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  seed = int(rng.integers(1 << 31))
  procs = [subprocess.Popen([sys.executable, str(HOSTS), str(i), str(port), str(seed)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  if any(proc.returncode for proc in procs):
    pytest.fail("\n".join(f"process {i} (exit {proc.returncode}):\n{out[-10000:]}"
                          for i, (proc, out) in enumerate(zip(procs, outputs))), pytrace=False)
  assert all(out.count("relative error") == 2 for out in outputs), outputs


def test_one_device_mesh_equals_unsharded(rng):
  """A one-device mesh (a single-GPU host, where the benchmark runs) gives the kernel's own
  result: the merge of one partial is the partial."""
  mesh = jax.make_mesh((1,), ("kv",), axis_types=(AxisType.Auto,))
  q_latent, q_rope, c_kv, k_rope = decode_inputs(rng, 3, 4, 24, "float32", C=64, R=16)
  lengths = jnp.array([0, 5, 24], jnp.int32)
  out, lse = parallel.mla_decode_sharded(q_latent, q_rope, c_kv, k_rope, lengths.tolist(),
                                         sm_scale=SM_SCALE, mesh=mesh, impl="xla")
  check_decode(out, lse, q_latent, q_rope, c_kv, k_rope, lengths, SM_SCALE, 2e-5)
  single, _ = ops.mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=SM_SCALE,
                             impl="xla")
  assert rel_err(out[1:], single[1:]) <= 2e-5


def test_bad_arguments_raise_value_error(rng):
  mesh = jax.make_mesh((1,), ("x",), axis_types=(AxisType.Auto,))
  args = (*decode_inputs(rng, 2, 4, 8, "float32", C=64, R=16), jnp.array([1, 8], jnp.int32))
  with pytest.raises(ValueError, match=r"axis='kv'.*\('x',\)"):
    parallel.mla_decode_sharded(*args, sm_scale=SM_SCALE, mesh=mesh)
  with pytest.raises(ValueError, match="combine='ring'"):
    parallel.mla_decode_sharded(*args, sm_scale=SM_SCALE, mesh=mesh, axis="x", combine="ring")
  with pytest.raises(ValueError, match="must differ"):
    parallel.mla_decode_sharded(*args, sm_scale=SM_SCALE, mesh=mesh, axis="x", batch_axis="x")
  cfg = mla_jax.MLAConfig.deepseek_v2_lite()
  with pytest.raises(ValueError, match="mesh"):
    mla_jax.MLAttention(cfg, mode="standard", mesh=mesh, mesh_axis="x", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="mesh"):
    mla_jax.init_cache(cfg, 1, 8, mode="standard", mesh=mesh, axis="x")
