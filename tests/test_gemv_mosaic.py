"""The Mosaic GPU batched GEMV (ops/gemv/mosaic.py).

Its numerics run compiled on a Hopper GPU (`gpu` tests over many shapes) and, in CI, in Mosaic
GPU's interpret mode on a few small ones. CI also checks that it lowers through Mosaic GPU for
CUDA (layouts, swizzles and shared memory are checked there), what it refuses, and the dispatch
rules of ops.gemv.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import R, RTOL, gemv_oracle, gemv_weights, rel_err
from mla_jax import quant
from mla_jax.ops import device, gemv
from mla_jax.ops.gemv import mosaic, triton

ON_GPU = jax.default_backend() == "gpu"
FORMATS = ["bf16", "q8_0", "iq4_nl"]


def _mosaic(x, w, interpret=False, **overrides):
  """The Mosaic kernel through the dispatcher, its default tuning with some fields overridden
  (warpgroups=None keeps the default). Given warpgroups or stages apply to the heads' whole
  contraction: split_k is then 1 unless given too."""
  plan = gemv.plan(x, w, impl="pallas", lowering="mosaic")
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if {"warpgroups", "stages"} & overrides.keys():
    overrides.setdefault("split_k", 1)
  return gemv.batched_gemv(x, w, impl="pallas", lowering="mosaic", interpret=interpret,
                           tuning=dataclasses.replace(plan.tuning, **overrides))


def _args(B, H, K, N, fmt, dtype=jnp.bfloat16):
  x = jax.ShapeDtypeStruct((B, H, K + R), dtype)
  if fmt == "bf16":
    return x, jax.ShapeDtypeStruct((H, K, N), dtype)
  qs = (H, K, N) if fmt == "q8_0" else (H, K // 2, N)
  return x, quant.QuantizedTensor(
      jax.ShapeDtypeStruct(qs, jnp.int8 if fmt == "q8_0" else jnp.uint8),
      jax.ShapeDtypeStruct((H, K // 32, N), jnp.float16), fmt)


@pytest.mark.parametrize("B,H,K,N,fmt,warpgroups", [
    (1, 128, 512, 128, "q8_0", None), (64, 128, 512, 128, "bf16", None),
    (8, 16, 128, 512, "q8_0", None), (128, 2, 256, 64, "bf16", 4), (3, 1, 64, 128, "q8_0", 1),
    (1, 128, 512, 128, "iq4_nl", None), (64, 128, 128, 512, "iq4_nl", None),
    (8, 2, 512, 64, "iq4_nl", 4)])
def test_kernel_lowers_for_cuda(B, H, K, N, fmt, warpgroups):
  """Mosaic GPU lowers the kernel on any host: a layout, swizzle or shared-memory error shows
  here (B=64: the largest x tiles and accumulators; B=128: two batch blocks)."""
  x, w = _args(B, H, K, N, fmt)
  lowered = jax.jit(lambda x, w: _mosaic(x, w, warpgroups=warpgroups)).trace(x, w).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("width", [136, 144, 160, 192])
def test_refusals_agree_with_the_lowering(width, fmt):
  """unsupported() accepts exactly the x row lengths that Mosaic GPU's TMA takes (x [1,2,width],
  K=128): a refusal that is too loose fails to compile on the GPU (a 144-column query did)."""
  x, w = _args(1, 2, 128, 64, fmt)
  x = jax.ShapeDtypeStruct((1, 2, width), x.dtype)
  accepted = mosaic.unsupported(x, w) is None
  tuning = dataclasses.replace(  # split-K reads a copy of x's first K columns
      mosaic.choose_tuning(1, 2, 128, 64, getattr(w, "fmt", None), num_sms=132), split_k=1)
  try:
    jax.jit(lambda x, w: mosaic.batched_gemv(x, w, tuning=tuning)).trace(x, w).lower(
        lowering_platforms=("cuda",))
    lowers = True
  except ValueError as err:
    assert "tiling" in str(err)
    lowers = False
  assert accepted == lowers


def test_what_it_refuses():
  x, w = _args(1, 2, 128, 64, "bf16")
  assert mosaic.unsupported(x, w) is None
  assert mosaic.unsupported(*_args(1, 2, 128, 64, "iq4_nl")) is None
  assert "multiple of 128" in mosaic.unsupported(*_args(1, 2, 64, 64, "iq4_nl"))
  assert "float32" in mosaic.unsupported(*_args(1, 2, 128, 64, "bf16", jnp.float32))
  assert "multiple of 64" in mosaic.unsupported(*_args(1, 2, 96, 64, "bf16"))
  assert "multiple of 64" in mosaic.unsupported(*_args(1, 2, 128, 32, "bf16"))
  assert "x's dtype" in mosaic.unsupported(x, jax.ShapeDtypeStruct(w.shape, jnp.float16))
  assert "multiple of 8" in mosaic.unsupported(*_args(12, 2, 128, 64, "bf16"))
  x144 = jax.ShapeDtypeStruct((1, 2, 144), jnp.bfloat16)  # K + 16 rope columns
  assert "multiple of 32" in mosaic.unsupported(x144, w)
  assert mosaic.unsupported(x144, _args(1, 2, 128, 64, "iq4_nl")[1]) is None
  with pytest.raises(ValueError, match="must divide"):
    jax.jit(lambda x, w: _mosaic(x, w, warpgroups=3)).trace(x, w)
  for fmt, K in (("bf16", 256), ("q8_0", 192), ("iq4_nl", 384)):  # whole chunks
    with pytest.raises(ValueError, match="split_k=2"):
      jax.jit(lambda x, w: _mosaic(x, w, split_k=2)).trace(*_args(1, 2, K, 64, fmt))
  for options in (dict(warpgroups=0), dict(stages=0), dict(split_k=0)):
    with pytest.raises(ValueError, match=">= 1"):
      mosaic.MosaicGemvTuning(**options)


@pytest.mark.skipif(ON_GPU, reason="interpret mode: the CPU's test (the gpu tests cover these)")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("B,H,K,N,warpgroups,dtype", [
    (1, 2, 128, 64, None, jnp.bfloat16), (3, 1, 256, 128, 2, jnp.float16),
    (16, 2, 128, 64, 1, jnp.bfloat16), (72, 1, 128, 64, None, jnp.bfloat16)])
def test_interpreted(B, H, K, N, warpgroups, dtype, fmt, rng):
  """Every path in interpret mode: the q8_0 conversion, the iq4_nl lookup (emulated byte
  permutes) and half-block products, per-block scales, split-K across warpgroups, TMA's zero
  rows past B (B=3, 72: a partial second batch block)."""
  _check(rng, B, H, K, N, fmt, dtype, warpgroups=warpgroups, interpret=True)


def test_dispatch_rules(rng, monkeypatch):
  x = jnp.asarray(rng.standard_normal((2, 2, 128 + R)), jnp.bfloat16)
  w = gemv_weights(rng, 2, 128, 64, "q8_0")
  run = lambda x, w, **k: gemv.batched_gemv(x, w, impl="pallas", interpret=not ON_GPU, **k)
  with pytest.raises(ValueError, match="lowering="):
    run(x, w, lowering="cuda")
  with pytest.raises(ValueError, match="TritonGemvTuning.*MosaicGemvTuning"):
    run(x, w, lowering="mosaic", tuning=triton.TritonGemvTuning())
  with pytest.raises(ValueError, match="multiple of 128"):
    run(x, gemv_weights(rng, 2, 64, 64, "iq4_nl"), lowering="mosaic")
  calls = []
  monkeypatch.setattr(mosaic, "batched_gemv", lambda *a, **k: calls.append(a) or a[0])
  run(x, w)
  assert not calls, "Triton is the default"
  run(x, w, lowering="mosaic")
  assert len(calls) == 1


def _check(rng, B, H, K, N, fmt, dtype=jnp.bfloat16, **options):
  """x is read in place from a [B, H, K+R] query; the output buffer is poisoned first."""
  q = jnp.asarray(rng.standard_normal((B, H, K + R)), dtype)
  w = gemv_weights(rng, H, K, N, fmt)
  if fmt == "bf16":
    w = w.astype(dtype)
  jnp.full((B, H, N), jnp.nan, dtype).block_until_ready()
  y = _mosaic(q, w, **options)
  assert y.shape == (B, H, N) and y.dtype == dtype
  assert rel_err(y, gemv_oracle(q[..., :K], w)) <= RTOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("B", [1, 3, 8, 64, 72])
@pytest.mark.parametrize("H,K,N", [(1, 128, 64), (16, 128, 512), (128, 512, 128)])
def test_matches_reference(H, K, N, B, dtype, fmt, rng):
  _check(rng, B, H, K, N, fmt, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("warpgroups,stages", [(1, 1), (1, 8), (2, 1), (4, 2), (8, 1)])
def test_warpgroups_and_stages(warpgroups, stages, fmt, rng):
  _check(rng, 5, 3, 1024, 128, fmt, warpgroups=warpgroups, stages=stages)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["q8_0", "iq4_nl"])
def test_large_values_and_scales(fmt, rng):
  """Scales spanning float16's range and large activations: the per-block scaling stays in
  float32 after the product."""
  H, K, N = 4, 256, 64
  w = jnp.asarray(rng.standard_normal((H, K, N)), jnp.float32)
  w = w * jnp.exp2(jnp.asarray(rng.integers(-12, 12, (H, K // 32, 1)), jnp.float32)
                   ).repeat(32, axis=1)
  qw = quant.quantize(w, fmt)
  x = jnp.asarray(rng.standard_normal((2, H, K)) * 300, jnp.bfloat16)
  y = _mosaic(x, qw)
  assert rel_err(y, gemv_oracle(x, qw)) <= RTOL[jnp.bfloat16]


@pytest.mark.parametrize("fmt", FORMATS)
def test_head_ids_gather_the_weight_heads(fmt, rng):
  """head_ids: head h's program reads w[head_ids[h]] of E=5 weight heads where it lies (repeats,
  and ids outside [0, E) clamped), against the oracle on the gathered weights; B=3 also takes
  TMA's zero rows past B. Compiled on a GPU, interpreted elsewhere."""
  B, H, E, K, N = 3, 4, 5, 256, 64
  x = jnp.asarray(rng.standard_normal((B, H, K + R)), jnp.bfloat16)
  w = gemv_weights(rng, E, K, N, fmt)
  w = w.astype(jnp.bfloat16) if fmt == "bf16" else w
  ids = jnp.asarray([4, -2, 4, E + 3], jnp.int32)
  y = gemv.batched_gemv(x, w, impl="pallas", lowering="mosaic", interpret=not ON_GPU,
                        head_ids=ids)
  chosen = jax.tree.map(lambda a: a[np.clip(np.asarray(ids), 0, E - 1)], w)
  assert y.shape == (B, H, N)
  assert rel_err(y, gemv_oracle(x[..., :K], chosen)) <= RTOL[jnp.bfloat16]
  row = x[:, 1:2]  # [B, 1, K + R]: one row that every head multiplies (a token's experts)
  y = gemv.batched_gemv(row, w, impl="pallas", lowering="mosaic", interpret=not ON_GPU,
                        head_ids=ids)
  assert y.shape == (B, H, N)
  assert rel_err(y, gemv_oracle(jnp.broadcast_to(row, x.shape)[..., :K], chosen)) <= RTOL[
      jnp.bfloat16]


