"""ops/grouped.py: the grouped matmul (rows sorted by group, each against its group's weight)
against a float64 loop over the groups (the kernel sweep's oracle), on fresh random inputs.

On CPU the Pallas kernel runs in interpret mode; with a GPU the same tests run it compiled, plus
V2-Lite's expert shapes (marked gpu). Compiled for an H200 (marked aot) at V2-Lite's shapes, it
allocates no temporary, where XLA's ragged_dot copies x once per expert.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.kernel_sweep import grouped_oracle as oracle
from helpers import RTOL, compile_for_h200, rel_err
from mla_jax import ops
from mla_jax.ops import grouped

ON_GPU = jax.default_backend() == "gpu"


def _inputs(rng, M, G, N, K, dtype):
  x = jnp.asarray(rng.standard_normal((M, K)), dtype)
  w = jnp.asarray(rng.standard_normal((G, N, K)) / np.sqrt(K), dtype)
  return x, w


# (M, N, K, group sizes): a group over several tiles and one under a tile, empty groups, a
# negative size (empty), rows in no group (sizes summing under M), sizes summing past M, M not a
# multiple of the tile (the last tile's window moved back), one group.
CASES = [(40, 32, 48, [5, 0, 30]),
         (100, 64, 32, [70, 1, 0, 20]),
         (16, 16, 16, [16]),
         (64, 48, 64, [10, -3, 80, 0, 2]),
         (72, 32, 32, [0, 9, 0, 0, 40]),
         (48, 16, 32, [0, 0, 0])]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("M,N,K,sizes", CASES)
def test_grouped_matmul_equals_the_row_loop(rng, M, N, K, sizes, dtype):
  x, w = _inputs(rng, M, len(sizes), N, K, dtype)
  want = oracle(x, w, sizes)
  group_sizes = jnp.asarray(sizes, jnp.int32)
  for impl in ("pallas", "xla"):
    y = ops.grouped_matmul(x, w, group_sizes, impl=impl, interpret=impl == "pallas" and not ON_GPU)
    assert y.shape == (M, N) and y.dtype == dtype
    assert rel_err(y, want) < RTOL[dtype], impl
    rest = max(0, M - sum(max(n, 0) for n in sizes))
    assert not np.any(np.asarray(y)[M - rest:]), f"{impl}: rows in no group are 0"


def test_grouped_matmul_gives_out_dtype(rng):
  x, w = _inputs(rng, 32, 2, 16, 32, jnp.bfloat16)
  y = ops.grouped_matmul(x, w, jnp.asarray([20, 12]), impl="pallas", out_dtype=jnp.float32,
                         interpret=not ON_GPU)
  assert y.dtype == jnp.float32
  assert rel_err(y, oracle(x, w, [20, 12])) < RTOL[jnp.float32]


@pytest.mark.parametrize("M,block_m,sizes,tiles", [
    (10, 4, [3, 5], [(0, 0, 3), (1, 3, 4), (1, 7, 1), (2, 8, 2)]),
    (8, 4, [8, 0], [(0, 0, 4), (0, 4, 4)]),
    (8, 4, [-2, 20], [(1, 0, 4), (1, 4, 4)])])
def test_group_tiles_cut_groups_into_tiles_of_one_group(M, block_m, sizes, tiles):
  """(group, start, rows) of each tile in order; group G (= len(sizes)) holds the rows in no
  group; the slots past the last tile have no rows."""
  group, start, rows = (np.asarray(a) for a in grouped.group_tiles(jnp.asarray(sizes), M,
                                                                     block_m))
  assert len(rows) == -(-M // block_m) + len(sizes) + 1
  n = len(tiles)
  assert list(zip(group[:n], start[:n], rows[:n])) == tiles
  assert not np.any(rows[n:])


def test_grouped_matmul_refuses_bad_arguments(rng):
  x, w = _inputs(rng, 32, 2, 16, 32, jnp.float32)
  with pytest.raises(ValueError, match=r"x.shape=\(32, 16\).*expected x \[M,K\]"):
    ops.grouped_matmul(x[:, :16], w, jnp.asarray([1, 2]))
  with pytest.raises(ValueError, match=r"group_sizes.shape=\(3,\).*expected \[G\]=\[2\]"):
    ops.grouped_matmul(x, w, jnp.asarray([1, 2, 3]))
  with pytest.raises(ValueError, match="impl='cuda'"):
    ops.grouped_matmul(x, w, jnp.asarray([1, 2]), impl="cuda")
  with pytest.raises(ValueError, match="M=8 rows"):
    ops.grouped_matmul(x[:8], w, jnp.asarray([1, 2]), impl="pallas", interpret=True)
  with pytest.raises(ValueError, match="x.dtype=bfloat16, w.dtype=float32"):
    ops.grouped_matmul(x.astype(jnp.bfloat16), w, jnp.asarray([1, 2]), impl="pallas",
                       interpret=True)


def test_grouped_matmul_auto_runs_the_kernel_only_on_a_gpu(rng):
  """impl="auto" takes the kernel where it runs compiled (a GPU) and XLA elsewhere; shapes the
  kernel refuses go to XLA on a GPU too."""
  x, w = _inputs(rng, 32, 2, 16, 32, jnp.float32)
  text = jax.jit(lambda x, w, g: ops.grouped_matmul(x, w, g)).lower(
      x, w, jnp.asarray([3, 4])).as_text()
  assert ("mla_grouped_matmul" in text) == ON_GPU
  assert grouped.unsupported(x[:8], w) is not None


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(768, 1408, 2048), (768, 2048, 1408), (24576, 1408, 2048)])
def test_grouped_matmul_at_v2_lite_expert_shapes(rng, M, N, K):
  """64 experts, rows routed at random (a token's 6 experts), bf16: the compiled kernel."""
  x, w = _inputs(rng, M, 64, N, K, jnp.bfloat16)
  sizes = np.bincount(rng.integers(0, 64, M), minlength=64)
  y = ops.grouped_matmul(x, w, jnp.asarray(sizes, jnp.int32), impl="pallas")
  assert rel_err(y, oracle(x, w, sizes)) < RTOL[jnp.bfloat16]


@pytest.mark.aot
@pytest.mark.parametrize("M,N,K", [(768, 1408, 2048), (24576, 2048, 1408)])
def test_grouped_matmul_compiles_for_h200_without_temporaries(M, N, K):
  """V2-Lite's experts (64, bf16) at a 128- and a 4096-token prefill's rows: the kernel compiles
  for the H200 and allocates nothing beside its output (XLA's ragged_dot copies x once per
  expert: [M, 64, K])."""
  S = jax.ShapeDtypeStruct
  compiled = compile_for_h200(lambda x, w, g: ops.grouped_matmul(x, w, g, impl="pallas"),
                              S((M, K), jnp.bfloat16), S((64, N, K), jnp.bfloat16),
                              S((64,), jnp.int32))
  assert "mla_grouped_matmul" in compiled.as_text()
  assert compiled.memory_analysis().temp_size_in_bytes < 1 << 20
