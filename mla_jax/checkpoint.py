"""Loads one attention layer of a transformers DeepseekV2/V3 safetensors checkpoint.

transformers keeps Linear weights as [out, in], and so do the module's (layers.Linear). kv_b_proj's
[H*(K+V), C] weight is split per head into wk_b [H,K,C] and wv_b [H,C,V] (attention.py).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from mla_jax.attention import MLAttention
from mla_jax.config import MLAConfig


def load_hf_attention(path: str | os.PathLike, layer: int, *, mode: str = "absorbed",
                      dtype=jnp.float32, backend: str = "auto", weight_format: str | None = None,
                      gemv_lowering: str = "triton") -> MLAttention:
  """MLAttention for `model.layers.{layer}.self_attn.*` of the checkpoint directory `path`.

  `path` holds config.json and either model.safetensors or shards listed in
  model.safetensors.index.json. Parameters and compute use `dtype`; `weight_format` then
  converts wk_b and wv_b as MLAttention's argument of that name does (quantized from the
  checkpoint's values). `mode`, `backend` and `gemv_lowering` are MLAttention's.

  Layouts: HF's kv_b_proj.weight [H*(K+V), C] becomes wk_b [H,K,C] and wv_b [H,C,V]; every
  other Linear weight [out, in] is copied as it is (layers.Linear has the same layout). Raises ValueError naming
  a missing layer, a missing tensor or a tensor of the wrong shape.
  """
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
  missing = [prefix + name for name in shapes if prefix + name not in files]
  if missing:
    raise ValueError(f"checkpoint {path!r} lacks {missing}")
  out = {}
  for name, shape in shapes.items():
    with safe_open(files[prefix + name], framework="flax") as f:
      tensor = f.get_tensor(prefix + name)
    if tuple(tensor.shape) != shape:
      raise ValueError(f"{prefix + name}: shape {tuple(tensor.shape)}, expected {shape}")
    out[name] = np.asarray(tensor.astype(jnp.float32))
  return out
