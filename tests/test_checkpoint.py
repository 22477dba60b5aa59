"""load_hf_attention: single-file and sharded checkpoints, the q_lora variant, clear errors."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import mla_jax
from helpers import GOLDEN_DIR, rel_err

LAYER = "model.layers.0.self_attn."


def hf_tensors(attn):
  """Independent statement of transformers' layout: Linear weights [out, in]; kv_b_proj rows
  head-major, each head's K key rows then its V value rows, columns over C."""
  p = nnx.state(attn, nnx.Param)
  linear = lambda name: np.asarray(p[name]["weight"][...])
  wk_b = np.asarray(p["kv_b_proj"]["wk_b"][...])                        # [H,K,C]
  wv_b = np.asarray(p["kv_b_proj"]["wv_b"][...]).transpose(0, 2, 1)     # [H,V,C]
  out = {
      "kv_a_proj_with_mqa.weight": linear("kv_a_proj_with_mqa"),
      "kv_a_layernorm.weight": np.asarray(p["kv_a_layernorm"]["weight"][...]),
      "kv_b_proj.weight": np.concatenate([wk_b, wv_b], axis=1).reshape(-1, wk_b.shape[-1]),
      "o_proj.weight": linear("o_proj"),
  }
  if attn.cfg.q_lora_rank is None:
    out["q_proj.weight"] = linear("q_proj")
  else:
    out["q_a_proj.weight"] = linear("q_a_proj")
    out["q_a_layernorm.weight"] = np.asarray(p["q_a_layernorm"]["weight"][...])
    out["q_b_proj.weight"] = linear("q_b_proj")
  return {LAYER + k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def write_checkpoint(path, cfg, tensors, shards=1):
  path.mkdir(exist_ok=True)
  hf_cfg = json.loads((GOLDEN_DIR / "config.json").read_text())
  hf_cfg.update(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
                q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                v_head_dim=cfg.v_head_dim, num_hidden_layers=cfg.num_layers)
  (path / "config.json").write_text(json.dumps(hf_cfg))
  if shards == 1:
    save_file(tensors, str(path / "model.safetensors"))
    return
  names, weight_map = sorted(tensors), {}
  for i in range(shards):
    file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: tensors[n] for n in names[i::shards]}
    save_file(part, str(path / file))
    weight_map.update({n: file for n in part})
  (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def golden_cfg():
  return mla_jax.MLAConfig.from_hf(GOLDEN_DIR)


def outputs(attn, rng):
  x = jnp.asarray(rng.standard_normal((2, 6, attn.cfg.hidden_size)), jnp.float32)
  pos = jnp.asarray(np.arange(6)[None] + np.array([[0], [4500]]), jnp.int32)
  return attn(x, pos, attn.init_cache(2, 8, jnp.float32))[0]


def test_golden_checkpoint_round_trips_through_hf_layout():
  loaded = mla_jax.load_hf_attention(GOLDEN_DIR, 0)
  golden = load_file(str(GOLDEN_DIR / "model.safetensors"))
  for name, value in hf_tensors(loaded).items():
    np.testing.assert_array_equal(value, golden[name])


def test_weight_format_on_load():
  loaded = mla_jax.load_hf_attention(GOLDEN_DIR, 0)
  bf16 = mla_jax.load_hf_attention(GOLDEN_DIR, 0, weight_format="bf16")
  assert bf16.kv_b_proj.wk_b[...].dtype == bf16.kv_b_proj.wv_b[...].dtype == jnp.bfloat16
  assert bf16.q_proj.weight[...].dtype == jnp.float32
  err = rel_err(outputs(bf16, np.random.default_rng(1)), outputs(loaded, np.random.default_rng(1)))
  assert 0 < err < 2e-2
  # The tiny checkpoint's wk_b contracts over 16 rows: not whole GGML blocks of 32.
  with pytest.raises(ValueError, match="32"):
    mla_jax.load_hf_attention(GOLDEN_DIR, 0, weight_format="q8_0")


@pytest.mark.parametrize("shards", [1, 3])
def test_q_lora_checkpoint_loads(shards, tmp_path, rng):
  cfg = dataclasses.replace(golden_cfg(), q_lora_rank=24, num_layers=1)
  source = mla_jax.MLAttention(cfg, rngs=nnx.Rngs(3))
  write_checkpoint(tmp_path / "ckpt", cfg, hf_tensors(source), shards=shards)
  loaded = mla_jax.load_hf_attention(tmp_path / "ckpt", 0, mode="standard")
  assert loaded.cfg == cfg and loaded.mode == "standard"
  seed = int(rng.integers(2**31))
  assert rel_err(outputs(loaded, np.random.default_rng(seed)),
                 outputs(source, np.random.default_rng(seed))) < 2e-5


def test_sharded_golden_checkpoint_matches_single_file(tmp_path, rng):
  tensors = load_file(str(GOLDEN_DIR / "model.safetensors"))
  write_checkpoint(tmp_path / "sharded", golden_cfg(), tensors, shards=4)
  shutil.copy(GOLDEN_DIR / "config.json", tmp_path / "sharded" / "config.json")
  single = mla_jax.load_hf_attention(GOLDEN_DIR, 1)
  sharded = mla_jax.load_hf_attention(tmp_path / "sharded", 1)
  seed = int(rng.integers(2**31))
  assert rel_err(outputs(sharded, np.random.default_rng(seed)),
                 outputs(single, np.random.default_rng(seed))) == 0.0


def test_bfloat16_load():
  attn = mla_jax.load_hf_attention(GOLDEN_DIR, 0, dtype=jnp.bfloat16)
  assert attn.o_proj.weight[...].dtype == jnp.bfloat16


def test_missing_layer_is_named():
  with pytest.raises(ValueError, match="layer=2"):
    mla_jax.load_hf_attention(GOLDEN_DIR, 2)


def test_missing_key_is_named(tmp_path):
  tensors = load_file(str(GOLDEN_DIR / "model.safetensors"))
  del tensors[LAYER + "kv_a_layernorm.weight"]
  write_checkpoint(tmp_path / "ckpt", golden_cfg(), tensors)
  with pytest.raises(ValueError, match="kv_a_layernorm.weight"):
    mla_jax.load_hf_attention(tmp_path / "ckpt", 0)


def test_wrong_shape_is_named(tmp_path):
  tensors = load_file(str(GOLDEN_DIR / "model.safetensors"))
  tensors[LAYER + "o_proj.weight"] = tensors[LAYER + "o_proj.weight"][:, :-1].copy()
  write_checkpoint(tmp_path / "ckpt", golden_cfg(), tensors)
  with pytest.raises(ValueError, match=r"o_proj.weight: shape \(128, 63\), expected \(128, 64\)"):
    mla_jax.load_hf_attention(tmp_path / "ckpt", 0)


def test_directory_without_weights_is_an_error(tmp_path):
  shutil.copy(GOLDEN_DIR / "config.json", tmp_path / "config.json")
  with pytest.raises(ValueError, match="model.safetensors"):
    mla_jax.load_hf_attention(tmp_path, 0)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_file_in_the_checkpoint_loads_its_directory(name):
  """The path of config.json or of the safetensors file loads the same layer as the directory."""
  want = nnx.state(mla_jax.load_hf_attention(GOLDEN_DIR, 0), nnx.Param)
  got = nnx.state(mla_jax.load_hf_attention(GOLDEN_DIR / name, 0), nnx.Param)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)


def test_a_path_that_is_no_checkpoint_says_what_to_pass(tmp_path):
  (tmp_path / "notes.txt").write_text("")
  for path in (tmp_path / "notes.txt", tmp_path / "missing"):
    with pytest.raises(ValueError, match="expected a transformers checkpoint directory"):
      mla_jax.load_hf_attention(path, 0)
    with pytest.raises(ValueError, match="expected a transformers checkpoint directory"):
      mla_jax.load_hf_model(path)


def test_config_missing_a_field_names_it(tmp_path):
  write_checkpoint(tmp_path, golden_cfg(), load_file(str(GOLDEN_DIR / "model.safetensors")))
  hf_cfg = json.loads((tmp_path / "config.json").read_text())
  del hf_cfg["kv_lora_rank"]
  (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
  for load in (lambda: mla_jax.load_hf_attention(tmp_path, 0),
               lambda: mla_jax.load_hf_model(tmp_path)):
    with pytest.raises(ValueError, match="kv_lora_rank"):
      load()
