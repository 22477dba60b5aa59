"""What XLA compiles the kernels and the decode step to for an H200, read from the compiled HLO.

These tests are marked aot: on a machine without a GPU they compile for a compile-only H200
(helpers.compile_for_h200; `make test` runs them in a pass of their own), and on the H200 for
the attached GPU. Nothing runs: they check what compilation decides: that every Pallas kernel
lowers for the H200 and compiles into its program (XLA compiles the Triton kernels there, which
checks their shared memory against the H200's), which buffers the step writes in place, and how
many kernels a decode step launches.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import mla_jax
from experiments import decode_step
from mla_jax import quant
import ptxas
from helpers import compile_for_h200

ON_GPU = jax.default_backend() == "gpu"  # an attached GPU, not the compile-only one

# The stacks are built outside the H200's trace, where MLAttention warns that Pallas runs
# interpreted; their kernels are compiled for the H200 all the same.
pytestmark = [pytest.mark.aot, pytest.mark.filterwarnings("ignore:MLAttention.*interpret mode")]
V2_LITE = mla_jax.MLAConfig.deepseek_v2_lite()


def compile_step(num_layers, *, cache_dtype=jnp.bfloat16, S=16384, B=1, compiler_options=None,
                 **options):
  """The single decode step of a V2-Lite stack (bf16, caches donated; options go to
  AttentionStack), compiled for an H200; returns (compiled, caches as ShapeDtypeStructs)."""
  cfg = dataclasses.replace(V2_LITE, num_layers=num_layers)
  model = nnx.eval_shape(lambda: mla_jax.AttentionStack(
      cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **options))
  graphdef, state = nnx.split(model)
  caches = jax.eval_shape(lambda: model.init_cache(B, S, cache_dtype))
  compiled = compile_for_h200(lambda s, x, p, c: nnx.merge(graphdef, s)(x, p, c), state,
                              jax.ShapeDtypeStruct((B, 1, cfg.hidden_size), jnp.bfloat16),
                              jax.ShapeDtypeStruct((B, 1), jnp.int32), caches,
                              donate_argnums=(3,), compiler_options=compiler_options)
  return compiled, caches


def step_kernels(num_layers, **options):
  return decode_step.kernels(compile_step(num_layers, **options)[0].as_text())


@pytest.mark.parametrize("cache_dtype,S,B,per_layer", [(jnp.bfloat16, 128, 1, 6),
                                                       (jnp.bfloat16, 16384, 1, 7),
                                                       (jnp.int8, 16384, 1, 7),
                                                       (jnp.bfloat16, 16384, 8, 8)],
                         ids=["bf16_128", "bf16_16384", "int8_16384", "bf16_16384_B8"])
def test_v2_lite_absorbed_step_kernels_per_layer(cache_dtype, S, B, per_layer):
  """A V2-Lite layer adds 6 kernels to the compiled absorbed/pallas step at B=1, S=128 and 7
  at S=16384: the difference between a 2- and a 1-layer stack. Per layer 3 fusions (the
  residual add with the input norm's Σx²; q_proj and kv_a_proj_with_mqa as one row reduction
  over both weights, reading x times the norm's weight; o_proj) and 3 custom calls (the latent
  kernel with the rest of the input norm and the cache bookkeeping, the split, the merge with
  wv_b); at S=16384 the split's 129 pieces make the merge split C into 8 pieces
  (merge_triton.column_splits), whose products one more fusion sums. At B=8, 8: the two
  projections are one split-K GEMM and a fusion that sums its pieces (read in place by the
  latent kernel), o_proj a split-K GEMM whose sum fuses with the residual add, Σx² a fusion of
  its own, and the merge does not split C. An accidental split of a fusion shows here."""
  one = step_kernels(1, backend="pallas", cache_dtype=cache_dtype, S=S, B=B)
  two = step_kernels(2, backend="pallas", cache_dtype=cache_dtype, S=S, B=B)
  assert sum(two.values()) - sum(one.values()) <= per_layer, (one, two)
  assert two["custom-call"] - one["custom-call"] == 3, (one, two)


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.int8], ids=["bf16", "int8"])
@pytest.mark.parametrize("B", [1, 8, 64])
def test_v2_lite_absorbed_step_spills_no_registers(B, cache_dtype):
  """ptxas for the H200 keeps every kernel of the absorbed/pallas step (XLA's fusions, the
  Triton latent kernel and merge, the Mosaic split) in registers, but for one 4-byte word (at
  B=1 with the int8 cache, the latent kernel saves a predicate at its start and reloads it
  once, outside any loop: its SASS): a tile grown past the registers shows here."""
  usage = ptxas.usage(lambda options: compile_step(1, backend="pallas", cache_dtype=cache_dtype,
                                                    S=4096, B=B, compiler_options=options)[0])
  split = "mla_decode_split_kv_mgpu" + ("_int8" if cache_dtype == jnp.int8 else "")
  spilled = {name: u for name, u in usage.items() if u.spill_store_bytes > 4}
  assert "mla_latent_update" in usage and f"{split}_mosaic_gpu_kernel" in usage, sorted(usage)
  assert not spilled, spilled


@pytest.mark.parametrize("decode_lowering,split_target", [(None, "mosaic_gpu_v2"),
                                                           ("triton", "__gpu$xla.gpu.triton")])
def test_decode_lowering_picks_the_split_and_the_command_buffers(decode_lowering, split_target,
                                                                  tmp_path):
  """On the H200 the step's split runs Mosaic by default and Triton with decode_lowering="triton",
  in as many kernels (2 layers: 2 latent, 2 split, 2 merge custom calls). The Triton split is
  captured in XLA's command buffers (CUDA graphs): the whole step is one. The Mosaic split is
  captured on the H200 itself, but compiled for a compile-only device XLA launches it on its
  own, between command buffers (XLA's thunk sequence; docs/decode_step.md)."""
  compiled = compile_step(2, backend="pallas", decode_lowering=decode_lowering,
                          compiler_options={"xla_dump_to": str(tmp_path)})[0]
  targets = re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())
  assert len(targets) == 6 and targets.count(split_target) == (2 if decode_lowering is None else 6)
  thunks = next(tmp_path.glob("*thunk_sequence_after_thunk_passes.txt")).read_text()
  top_level = [line.split()[1] for line in thunks.splitlines() if re.match(r"\d+:", line)]
  if decode_lowering == "triton":
    assert top_level == ["kCommandBuffer"], top_level
  elif ON_GPU:
    assert "kCustomCall" not in top_level, top_level
  else:  # kernels, Mosaic, [graph], Mosaic, kernels
    assert top_level.count("kCustomCall") == 2 and top_level.count("kCommandBuffer") == 1


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.int8], ids=["bf16_cache", "int8_cache"])
def test_v2_lite_absorbed_step_aliases_the_whole_cache(cache_dtype):
  """Compiled for the H200 with the caches donated, the step writes every cache buffer in place:
  no cache-sized copy, and every cache byte aliased to an output."""
  compiled, caches = compile_step(2, backend="pallas", cache_dtype=cache_dtype)
  assert compiled.memory_analysis().alias_size_in_bytes >= sum(
      leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(caches))
  assert "copy" not in decode_step.kernels(compiled.as_text())


