"""MLAttention(weight_format=...): quantized wk_b/wv_b give the output of the module run on the
dequantized weights, and absorbed decode with backend="pallas" hands the quantized blocks to its
kernels: wk_b to the latent kernel and wv_b to the merge of the split's pieces (both to the
fused Triton GEMV where those kernels do not take the shapes), or with gemv_lowering="mosaic"
both to the Mosaic GPU GEMV."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mla_jax
from helpers import RTOL, rel_err, run_chunks
from mla_jax import layers, quant
from mla_jax.ops import device, latent_update
from mla_jax.ops.gemv import mosaic as gemv_mosaic, triton as gemv_triton

# Contraction axes K (wk_b) and C (wv_b) hold whole GGML blocks of 32; N = C, V powers of two.
SMALL = dataclasses.replace(mla_jax.MLAConfig.deepseek_v2_lite(), hidden_size=64, num_heads=4,
                            kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                            v_head_dim=32, num_layers=1)
PREFILL, DECODE = 5, 3
# Dimensions the Mosaic GEMV takes: contractions of whole 128-row chunks (iq4_nl), N of 64, and
# query rows K+R of whole 32-column tiles.
MOSAIC = dataclasses.replace(SMALL, num_heads=2, kv_lora_rank=128, qk_nope_head_dim=128,
                             qk_rope_head_dim=32, v_head_dim=64)
ON_GPU = jax.default_backend() == "gpu"


def _run(attn, x, positions):
  """Prefill PREFILL tokens, then decode the rest one at a time; returns all outputs."""
  return run_chunks(attn, x, positions, [PREFILL] + [1] * (x.shape[1] - PREFILL))[0]


def _dequantized_twin(attn):
  """The same module with wk_b/wv_b replaced by the float32 arrays they stand for."""
  graphdef, state = nnx.split(attn)
  twin = nnx.merge(graphdef, state)
  for param in (twin.kv_b_proj.wk_b, twin.kv_b_proj.wv_b):
    param.set_value(quant.dequantize(param.get_value(), jnp.float32))
  return twin


@pytest.mark.parametrize("mode,backend", [("absorbed", "pallas"), ("absorbed", "xla"),
                                          ("standard", "xla")])
@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "iq4_nl"])
def test_quantized_module_matches_dequantized_weights(fmt, mode, backend, rng):
  attn = mla_jax.MLAttention(SMALL, mode=mode, backend=backend, weight_format=fmt,
                             rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  x = jnp.asarray(rng.standard_normal((2, PREFILL + DECODE, SMALL.hidden_size)), jnp.float32)
  positions = jnp.asarray(rng.integers(0, 500, (2, 1)) + np.arange(PREFILL + DECODE), jnp.int32)
  y = _run(attn, x, positions)
  y_ref = _run(_dequantized_twin(attn), x, positions)
  assert rel_err(y, y_ref) <= RTOL[jnp.float32] * 10


def _spy_on_kernels(monkeypatch):
  """A list that the Triton GEMV and the latent kernel append to when called: ("gemv", w, x's
  columns) and ("latent", wk_b)."""
  seen = []
  gemv_kernel, latent_kernel = gemv_triton.batched_gemv, latent_update.latent_update

  def gemv_spy(x, w, **kw):
    seen.append(("gemv", w, x.shape[-1]))
    return gemv_kernel(x, w, **kw)

  def latent_spy(*args, **kw):
    seen.append(("latent", args[5]))
    return latent_kernel(*args, **kw)

  monkeypatch.setattr(gemv_triton, "batched_gemv", gemv_spy)
  monkeypatch.setattr(latent_update, "latent_update", latent_spy)
  return seen


def test_pallas_decode_gets_the_quantized_weights(monkeypatch, rng):
  """...wk_b to the latent kernel and wv_b to the merge of the split's pieces, which decode
  their blocks themselves: no GEMV runs, and the merge kernel reads wv_b's packed values."""
  seen = _spy_on_kernels(monkeypatch)
  attn = mla_jax.MLAttention(SMALL, mode="absorbed", backend="pallas", weight_format="iq4_nl",
                             rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((1, 1, SMALL.hidden_size)), jnp.float32)
  cache = attn.init_cache(1, 4, jnp.float32)
  jaxpr = jax.make_jaxpr(lambda x: attn(x, jnp.zeros((1, 1), jnp.int32), cache))(x)
  _, wv_b = attn.kv_b_proj.weights()
  assert [name for name, *_ in seen] == ["latent"]
  assert isinstance(seen[0][1], quant.QuantizedTensor) and seen[0][1].fmt == "iq4_nl"
  merges = [eqn for eqn in jaxpr.jaxpr.eqns if "mla_decode_merge_values" in str(eqn.params)]
  assert len(merges) == 1
  assert any(v.aval.shape == wv_b.qs.shape and v.aval.dtype == jnp.uint8
             for v in merges[0].invars)