@pytest.mark.parametrize("gathered", [False, True], ids=["heads", "gathered"])
@pytest.mark.parametrize("fmt", ["q8_0", "iq4_nl"])
def test_split_k_pieces_add_up_to_the_product(fmt, gathered, rng):
  """split_k=2: each head's two pieces of K run as programs of their own whose float32 partial
  products add up to each weight's product (a tuple of two weights; gathered heads with a
  repeated and a clamped id); B=3 also takes TMA's zero rows past B. Compiled on a GPU,
  interpreted elsewhere; Mosaic GPU lowers the float32 partials for CUDA on any host."""
  B, H, E, K = 3, 2, 3, 512
  x = jnp.asarray(rng.standard_normal((B, H, K)), jnp.bfloat16)
  ws = tuple(gemv_weights(rng, E if gathered else H, K, n, fmt) for n in (128, 64))
  ids = jnp.asarray([2, 7], jnp.int32) if gathered else None
  tuning = mosaic.MosaicGemvTuning(split_k=2)
  run = lambda x, ws, interpret=not ON_GPU: mosaic.batched_gemv(
      x, ws, tuning=tuning, interpret=interpret, head_ids=ids)
  ys = run(x, ws)
  chosen = ([jax.tree.map(lambda a: a[np.clip(np.asarray(ids), 0, E - 1)], w) for w in ws]
            if gathered else ws)
  for y, w in zip(ys, chosen, strict=True):
    assert y.shape == (B, H, w.shape[2]) and y.dtype == x.dtype
    assert rel_err(y, gemv_oracle(x, w)) <= RTOL[jnp.bfloat16]
  if gathered:  # x [B, 1, K]: one row that every head multiplies
    for y, w in zip(run(x[:, 1:], ws), chosen, strict=True):
      assert rel_err(y, gemv_oracle(jnp.broadcast_to(x[:, 1:], x.shape), w)) <= RTOL[
          jnp.bfloat16]
  lowered = jax.jit(functools.partial(run, interpret=False)).trace(x, ws).lower(
      lowering_platforms=("cuda",)).as_text()
  assert lowered.count("custom_call @mosaic_gpu") == 1