@pytest.mark.parametrize("mode,backend", [("absorbed", "pallas"), ("absorbed", "xla"),
                                          ("standard", "xla")])
def test_v2_lite_step_reads_q_and_kv_a_in_one_reduction(mode, backend):
  """At B=1 both modes read q_proj's and kv_a_proj_with_mqa's weights in one fusion a layer
  (layers.joint_product), and no fusion reads either alone: the standard and the absorbed
  step share their projections."""
  compiled, _ = compile_step(2, mode=mode, backend=backend, S=128)
  entry = compiled.as_text().split("ENTRY", 1)[1]
  fusions = [line for line in entry.splitlines() if " fusion(" in line]
  reads = lambda line, name: re.search(rf"%\S*___{name}____weight\S*", line.split("fusion(")[1])
  both = [f for f in fusions if reads(f, "q_proj") and reads(f, "kv_a_proj_with_mqa")]
  either = [f for f in fusions if reads(f, "q_proj") or reads(f, "kv_a_proj_with_mqa")]
  assert len(both) == len(either) == 2, either


def _decode_args(B, H, S, cache, C=512, R=64):
  spec = jax.ShapeDtypeStruct
  c_kv = (mla_jax.quant.Int8Rows(spec((B, S, C), jnp.int8), spec((B, S), jnp.float32))
          if cache == "int8" else spec((B, S, C), jnp.bfloat16))
  return (spec((B, H, C), jnp.bfloat16), spec((B, H, R), jnp.bfloat16), c_kv,
          spec((B, S, R), jnp.bfloat16), spec((B,), jnp.int32))


