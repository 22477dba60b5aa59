"""MLAConfig: the attention-relevant fields of a DeepSeek-V2/V3 transformers config; ModelConfig:
those of the whole DeepSeek-V2 decoder (vocabulary, dense MLP, MoE)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class MLAConfig:
  """Shapes and rope settings of one MLA layer (names follow transformers' DeepseekV2Config).

  Letters used across the project: D=hidden_size, H=num_heads, Q=q_lora_rank, C=kv_lora_rank,
  K=qk_nope_head_dim, R=qk_rope_head_dim, V=v_head_dim.
  """

  hidden_size: int = 2048
  num_heads: int = 16
  q_lora_rank: int | None = None
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  num_layers: int = 27
  rope_theta: float = 10000.0
  # YaRN (rope_scaling / rope_parameters); rope_factor=1.0 means plain RoPE.
  rope_factor: float = 40.0
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 0.707          # 0 means absent (transformers then uses mscale 1 for rope)
  mscale_all_dim: float = 0.707  # 0 means absent (no m² in the softmax scale)
  rms_norm_eps: float = 1e-6

  def __post_init__(self):
    positive = ("hidden_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "num_layers")
    for name in positive:
      if getattr(self, name) <= 0:
        raise ValueError(f"MLAConfig.{name} must be positive, got {getattr(self, name)}")
    if self.q_lora_rank is not None and self.q_lora_rank <= 0:
      raise ValueError(f"MLAConfig.q_lora_rank must be None or positive, got {self.q_lora_rank}")
    if self.qk_rope_head_dim % 2:
      raise ValueError(f"MLAConfig.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
    if self.rope_factor < 1.0:
      raise ValueError(f"MLAConfig.rope_factor must be >= 1, got {self.rope_factor}")

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def softmax_scale(self) -> float:
    """(K+R)^-0.5 · m², with m the YaRN mscale over all dims (DeepSeek-V2 modeling code).

    transformers releases before the fix multiplied by m only once; the golden vectors use m².
    """
    m = yarn_mscale(self.rope_factor, self.mscale_all_dim) if self.mscale_all_dim else 1.0
    return self.qk_head_dim ** -0.5 * m * m

  @classmethod
  def deepseek_v2_lite(cls) -> MLAConfig:
    """deepseek-ai/DeepSeek-V2-Lite config.json values."""
    return cls()

  @classmethod
  def deepseek_v3(cls) -> MLAConfig:
    """deepseek-ai/DeepSeek-V3 config.json values."""
    return cls(hidden_size=7168, num_heads=128, q_lora_rank=1536, num_layers=61,
               mscale=1.0, mscale_all_dim=1.0)

  @classmethod
  def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> MLAConfig:
    """Reads a transformers DeepseekV2/V3 config: a dict, a config.json path or its directory.

    Accepts the rope settings as `rope_scaling` (transformers 4.x) or `rope_parameters` (5.x).
    """
    hf = _read_hf_dict(path_or_dict)
    missing = [k for k in ("hidden_size", "num_attention_heads", "kv_lora_rank",
                           "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim") if k not in hf]
    if missing:
      raise ValueError(f"HF config lacks {missing}; is it a DeepseekV2/V3 config?")
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("yarn", "default"):
      raise ValueError(f"unsupported rope type {rope_type!r}; expected 'yarn' or 'default'")
    yarn = rope_type == "yarn"
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return cls(
        hidden_size=hf["hidden_size"],
        num_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        num_layers=hf.get("num_hidden_layers", 1),
        rope_theta=float(theta),
        rope_factor=float(rope.get("factor", 1.0)) if yarn else 1.0,
        original_max_position_embeddings=int(
            rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 4096))),
        beta_fast=float(rope.get("beta_fast") or 32.0),
        beta_slow=float(rope.get("beta_slow") or 1.0),
        mscale=float(rope.get("mscale") or 0.0) if yarn else 0.0,
        mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0) if yarn else 0.0,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN attention temperature: 0.1·mscale·ln(factor) + 1 (Peng et al. 2023, eq. 22)."""
  return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _read_hf_dict(path_or_dict) -> dict:
  if isinstance(path_or_dict, Mapping):
    return dict(path_or_dict)
  path = os.fspath(path_or_dict)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"no transformers config.json at {path!r}")
  with open(path) as f:
    return json.load(f)


TOPK_METHODS = ("greedy", "group_limited_greedy")