def test_choose_split_fills_the_sms_with_whole_chunks():
  """Up to 4 pieces of K, dividing its chunks, only where the grid fills under half the SMs."""
  assert mosaic.choose_split(57, 32, 132) == 4  # q_proj with kv_a: 3648 columns, q8_0
  assert mosaic.choose_split(32, 22, 132) == 2  # iq4_nl down_proj: 2816 rows, 22 chunks
  assert mosaic.choose_split(32, 11, 132) == 1
  assert mosaic.choose_split(66, 32, 132) == 1  # half the SMs
  tuning = mosaic.choose_tuning(1, 1, 2048, 3648, "q8_0", num_sms=132)
  assert tuning.split_k == 4 and tuning.warpgroups == 2  # 228 programs of 8 chunks
  assert mosaic.choose_tuning(1, 1, 2048, 3648, None, num_sms=132).split_k == 1


@pytest.mark.parametrize("gathered", [False, True], ids=["heads", "gathered"])
@pytest.mark.parametrize("fmt", ["q8_0", "iq4_nl"])
def test_several_weights_share_one_launch(fmt, gathered, rng):
  """A tuple of weights (128 and 64 columns) gives the tuple of their products from one Mosaic
  GPU kernel, each equal to its own oracle."""
  B, H, E, K = 1, 2, 3, 256
  x = jnp.asarray(rng.standard_normal((B, H, K)), jnp.bfloat16)
  ws = (gemv_weights(rng, E if gathered else H, K, 128, fmt),
        gemv_weights(rng, E if gathered else H, K, 64, fmt))
  ids = jnp.asarray([2, 0], jnp.int32) if gathered else None
  run = lambda x, ws, interpret=not ON_GPU: gemv.batched_gemv(
      x, ws, impl="pallas", lowering="mosaic", interpret=interpret, head_ids=ids)
  ys = run(x, ws)
  chosen = [jax.tree.map(lambda a: a[np.asarray(ids)], w) for w in ws] if gathered else ws
  for y, w in zip(ys, chosen, strict=True):
    assert y.shape == (B, H, w.shape[2])
    assert rel_err(y, gemv_oracle(x, w)) <= RTOL[jnp.bfloat16]
  lowered = jax.jit(functools.partial(run, interpret=False)).trace(x, ws).lower(
      lowering_platforms=("cuda",)).as_text()
  assert lowered.count("custom_call @mosaic_gpu") == 1