# (lowering, B, H, S, cache): the kernels that ops.mla_decode picks on the H200 (Mosaic: few
# heads, int8, many heads) and Triton, at V2-Lite's 16 and V3's 128 heads.
DECODE_CASES = [("mosaic", 1, 16, 16384, "bf16"), ("mosaic", 64, 16, 4096, "bf16"),
                ("mosaic", 1, 16, 16384, "int8"), ("mosaic", 64, 128, 4096, "bf16"),
                ("triton", 1, 16, 16384, "bf16"), ("triton", 8, 16, 16384, "int8"),
                ("triton", 64, 128, 4096, "bf16")]


def _compiled_decode(lowering, B, H, S, cache, V=None):
  """ops.mla_decode (impl "pallas") compiled for the H200, with wv_b [H,512,V] when V is given."""
  wv_b = [jax.ShapeDtypeStruct((H, 512, V), jnp.bfloat16)] if V else []
  return compile_for_h200(
      lambda *a: mla_jax.ops.mla_decode(*a[:5], sm_scale=0.1, impl="pallas", lowering=lowering,
                                        wv_b=(a[5:] or [None])[0]),
      *_decode_args(B, H, S, cache), *wv_b)


def _decode_kernels(lowering, B, H, S, cache, V=None):
  """The kernels of _compiled_decode's program."""
  return decode_step.kernels(_compiled_decode(lowering, B, H, S, cache, V).as_text())


@pytest.mark.parametrize("lowering,B,H,S,cache", DECODE_CASES,
                         ids=["-".join(map(str, c)) for c in DECODE_CASES])
@pytest.mark.parametrize("values", [False, True], ids=["latent", "wv_b"])
def test_decode_kernels_compile_for_h200(lowering, B, H, S, cache, values):
  """ops.mla_decode's Pallas kernels, and the merge (with wv_b or without), compile to the H200."""
  assert "custom-call" in _decode_kernels(lowering, B, H, S, cache, V=128 if values else None)


def _compiled_gemv(lowering, fmt, B, H, compiler_options=None):
  """ops.batched_gemv (impl "pallas") compiled for the H200 at wk_b's shape [H, 128, 512], in
  bf16 or quantized to fmt, reading x from the whole query [B, H, 128 + 64]."""
  K, N = 128, 512
  w = jax.ShapeDtypeStruct((H, K, N), jnp.bfloat16)
  if fmt != "bf16":
    w = jax.eval_shape(lambda w: mla_jax.quant.quantize(w, fmt), w)
  return compile_for_h200(
      lambda x, w: mla_jax.ops.batched_gemv(x, w, impl="pallas", lowering=lowering),
      jax.ShapeDtypeStruct((B, H, K + 64), jnp.bfloat16), w, compiler_options=compiler_options)


def _mosaic_calls(compiled) -> list[str]:
  """The Mosaic GPU custom calls of a compiled program's HLO, each with its backend config (the
  kernel's MLIR module, whose attributes and instructions appear as text)."""
  return [line for line in compiled.as_text().splitlines()
          if 'custom_call_target="mosaic_gpu_v2"' in line]


MOSAIC_DECODES = [case for case in DECODE_CASES if case[0] == "mosaic"]


@pytest.mark.parametrize("op,case", [("decode", c) for c in MOSAIC_DECODES] +
                         [("gemv", fmt) for fmt in ("bf16", "q8_0", "iq4_nl")],
                         ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else c)
def test_mosaic_kernels_wait_for_their_inputs_and_launch_early(op, case):
  """Every Mosaic kernel (the three splits, the GEMV) starts with griddepcontrol.wait, so Mosaic
  marks it as using programmatic dependent launch, and XLA may launch it while the kernel before
  it finishes (ops.mosaic.common.wait_for_inputs)."""
  compiled = (_compiled_decode(*case) if op == "decode"
              else _compiled_gemv("mosaic", case, B=1, H=16))
  calls = _mosaic_calls(compiled)
  assert calls and all("mosaic_gpu.uses_pdl" in c and "griddepcontrol.wait" in c for c in calls)


