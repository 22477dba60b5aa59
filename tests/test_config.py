"""MLAConfig presets, transformers config parsing and the YaRN softmax scale."""

import dataclasses
import json
import math

import pytest

from mla_jax import MLAConfig
from helpers import GOLDEN_DIR

# deepseek-ai/DeepSeek-V2-Lite config.json (transformers 4.x spelling).
V2_LITE_HF = {
    "hidden_size": 2048, "num_attention_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "num_hidden_layers": 27,
    "rope_theta": 10000, "rms_norm_eps": 1e-6, "max_position_embeddings": 163840,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
}


def test_v2_lite_preset_has_hugging_face_values():
  cfg = MLAConfig.deepseek_v2_lite()
  assert (cfg.hidden_size, cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank) == (2048, 16, None, 512)
  assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.num_layers) == (128, 64,
                                                                                         128, 27)
  assert (cfg.rope_theta, cfg.rope_factor, cfg.original_max_position_embeddings) == (1e4, 40, 4096)
  assert (cfg.beta_fast, cfg.beta_slow, cfg.mscale, cfg.mscale_all_dim) == (32, 1, 0.707, 0.707)
  assert cfg.rms_norm_eps == 1e-6
  assert MLAConfig.from_hf(V2_LITE_HF) == cfg


def test_v3_preset():
  cfg = MLAConfig.deepseek_v3()
  assert (cfg.hidden_size, cfg.num_heads, cfg.q_lora_rank) == (7168, 128, 1536)
  assert (cfg.mscale, cfg.mscale_all_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim) == (1.0, 1.0,
                                                                                      512, 64)


def test_softmax_scale_includes_mscale_squared():
  # DESIGN.md: (K+R)^-0.5 · m², m = 0.1·0.707·ln(40) + 1, which is 0.1147214 for V2-Lite.
  assert MLAConfig.deepseek_v2_lite().softmax_scale == pytest.approx(0.1147214, abs=5e-8)
  m = 0.1 * 1.0 * math.log(40) + 1
  assert MLAConfig.deepseek_v3().softmax_scale == pytest.approx(192 ** -0.5 * m * m)


def test_from_hf_reads_both_rope_spellings(tmp_path):
  v5 = json.loads((GOLDEN_DIR / "config.json").read_text())
  assert "rope_parameters" in v5
  v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
  v4["rope_scaling"] = {k: v for k, v in v5["rope_parameters"].items() if k != "rope_theta"}
  v4["rope_scaling"]["type"] = v4["rope_scaling"].pop("rope_type")
  v4["rope_theta"] = v5["rope_parameters"]["rope_theta"]
  (tmp_path / "config.json").write_text(json.dumps(v4))
  from_v5, from_v4 = MLAConfig.from_hf(GOLDEN_DIR), MLAConfig.from_hf(tmp_path)
  assert from_v5 == from_v4
  assert (from_v5.num_heads, from_v5.kv_lora_rank, from_v5.qk_rope_head_dim) == (4, 32, 8)
  assert (from_v5.rope_factor, from_v5.mscale_all_dim) == (40.0, 0.707)


def test_plain_rope_config_has_no_yarn():
  cfg = MLAConfig.from_hf({k: v for k, v in V2_LITE_HF.items() if k != "rope_scaling"})
  assert cfg.rope_factor == 1.0
  assert cfg.softmax_scale == pytest.approx(192 ** -0.5)


@pytest.mark.parametrize("field,value", [("num_heads", 0), ("qk_rope_head_dim", 7),
                                         ("q_lora_rank", -1), ("rope_factor", 0.5)])
def test_invalid_config_raises(field, value):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(MLAConfig.deepseek_v2_lite(), **{field: value})


def test_from_hf_rejects_non_deepseek(tmp_path):
  with pytest.raises(ValueError, match="kv_lora_rank"):
    MLAConfig.from_hf({"hidden_size": 8, "num_attention_heads": 2})
  with pytest.raises(ValueError, match="config.json"):
    MLAConfig.from_hf(tmp_path)