def test_weights_the_gemv_kernel_does_not_take_run_on_xla(monkeypatch, rng):
  """Where the step's kernels do not take the batch (65 rows, over the latent kernel's 64),
  wk_b and wv_b run on the GEMV: a wv_b of 16 values a head (the Triton GEMV needs N a multiple
  of 32) on XLA, dequantized, while wk_b stays on the Triton GEMV; the output is the dequantized
  module's."""
  seen = _spy_on_kernels(monkeypatch)
  cfg = dataclasses.replace(SMALL, num_heads=2, v_head_dim=16)  # o_proj: 2 * 16 inputs
  attn = mla_jax.MLAttention(cfg, mode="absorbed", backend="pallas", weight_format="q8_0",
                             rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  B = latent_update.MAX_BATCH + 1
  x = jnp.asarray(rng.standard_normal((B, PREFILL + 2, cfg.hidden_size)), jnp.float32)
  positions = jnp.asarray(np.arange(PREFILL + 2)[None].repeat(B, 0), jnp.int32)
  y = _run(attn, x, positions)
  assert seen and all(name == "gemv" and w.shape == (2, cfg.qk_nope_head_dim, cfg.kv_lora_rank)
                      for name, w, *_ in seen)
  assert rel_err(y, _run(_dequantized_twin(attn), x, positions)) <= RTOL[jnp.float32] * 10


def test_weight_formats_store_what_they_say():
  default = mla_jax.MLAttention(SMALL, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
  assert default.kv_b_proj.wk_b[...].dtype == jnp.float32
  for fmt, ratio in [("bf16", 2), ("q8_0", 4 * 32 / 34), ("iq4_nl", 4 * 32 / 18)]:
    attn = mla_jax.MLAttention(SMALL, weight_format=fmt, rngs=nnx.Rngs(0))
    for name in ("wk_b", "wv_b"):
      w, w0 = getattr(attn.kv_b_proj, name).get_value(), getattr(default.kv_b_proj, name)[...]
      assert w.shape == w0.shape
      assert w0.nbytes / w.nbytes == pytest.approx(ratio)
      assert rel_err(quant.dequantize(w), w0) <= 0.09


def test_bad_weight_format_raises():
  with pytest.raises(ValueError, match="weight_format"):
    mla_jax.MLAttention(SMALL, weight_format="q4_0", rngs=nnx.Rngs(0))


def test_quantized_module_jits(rng):
  attn = mla_jax.MLAttention(SMALL, mode="absorbed", backend="xla", weight_format="q8_0",
                             rngs=nnx.Rngs(0))
  step = mla_jax.jit_step(attn)
  x = jnp.asarray(rng.standard_normal((2, 1, SMALL.hidden_size)), jnp.float32)
  pos = jnp.asarray([[3], [7]], jnp.int32)
  y, _ = step(x, pos, attn.init_cache(2, 8, jnp.float32))
  y_eager, _ = attn(x, pos, attn.init_cache(2, 8, jnp.float32))
  assert rel_err(y, y_eager) <= RTOL[jnp.float32]
  assert jax.tree_util.tree_leaves(nnx.state(attn))  # quantized params are plain pytree leaves


@pytest.mark.skipif(ON_GPU and not device.is_hopper(), reason="Mosaic GPU: Hopper")
@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "iq4_nl"])
def test_mosaic_gemv_in_the_module(fmt, monkeypatch, rng):
  """Both decode products run on the Mosaic kernel (interpreted on a CPU), and the module gives
  what backend="xla" gives on the same weights."""
  calls = []
  kernel = gemv_mosaic.batched_gemv
  monkeypatch.setattr(gemv_mosaic, "batched_gemv", lambda x, w, **kw: calls.append(w.shape) or
                      kernel(x, w, **kw))
  seed = int(rng.integers(1 << 30))
  make = lambda backend, **kw: mla_jax.MLAttention(
      MOSAIC, mode="absorbed", backend=backend, dtype=jnp.bfloat16, weight_format=fmt,
      rngs=nnx.Rngs(seed), **kw)
  x = jnp.asarray(rng.standard_normal((2, PREFILL + 1, MOSAIC.hidden_size)), jnp.float32)
  positions = jnp.asarray(rng.integers(0, 500, (2, 1)) + np.arange(PREFILL + 1), jnp.int32)
  chunks = [PREFILL, 1]
  y = run_chunks(make("pallas", gemv_lowering="mosaic"), x, positions, chunks,
                 cache_dtype=jnp.bfloat16)[0]
  y_ref = run_chunks(make("xla"), x, positions, chunks, cache_dtype=jnp.bfloat16)[0]
  assert len(calls) == 2, "one call per product of the decode step"
  assert rel_err(y, y_ref) <= RTOL[jnp.bfloat16]