@pytest.mark.parametrize("V", [12, 96])
def test_merge_with_values_compiles_for_h200_at_any_value_width(V):
  """The merge with wv_b [H,C,V] compiles for a V that is not a power of two, which Triton's
  blocks must be (interpreted, on a CPU, any V ran): it projects onto blocks of V's largest
  power-of-two divisor."""
  assert "custom-call" in _decode_kernels("triton", 1, 16, 4096, "bf16", V=V)


@pytest.mark.parametrize("lowering", ["triton", "mosaic"])
@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "iq4_nl"])
@pytest.mark.parametrize("B,H", [(1, 16), (64, 128)])
def test_gemv_kernels_compile_for_h200(lowering, fmt, B, H):
  """ops.batched_gemv's kernels compile to the H200 for wk_b's shape [H, 128, 512]."""
  assert "custom-call" in decode_step.kernels(_compiled_gemv(lowering, fmt, B, H).as_text())


@pytest.mark.parametrize("lowering", ["triton", "mosaic"])
@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "iq4_nl"])
@pytest.mark.parametrize("B,H", [(1, 16), (64, 128)])
def test_gemv_kernels_spill_no_registers(lowering, fmt, B, H):
  """ptxas for the H200 keeps each GEMV kernel in registers without spills, the Mosaic ones
  whose quantized blocks are decoded in registers included (tests/ptxas.py)."""
  usage = ptxas.usage(lambda options: _compiled_gemv(lowering, fmt, B, H, options))
  kernel = "mla_batched_gemv" + ("_mgpu_mosaic_gpu_kernel" if lowering == "mosaic" else "")
  assert kernel in usage, sorted(usage)
  assert not {name: u for name, u in usage.items() if u.spill_store_bytes}, usage