def test_default_lowering_runs_quantized_experts_on_mosaic(monkeypatch):
  """lowering=None: a MoE layer's chosen quantized experts (head_ids) run on Mosaic on a Hopper
  GPU, compiled, where its kernel takes them; everything else on Triton."""
  monkeypatch.setattr(device, "is_hopper", lambda: True)
  ids = jax.ShapeDtypeStruct((6,), jnp.int32)

  def kernel(fmt, K=2048, head_ids=ids, **kw):
    x, w = _args(1, 6, K, 1408, fmt)
    return gemv.plan(x, w if head_ids is None else _args(1, 64, K, 1408, fmt)[1],
                     impl="pallas", head_ids=head_ids, **kw).kernel

  assert kernel("q8_0") == kernel("iq4_nl") == "mosaic"
  assert kernel("bf16") == "triton"  # the float experts run on XLA's gather anyway
  assert kernel("q8_0", head_ids=None) == "triton"  # six heads, no ids: unmeasured
  assert kernel("q8_0", interpret=True) == "triton"
  assert kernel("iq4_nl", K=1088) == "triton"  # Mosaic's iq4_nl chunks are 128 rows
  assert kernel("q8_0", lowering="triton") == "triton"
  monkeypatch.setattr(device, "is_hopper", lambda: False)
  assert kernel("q8_0") == "triton"


def test_default_lowering_runs_one_row_linears_where_mosaic_was_faster(monkeypatch):
  """lowering=None, one row through a Linear (one head) on a Hopper GPU with 132 SMs: q8_0 on
  Mosaic; iq4_nl on Mosaic only as wide as lm_head (8 column tiles an SM); several rows, float
  weights and other GPUs on Triton."""
  monkeypatch.setattr(device, "is_hopper", lambda: True)
  monkeypatch.setattr(device, "num_sms", lambda: 132)

  def kernel(fmt, B=1, N=3648, K=2048):
    return gemv.plan(*_args(B, 1, K, N, fmt), impl="pallas").kernel

  wide = 8 * 64 * 132
  assert kernel("q8_0") == kernel("iq4_nl", N=102400) == kernel("iq4_nl", N=wide) == "mosaic"
  assert kernel("iq4_nl") == kernel("iq4_nl", N=wide - 64) == "triton"
  assert kernel("q8_0", B=2) == kernel("bf16") == kernel("q8_0", K=2080) == "triton"
  monkeypatch.setattr(device, "is_hopper", lambda: False)
  assert kernel("q8_0") == "triton"
