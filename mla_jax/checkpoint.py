"""Loads transformers DeepseekV2/V3 safetensors checkpoints: one attention layer
(load_hf_attention) or the whole DeepseekV2 decoder (load_hf_model).

transformers keeps Linear weights as [out, in], and so do the module's (layers.Linear). kv_b_proj's
[H*(K+V), C] weight is split per head into wk_b [H,K,C] and wv_b [H,C,V] (attention.py). A MoE
layer's per-expert weights `mlp.experts.{e}.gate_proj.weight` [I,D] (likewise up_proj, and
down_proj [D,I]) are stacked into `mlp.experts.gate_proj` [E,I,D] (moe.Experts). Every other
module path is the checkpoint's name (model.py names its attributes after transformers').
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from mla_jax.attention import MLAttention
from mla_jax.config import MLAConfig, ModelConfig
from mla_jax.model import CausalLM


def load_hf_attention(path: str | os.PathLike, layer: int, *, mode: str = "absorbed",
                      dtype=jnp.float32, backend: str = "auto", weight_format: str | None = None,
                      gemv_lowering: str = "triton") -> MLAttention:
  """MLAttention for `model.layers.{layer}.self_attn.*` of the checkpoint directory `path`.

  `path` holds config.json and either model.safetensors or shards listed in
  model.safetensors.index.json; the path of one of those files in it works too. Parameters and
  compute use `dtype`; `weight_format` then converts wk_b and wv_b as MLAttention's argument of
  that name does (quantized from the checkpoint's values). `mode`, `backend` and
  `gemv_lowering` are MLAttention's.

  Layouts: HF's kv_b_proj.weight [H*(K+V), C] becomes wk_b [H,K,C] and wv_b [H,C,V]; every
  other Linear weight [out, in] is copied as it is (layers.Linear has the same layout). Raises
  ValueError naming a missing layer, a missing tensor or a tensor of the wrong shape.
  """
  path = _checkpoint_dir(path)
  cfg = MLAConfig.from_hf(path)
  if not 0 <= layer < cfg.num_layers:
    raise ValueError(f"layer={layer} is not in the checkpoint: it has {cfg.num_layers} layers")
  weights = _read_layer(path, f"model.layers.{layer}.self_attn.", _hf_shapes(cfg))
  params = _to_module_layout(cfg, weights)

  abstract = nnx.eval_shape(lambda: MLAttention(cfg, mode=mode, backend=backend, dtype=dtype,
                                                param_dtype=dtype, gemv_lowering=gemv_lowering,
                                                rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  for name, value in params.items():
    key = tuple(name.split("."))
    flat[key].set_value(jnp.asarray(value, dtype))  # replaces the abstract ShapeDtypeStruct
  attn = nnx.merge(graphdef, nnx.from_flat_state(flat))
  attn.kv_b_proj.set_weight_format(weight_format)
  return attn


def load_hf_model(path: str | os.PathLike, *, mode: str = "absorbed", backend: str = "auto",
                  dtype=jnp.bfloat16, weight_format: str | None = None,
                  moe_impl: str = "auto") -> CausalLM:
  """The whole DeepseekV2ForCausalLM of the checkpoint directory `path` as a model.CausalLM.

  `path` holds config.json (read by ModelConfig.from_hf) and either model.safetensors or shards
  listed in model.safetensors.index.json; the path of one of those files in it works too.
  Parameters and compute use `dtype`; `weight_format` (None, "bf16", "q8_0", "iq4_nl") then
  converts every Linear weight (CausalLM.set_weight_format).
  `mode` and `backend` are MLAttention's, `moe_impl` MoE's impl. With tie_word_embeddings,
  lm_head reuses model.embed_tokens.weight. Raises ValueError naming missing tensors or a tensor
  of the wrong shape.
  """
  path = _checkpoint_dir(path)
  cfg = ModelConfig.from_hf(path)
  files = _shard_files(path)
  shapes = _hf_model_shapes(cfg)
  _require(path, files, shapes)
  read = lambda name: _read(files, name, shapes[name])

  abstract = nnx.eval_shape(lambda: CausalLM(cfg, mode=mode, backend=backend, dtype=dtype,
                                             param_dtype=dtype, moe_impl=moe_impl,
                                             rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  for name, value in _model_params(cfg, read):
    key = tuple(int(part) if part.isdigit() else part for part in name.split("."))
    flat[key].set_value(jnp.asarray(value, dtype))  # replaces the abstract ShapeDtypeStruct
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  model.set_weight_format(weight_format)
  return model


_MLP_WEIGHTS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def _mlp_shapes(D: int, I: int) -> dict[str, tuple[int, int]]:
  return dict(zip(_MLP_WEIGHTS, [(I, D), (I, D), (D, I)]))


def _hf_model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name of a DeepseekV2ForCausalLM checkpoint that the model reads, and its shape."""
  D, V, I_moe = cfg.hidden_size, cfg.vocab_size, cfg.moe_intermediate_size
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  if not cfg.tie_word_embeddings:
    shapes["lm_head.weight"] = (V, D)
  for i in range(cfg.num_layers):
    layer = f"model.layers.{i}."
    shapes[layer + "input_layernorm.weight"] = (D,)
    shapes[layer + "post_attention_layernorm.weight"] = (D,)
    shapes.update({layer + "self_attn." + n: s for n, s in _hf_shapes(cfg).items()})
    if not cfg.is_moe_layer(i):
      dense = _mlp_shapes(D, cfg.intermediate_size)
      shapes.update({layer + "mlp." + n: s for n, s in dense.items()})
      continue
    shapes[layer + "mlp.gate.weight"] = (cfg.n_routed_experts, D)
    for e in range(cfg.n_routed_experts):
      shapes.update({f"{layer}mlp.experts.{e}.{n}": s for n, s in _mlp_shapes(D, I_moe).items()})
    if cfg.n_shared_experts:
      shapes.update({layer + "mlp.shared_experts." + n: s
                     for n, s in _mlp_shapes(D, cfg.n_shared_experts * I_moe).items()})
  return shapes


def _model_params(cfg: ModelConfig, read):
  """Yields (module parameter path, value) for every CausalLM parameter; read(hf_name) -> array.

  The rename table: paths are the checkpoint's names but for kv_b_proj (split per head) and the
  routed experts (stacked); lm_head copies the embedding when tied.
  """
  yield "model.embed_tokens.weight", read("model.embed_tokens.weight")
  yield "model.norm.weight", read("model.norm.weight")
  yield "lm_head.weight", read("model.embed_tokens.weight" if cfg.tie_word_embeddings
                               else "lm_head.weight")
  for i in range(cfg.num_layers):
    layer = f"model.layers.{i}."
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
      yield layer + name, read(layer + name)
    attention = {name: read(layer + "self_attn." + name) for name in _hf_shapes(cfg)}
    for name, value in _to_module_layout(cfg, attention).items():
      yield layer + "self_attn." + name, value
    if not cfg.is_moe_layer(i):
      for name in _MLP_WEIGHTS:
        yield layer + "mlp." + name, read(layer + "mlp." + name)
      continue
    yield layer + "mlp.gate.weight", read(layer + "mlp.gate.weight")
    for proj in ("gate_proj", "up_proj", "down_proj"):
      yield f"{layer}mlp.experts.{proj}", jnp.stack(
          [read(f"{layer}mlp.experts.{e}.{proj}.weight") for e in range(cfg.n_routed_experts)])
    if cfg.n_shared_experts:
      for name in _MLP_WEIGHTS:
        yield layer + "mlp.shared_experts." + name, read(layer + "mlp.shared_experts." + name)


def _hf_shapes(cfg: MLAConfig) -> dict[str, tuple[int, ...]]:
  D, H = cfg.hidden_size, cfg.num_heads
  shapes = {
      "kv_a_proj_with_mqa.weight": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D),
      "kv_a_layernorm.weight": (cfg.kv_lora_rank,),
      "kv_b_proj.weight": (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
      "o_proj.weight": (D, H * cfg.v_head_dim),
  }
  if cfg.q_lora_rank is None:
    shapes["q_proj.weight"] = (H * cfg.qk_head_dim, D)
  else:
    shapes["q_a_proj.weight"] = (cfg.q_lora_rank, D)
    shapes["q_a_layernorm.weight"] = (cfg.q_lora_rank,)
    shapes["q_b_proj.weight"] = (H * cfg.qk_head_dim, cfg.q_lora_rank)
  return shapes


def _to_module_layout(cfg: MLAConfig, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF names and layouts -> flat module parameter paths."""
  H, K, V, C = cfg.num_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  kv_b = w["kv_b_proj.weight"].reshape(H, K + V, C)
  params = {
      "kv_a_proj_with_mqa.weight": w["kv_a_proj_with_mqa.weight"],
      "kv_a_layernorm.weight": w["kv_a_layernorm.weight"],
      "kv_b_proj.wk_b": kv_b[:, :K, :],
      "kv_b_proj.wv_b": kv_b[:, K:, :].transpose(0, 2, 1),
      "o_proj.weight": w["o_proj.weight"],
  }
  if cfg.q_lora_rank is None:
    params["q_proj.weight"] = w["q_proj.weight"]
  else:
    params["q_a_proj.weight"] = w["q_a_proj.weight"]
    params["q_a_layernorm.weight"] = w["q_a_layernorm.weight"]
    params["q_b_proj.weight"] = w["q_b_proj.weight"]
  return params


def _checkpoint_dir(path: str | os.PathLike) -> str:
  """The checkpoint directory of `path`: the directory itself, or the directory of its
  config.json or of a safetensors file (or index) in it. Raises ValueError saying what to pass."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return path
  name = os.path.basename(path)
  if os.path.isfile(path) and (name == "config.json" or name.endswith(".safetensors")
                               or name == "model.safetensors.index.json"):
    return os.path.dirname(path) or "."
  raise ValueError(f"path={path!r}: expected a transformers checkpoint directory (config.json "
                   "with model.safetensors or model.safetensors.index.json and its shards), or "
                   "the path of one of those files in it")


def _shard_files(path: str) -> dict[str, str]:
  """Maps each tensor name to the safetensors file that holds it."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  single = os.path.join(path, "model.safetensors")
  if not os.path.isfile(single):
    raise ValueError(f"{path!r} has neither model.safetensors nor model.safetensors.index.json")
  with safe_open(single, framework="flax") as f:
    return {name: single for name in f.keys()}


def _read_layer(path, prefix, shapes) -> dict[str, np.ndarray]:
  """Reads prefix+name for every name in `shapes`, checking presence and shape."""
  files = _shard_files(os.fspath(path))
  _require(path, files, [prefix + name for name in shapes])
  return {name: np.asarray(_read(files, prefix + name, shape).astype(jnp.float32))
          for name, shape in shapes.items()}


def _require(path, files: dict[str, str], names):
  missing = [name for name in names if name not in files]
  if missing:
    raise ValueError(f"checkpoint {path!r} lacks {missing}")


def _read(files: dict[str, str], name: str, shape: tuple[int, ...]):
  """The tensor `name` (a jax array in the checkpoint's dtype), checked to have `shape`."""
  with safe_open(files[name], framework="flax") as f:
    tensor = f.get_tensor(name)
  if tuple(tensor.shape) != shape:
    raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {shape}")
  return tensor