@pytest.mark.parametrize("weight_format", ["bf16", "q8_0", "iq4_nl"])
@pytest.mark.parametrize("B", [1, 8])
def test_v2_lite_moe_decode_step_allocates_no_weight_sized_temporary(B, weight_format):
  """The decode step of a V2-Lite-shaped CausalLM (its dense first layer and a MoE layer)
  compiled for the H200 allocates under 8 MB of temporaries: no weight is copied or dequantized
  into memory before its product. The chosen experts' weights are read where they lie (one
  expert's projection is 5.8 MB in bf16; the gathered copies of gate_proj and up_proj took 69 MB
  at B=1 and, transposed, 554 MB at B=8), quantized weights are decoded in the fused GEMV's
  registers (XLA wrote q_proj's dequantized 12.6 MB out before its product), and at B=1 the
  dense layer's 10944-long down_proj rows are not padded (XLA's one-row dot padded them to 11008,
  a 45 MB copy). At B=8 in bf16 XLA's split-K GEMM still pads them, so there the dense layer is
  left out. Where XLA runs a GEMM on cuBLASLt (an attached GPU autotunes B=8's products there;
  the compile-only device does not), the temporaries also hold the library's workspace (32 MiB
  on an H100), which is not a copy of a weight and is left out of the bound."""
  dense = 0 if (B, weight_format) == (8, "bf16") else 1
  cfg = dataclasses.replace(mla_jax.ModelConfig.deepseek_v2_lite(), num_layers=2,
                            first_k_dense_replace=dense)

  compiled = _model_step_for_h200(cfg, weight_format, batch=B, max_len=4096,
                                  dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  temporaries = compiled.memory_analysis().temp_size_in_bytes
  assert temporaries - _gemm_workspace_bytes(compiled.as_text()) < 8 << 20


def _gemm_workspace_bytes(hlo_text: str) -> int:
  """The largest workspace (the s8 buffer a cuBLAS GEMM custom call returns beside its product)
  in compiled HLO; 0 if no GEMM runs on cuBLAS."""
  sizes = [int(size) for line in hlo_text.splitlines() if "__cublas$" in line
           for size in re.findall(r"s8\[(\d+)\]", line.split("custom-call(")[0])]
  return max(sizes, default=0)


def _model_step_for_h200(cfg, weight_format=None, *, batch=1, tokens=1, max_len=256,
                         cache_dtype=jnp.bfloat16, **model_kw):
  """A CausalLM of cfg (weights in weight_format) compiled for the H200: its step on [batch,
  tokens] ids over caches of max_len slots, the caches donated."""
  def build():
    lm = mla_jax.CausalLM(cfg, **model_kw, rngs=nnx.Rngs(0))
    lm.set_weight_format(weight_format)
    return lm

  lm = nnx.eval_shape(build)
  graphdef, state = nnx.split(lm)
  cache = jax.eval_shape(lambda: lm.init_cache(batch, max_len, cache_dtype))
  ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
  return compile_for_h200(lambda s, i, p, c: nnx.merge(graphdef, s)(i, p, c), state, ids, ids,
                          cache, donate_argnums=(3,))


def _moe_decode_kernels(num_layers, mode, weight_format=None, **model_kw):
  cfg = dataclasses.replace(mla_jax.ModelConfig.deepseek_v2_lite(), num_layers=num_layers,
                            first_k_dense_replace=0)
  compiled = _model_step_for_h200(cfg, weight_format, mode=mode, dtype=jnp.bfloat16,
                                  param_dtype=jnp.bfloat16, **model_kw)
  return sum(decode_step.kernels(compiled.as_text()).values())


@pytest.mark.parametrize("mode,per_layer", [("absorbed", 16), ("standard", 33)])
def test_v2_lite_moe_layer_decode_kernels(mode, per_layer):
  """A V2-Lite MoE decoder layer adds `per_layer` kernels to the compiled bf16 decode step at
  B=1 (a 2- against a 1-layer model). The MoE's share: Σx², the router's product, its softmax
  and top-k (one kernel, ops.softmax_top_k, which also divides the logits by the folded norm's
  rms), the chosen and the shared experts' gate and up products (two fusions), two SiLU
  fusions, the chosen and the shared experts' down products and the residual add: the
  post-attention norm folds into the products, and the shared experts' gate and up rows join
  the chosen experts' fusions (two kernels more without either), and XLA's softmax and sort
  would be a kernel more."""
  assert _moe_decode_kernels(2, mode) - _moe_decode_kernels(1, mode) == per_layer


@pytest.mark.parametrize("weight_format", ["q8_0", "iq4_nl"])
def test_v2_lite_quantized_moe_layer_decode_kernels(weight_format):
  """Quantized, a V2-Lite MoE decoder layer adds 19 kernels to the compiled absorbed step at B=1
  on the Pallas backend (a 2- against a 1-layer model): its 10 GEMV and Pallas launches and 9
  fusions. The chosen experts' GEMV reads the token's one row of x for all 6 experts and clamps
  their ids itself, and the router's kernel writes k ids, not a padded row: a copy of x, the
  clamp and the slice would be two XLA kernels more; the latent kernel and the merge decode
  the quantized wk_b and wv_b, which GEMVs would take two launches for."""
  kernels = [_moe_decode_kernels(n, "absorbed", weight_format, backend="pallas") for n in (1, 2)]
  assert kernels[1] - kernels[0] == 19


def test_v2_lite_moe_prefill_takes_no_copy_per_expert():
  """The prefill of 4096 tokens through a V2-Lite-shaped CausalLM (its dense first layer and a
  MoE layer, bf16) compiled for the H200 allocates under 2 GB of temporaries (0.77 GB when
  written): the MoE's grouped matmul is the Pallas kernel. XLA's ragged_dot, which it replaces
  on a GPU, copies the 24576 routed rows once per expert: 6.8 GB for gate_proj alone."""
  cfg = dataclasses.replace(mla_jax.ModelConfig.deepseek_v2_lite(), num_layers=2)
  compiled = _model_step_for_h200(cfg, tokens=4096, max_len=4096, dtype=jnp.bfloat16,
                                  param_dtype=jnp.bfloat16)
  assert compiled.as_text().count("mla_grouped_matmul") >= 3  # gate_proj, up_proj, down_proj
  assert compiled.memory_analysis().temp_size_in_bytes < 2 << 30


@pytest.mark.parametrize("weight_format,mosaic,triton", [("q8_0", 11, 0), ("iq4_nl", 3, 8)])
def test_v2_lite_quantized_decode_gemvs(weight_format, mosaic, triton):
  """Compiled for the H200, a 2-layer V2-Lite model (a dense layer, then a MoE layer) runs its
  quantized products on the GEMV kernel that ops.gemv.default_lowering picks: on Mosaic the MoE
  layer's chosen experts (gate_proj with up_proj, and down_proj) and lm_head in both formats,
  and in q8_0 every one-row Linear too (per layer q_proj with kv_a_proj_with_mqa, and o_proj;
  the dense MLP's and the shared experts' gate_proj with up_proj, and down_proj: 8 launches);
  on Triton, in iq4_nl, the Linears (the latent kernel and the merge decode wk_b and wv_b).
  Beside them, each layer's Mosaic split-KV decode. No launch makes ids for its weight heads: an
  iota of them would be an XLA kernel of its own at every launch."""
  cfg = dataclasses.replace(mla_jax.ModelConfig.deepseek_v2_lite(), num_layers=2,
                            first_k_dense_replace=1)

  compiled = _model_step_for_h200(cfg, weight_format, backend="pallas", dtype=jnp.bfloat16,
                                  param_dtype=jnp.bfloat16)
  calls = [line for line in compiled.as_text().splitlines() if "custom_call_target" in line]
  on_mosaic = [line for line in calls if 'custom_call_target="mosaic_gpu_v2"' in line]
  assert sum("mla_batched_gemv_mgpu" in line for line in on_mosaic) == mosaic
  assert sum("mla_decode_split_kv_mgpu" in line for line in on_mosaic) == 2
  on_triton = [line for line in calls if "xla.gpu.triton" in line]
  assert sum("mla_batched_gemv" in line for line in on_triton) == triton
  assert "wrapped_iota" not in compiled.as_text()  # an iota fusion of its own


# Small shapes of the kind the CPU tests run interpreted, where a kernel takes sizes that compiled
# Triton refuses (its blocks must be powers of two): a v_head_dim of 12 (quantized weights need
# o_proj's H·V inputs a multiple of 32, so they get 16), and kv_a_proj_with_mqa's 64 + 16 = 80
# outputs, no multiple of the quantized GEMV's 32-column blocks.
SMALL_MODEL = dataclasses.replace(
    mla_jax.ModelConfig.deepseek_v2_lite(), hidden_size=256, num_heads=2, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, num_layers=2, vocab_size=512,
    intermediate_size=256, moe_intermediate_size=256, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=2, first_k_dense_replace=1)


@pytest.mark.parametrize("weight_format,v_head_dim", [(None, 12), ("q8_0", 16), ("iq4_nl", 16)])
@pytest.mark.parametrize("mode", ["absorbed", "standard"])
def test_small_model_decode_step_compiles_for_h200(mode, weight_format, v_head_dim):
  """A CausalLM of small odd sizes (SMALL_MODEL) compiles its B=1 decode step for the H200 on
  the Pallas backend, float32 and quantized: what runs interpreted in CI also compiles."""
  cfg = dataclasses.replace(SMALL_MODEL, v_head_dim=v_head_dim)

  compiled = _model_step_for_h200(cfg, weight_format, max_len=64, cache_dtype=jnp.float32,
                                  mode=mode, backend="pallas")
  # a kernel runs in every mode: the router's top k, and the latent kernel or a GEMV
  kernels = decode_step.kernels(compiled.as_text())
  assert kernels["custom-call"] >= (1 if mode == "standard" and weight_format is None else 2)


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantize_takes_temporaries_under_twice_the_weights_size(fmt):
  """quantize of a MoE layer's stacked experts ([64, 2048, 1408] float32, 738 MB) compiled for
  the H200 needs under twice the weight's bytes of temporaries (a transposed copy of it and the
  outputs), working a chunk of block rows at a time. Unchunked, IQ4_NL took 213 bytes a weight
  (39 GB here, 7 GB for a [128, 512, 512] weight, which ran out of memory on the GPU)."""
  shape = (64, 2048, 1408)
  compiled = compile_for_h200(lambda w: quant.quantize(w, fmt),
                              jax.ShapeDtypeStruct(shape, jnp.float32))
  assert compiled.memory_analysis().temp_size_in_bytes < 2 * 4 * 64 * 2048 * 1408


@pytest.mark.parametrize("S", [128, 16384])
def test_v2_lite_layer_kernel_is_one_launch_a_layer(S):
  """With layer_kernel=True the B=1 step's attention half compiles to one Pallas call a layer
  (ops/decode_layer.py), and the zero fill of its barrier counter is all that XLA adds."""
  one = step_kernels(1, backend="pallas", S=S, layer_kernel=True)
  two = step_kernels(2, backend="pallas", S=S, layer_kernel=True)
  assert two["custom-call"] - one["custom-call"] == 1, (one, two)
  assert sum(two.values()) - sum(one.values()) <= 2, (one, two)