@dataclasses.dataclass(frozen=True)
class ModelConfig(MLAConfig):
  """The whole DeepSeek-V2 decoder: MLAConfig's attention fields plus the vocabulary, the dense
  MLP and the MoE (names follow transformers' DeepseekV2Config; defaults are DeepSeek-V2-Lite).

  Layer i has a MoE when n_routed_experts > 0 and i >= first_k_dense_replace, else a dense MLP
  of intermediate_size. A MoE routes each token to num_experts_per_tok of n_routed_experts
  experts of moe_intermediate_size and adds n_shared_experts always-on experts, run as one MLP
  of n_shared_experts·moe_intermediate_size (DeepSeekMoE, Dai et al. 2024, §3.2).
  """

  vocab_size: int = 102400
  intermediate_size: int = 10944
  moe_intermediate_size: int = 1408
  n_routed_experts: int = 64
  n_shared_experts: int = 2
  num_experts_per_tok: int = 6
  first_k_dense_replace: int = 1
  norm_topk_prob: bool = False
  routed_scaling_factor: float = 1.0
  topk_method: str = "greedy"
  n_group: int = 1
  topk_group: int = 1
  tie_word_embeddings: bool = False

  def __post_init__(self):
    super().__post_init__()
    for name in ("vocab_size", "intermediate_size", "moe_intermediate_size", "n_group",
                 "topk_group"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
    for name in ("n_routed_experts", "n_shared_experts", "first_k_dense_replace"):
      if getattr(self, name) < 0:
        raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)}")
    if self.topk_method not in TOPK_METHODS:
      raise ValueError(f"ModelConfig.topk_method={self.topk_method!r}; expected one of "
                       f"{TOPK_METHODS}")
    if self.n_routed_experts:
      self._check_routing()

  def _check_routing(self):
    E, G, k = self.n_routed_experts, self.n_group, self.num_experts_per_tok
    if not 1 <= k <= E:
      raise ValueError(f"ModelConfig.num_experts_per_tok={k}; expected 1..n_routed_experts={E}")
    if self.topk_method == "group_limited_greedy":
      if E % G:
        raise ValueError(f"ModelConfig.n_routed_experts={E} is not a multiple of n_group={G}")
      if not self.topk_group <= G or k > self.topk_group * (E // G):
        raise ValueError(f"ModelConfig.topk_group={self.topk_group}: expected <= n_group={G} "
                         f"and topk_group·n_routed_experts/n_group >= num_experts_per_tok={k}")

  def is_moe_layer(self, layer: int) -> bool:
    return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

  @classmethod
  def deepseek_v3(cls):
    raise ValueError("ModelConfig has no DeepSeek-V3 preset: V3's router (sigmoid scores, "
                     "noaux_tc with a score-correction bias) is not implemented")

  @classmethod
  def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> ModelConfig:
    """Reads a transformers DeepseekV2 config (a dict, a config.json path or its directory).

    Refuses what the decoder does not implement: an activation other than SiLU, a router other
    than softmax with greedy or group-limited top-k, MoE layers that skip (moe_layer_freq != 1).
    """
    hf = _read_hf_dict(path_or_dict)
    attention = dataclasses.asdict(MLAConfig.from_hf(hf))
    unsupported = {"hidden_act": ("silu",), "scoring_func": ("softmax",),
                   "moe_layer_freq": (1,), "topk_method": TOPK_METHODS}
    for name, allowed in unsupported.items():
      if name in hf and hf[name] not in allowed:
        raise ValueError(f"HF config {name}={hf[name]!r}; only {allowed} is implemented")
    missing = [k for k in ("vocab_size", "intermediate_size") if k not in hf]
    if missing:
      raise ValueError(f"HF config lacks {missing}; is it a DeepseekV2 config?")
    defaults = cls()
    get = lambda name: hf[name] if hf.get(name) is not None else getattr(defaults, name)
    return cls(
        **attention,
        vocab_size=hf["vocab_size"],
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=get("moe_intermediate_size"),
        n_routed_experts=hf.get("n_routed_experts") or 0,
        n_shared_experts=hf.get("n_shared_experts") or 0,
        num_experts_per_tok=get("num_experts_per_tok"),
        first_k_dense_replace=get("first_k_dense_replace"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        routed_scaling_factor=float(get("routed_scaling_factor")),
        topk_method=get("topk_method"),
        n_group=get("n_group"),
        topk_group=get("topk_group"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