def test_gemv_lowering_is_checked():
  for options, match in [(dict(backend="pallas", gemv_lowering="cuda"), "gemv_lowering="),
                         (dict(backend="xla", gemv_lowering="mosaic"), "backend='pallas'"),
                         (dict(backend="pallas", gemv_lowering="mosaic"), "bfloat16 or float16")]:
    with pytest.raises(ValueError, match=match):
      mla_jax.MLAttention(MOSAIC, rngs=nnx.Rngs(0), **options)


def test_quantized_format_names_the_tensor_whose_dims_do_not_fit():
  cfg = dataclasses.replace(mla_jax.MLAConfig.deepseek_v2_lite(), hidden_size=64, num_heads=2,
                            kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=8,
                            v_head_dim=32, num_layers=1)
  with pytest.raises(ValueError, match=r"kv_b_proj\.wk_b.*K=16"):
    mla_jax.MLAttention(cfg, weight_format="q8_0", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("fmt", ["q8_0", "iq4_nl"])
@pytest.mark.parametrize("lead", [(1, 1), (3, 1)], ids=["B1", "B3"])
def test_quantized_linear_on_the_fused_gemv_equals_xla(fmt, lead, rng):
  """layers.quantized_gemv, a GPU's decode path for a quantized Linear (interpreted here), equals
  the Linear on XLA over the same weight; 96 output columns are no power of two."""
  linear = layers.Linear(64, 96, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  linear.set_weight_format(fmt)
  x = jnp.asarray(rng.standard_normal((*lead, 64)), jnp.float32)
  got = layers.quantized_gemv(x, linear.weight.get_value(), interpret=True)
  assert got.shape == (*lead, 96)
  assert rel_err(got, linear(x)) <= RTOL[jnp.float32]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_row_product_equals_the_dot(dtype, rng):
  """layers.one_row_product, a GPU Linear's product for one row, against the float64 product."""
  x = jnp.asarray(rng.standard_normal((1, 1, 10944)), dtype)
  w = jnp.asarray(rng.standard_normal((96, 10944)) / 100, dtype)
  y = layers.one_row_product(x, w)
  assert y.shape == (1, 1, 96) and y.dtype == dtype
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
  assert rel_err(y, want) <= RTOL[dtype]


@pytest.mark.parametrize("out_features,fused", [(96, True), (80, False)])
def test_quantized_linear_takes_the_fused_gemv_only_where_its_kernel_does(
    out_features, fused, monkeypatch, rng):
  """On a GPU, a quantized Linear decodes through the fused GEMV when its kernel takes the
  weight (both dims multiples of 32) and dequantizes it otherwise, instead of failing: here
  with a GPU pretended and the kernel interpreted."""
  linear = layers.Linear(64, out_features, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  linear.set_weight_format("q8_0")
  x = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.float32)
  want = linear(x)  # no GPU: the dequantized weight on XLA
  ran = []
  gemv = layers.quantized_gemv
  monkeypatch.setattr(device, "is_gpu", lambda: True)
  monkeypatch.setattr(layers, "quantized_gemv",
                      lambda x, w: ran.append(w.shape) or gemv(x, w, interpret=True))
  assert layers.fused_gemv_takes(x, linear.weight.get_value()) == fused
  assert rel_err(linear(x), want) <= RTOL[jnp.float32]
  assert ran == ([(64, out_features)] if fused else [])


@pytest.mark.parametrize("fmts,launches", [(("q8_0", "q8_0"), [2]), (("q8_0", "iq4_nl"), [1, 1]),
                                           (("q8_0", None), [1])])
def test_linears_that_read_one_x_share_a_launch(fmts, launches, monkeypatch, rng):
  """layers.project: on a GPU (pretended here, the kernel interpreted), quantized Linears of
  one format that read the same x run in one fused GEMV launch, with each Linear's own result;
  mixed formats fall back to one call per Linear."""
  key = int(rng.integers(1 << 30))
  linears = [layers.Linear(64, n, rngs=nnx.Rngs(key + n)) for n in (96, 32)]
  for linear, fmt in zip(linears, fmts):
    linear.set_weight_format(fmt)
  x = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.float32)
  want = [linear(x) for linear in linears]  # no GPU: the dequantized weights on XLA
  ran = []
  gemv = layers.quantized_gemv
  monkeypatch.setattr(device, "is_gpu", lambda: True)
  monkeypatch.setattr(layers, "quantized_gemv", lambda x, w: ran.append(
      len(w) if isinstance(w, tuple) else 1) or gemv(x, w, interpret=True))
  ys = layers.project(x, *linears)
  assert ran == launches
  for y, w in zip(ys, want, strict=True):
    assert y.shape == w.shape and rel_err(y, w) <= RTOL[jnp.float32]



@pytest.mark.parametrize("rows,fmt,joint", [(1, None, True), (1, "bf16", True), (8, None, True),
                                            (65, None, False), (1, "q8_0", False)])
def test_linears_that_read_decode_rows_share_a_product(rows, fmt, joint, monkeypatch, rng):
  """layers.project: on a GPU (pretended here), unquantized Linears that read up to
  GEMV_MAX_ROWS rows of x run as one product over their weights side by side
  (layers.joint_product), each with its own result; more rows (a prefill), or quantized
  weights, do not."""
  key = int(rng.integers(1 << 30))
  linears = [layers.Linear(64, n, rngs=nnx.Rngs(key + n)) for n in (96, 32, 48)]
  for linear in linears:
    linear.set_weight_format(fmt)
  x = jnp.asarray(rng.standard_normal((rows, 1, 64)), jnp.float32)
  want = [np.asarray(x, np.float64) @ np.asarray(layers.as_array(
      linear.weight.get_value(), jnp.float32), np.float64).T for linear in linears]
  ran = []
  product, gemv = layers.joint_product, layers.quantized_gemv
  monkeypatch.setattr(device, "is_gpu", lambda: True)
  monkeypatch.setattr(layers, "quantized_gemv", lambda x, w: gemv(x, w, interpret=True))
  monkeypatch.setattr(layers, "joint_product", lambda x, w: ran.append(len(w)) or product(x, w))
  ys = layers.project(x, *linears)
  assert ran == ([3] if joint else [])
  for y, w in zip(ys, want, strict=True):
    assert y.shape == w.shape and rel_err(y, w) <= RTOL[jnp.float32]
