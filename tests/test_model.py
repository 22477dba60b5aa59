"""The whole DeepSeek-V2 decoder: logits equal transformers', ragged batches, generation and
checkpoint loading."""

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import mla_jax
from mla_jax.generate import _nucleus  # pylint: disable=protected-access
from mla_jax.ops.decode import mosaic_common
from helpers import GOLDEN_DIR, rel_err
import hlo

PREFILL = 11  # cases.json: prefill 11 tokens, then 5 decode steps

# Measured (float32, CPU): 5.1e-6 (standard) and 5.0e-6 (absorbed) full, 4.9e-6 incremental.
# What is left is rope: at positions ~5000 the golden logits' angles are nearer the exact
# products than float32's rounded position·inv_freq, which the attention cases (3e-7) match.
PARITY = 1e-5


def _load(mode, path=GOLDEN_DIR, **kw):
  return mla_jax.load_hf_model(path, mode=mode, backend="xla", dtype=jnp.float32, **kw)


def _jitted(model):
  return jax.jit(lambda ids, pos, cache: model(ids, pos, cache))


@functools.cache
def _golden_model(mode):
  """(the golden model, its jitted forward), shared by the tests so that each shape compiles
  once."""
  model = _load(mode)
  return model, _jitted(model)


def _golden_inputs(golden):
  return (jnp.asarray(golden["input_ids"], jnp.int32),
          jnp.asarray(golden["attn_positions"], jnp.int32))


def _run_chunks(mode, ids, pos, chunks, max_len):
  """The golden model's logits for ids/pos [B,T] fed in consecutive chunks (e.g. [prefill, 1,
  1, ...]), and its cache."""
  model, forward = _golden_model(mode)
  cache, out, t = model.init_cache(ids.shape[0], max_len, jnp.float32), [], 0
  for n in chunks:
    logits, cache = forward(ids[:, t:t + n], pos[:, t:t + n], cache)
    out.append(logits)
    t += n
  return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize("mode", ["standard", "absorbed"])
def test_logits_match_transformers(mode, golden):
  ids, pos = _golden_inputs(golden)
  T = ids.shape[1]
  full, _ = _run_chunks(mode, ids, pos, [T], T)
  assert full.shape == (*ids.shape, 512)
  assert rel_err(full, golden["logits_full"]) <= PARITY
  incremental, cache = _run_chunks(mode, ids, pos, [PREFILL] + [1] * (T - PREFILL), T)
  assert rel_err(incremental, golden["logits_incremental"]) <= PARITY
  np.testing.assert_array_equal(cache[1].lengths, [T, T])


def test_left_padded_batch_equals_rows_alone(rng):
  """Rows of 11 and 5 prompt tokens (the second left-padded with position -1), then 5 decode
  steps, as the golden case's shapes (compiled once). Alone, a decode step gathers its experts;
  in the batch they run grouped (moe.py)."""
  lengths, T, steps = [PREFILL, 5], PREFILL, 5
  ids = rng.integers(0, 512, (2, T + steps))
  starts = rng.integers(0, 6000, 2)
  pos = np.full((2, T + steps), -1)
  for b, n in enumerate(lengths):
    pos[b, T - n:] = starts[b] + np.arange(n + steps)
  ids, pos = jnp.asarray(ids, jnp.int32), jnp.asarray(pos, jnp.int32)
  batch, _ = _run_chunks("absorbed", ids, pos, [T] + [1] * steps, T + steps)
  assert np.all(np.asarray(batch)[np.asarray(pos) < 0] == 0)  # padding logits are 0
  for b, n in enumerate(lengths):
    real = slice(T - n, T + steps)
    alone, _ = _run_chunks("absorbed", ids[b:b + 1, real], pos[b:b + 1, real],
                           [n] + [1] * steps, T + steps)
    assert rel_err(batch[b, real], alone[0]) < 2e-5, f"row {b}"


def test_greedy_generation_equals_argmax_steps(rng):
  model, forward = _golden_model("absorbed")
  B, T, N = 2, PREFILL, 5  # the shapes of test_logits_match_transformers: compiled once
  ids = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (B, T)), jnp.int32)
  pos = np.stack([np.arange(T) - 3, np.arange(T) + 4000])
  pos = jnp.asarray(np.where(pos < 0, -1, pos), jnp.int32)  # row 0 has 3 tokens of left padding
  tokens, cache = mla_jax.generate(model, ids, N, positions=pos)
  assert tokens.shape == (B, N) and tokens.dtype == jnp.int32
  np.testing.assert_array_equal(cache[0].lengths, [T - 3 + N - 1, T + N - 1])

  logits, cache = forward(ids, pos, model.init_cache(B, T + N, jnp.float32))
  token, p = jnp.argmax(logits[:, -1], axis=-1), pos[:, -1:] + 1
  expected = [token]
  for _ in range(N - 1):
    logits, cache = forward(token[:, None].astype(jnp.int32), p, cache)
    token, p = jnp.argmax(logits[:, 0], axis=-1), p + 1
    expected.append(token)
  np.testing.assert_array_equal(tokens, jnp.stack(expected, axis=1))


def test_generate_fn_generates_as_generate_and_follows_the_weights(rng):
  """generate_fn splits the model once; its function gives generate's tokens, call after call,
  and follows a weight changed in place after it was built."""
  model = _load("absorbed")
  ids = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (2, 4)), jnp.int32)
  run = mla_jax.generate_fn(model, 3)
  first = run(ids)[0]
  np.testing.assert_array_equal(first, mla_jax.generate(model, ids, 3)[0])
  np.testing.assert_array_equal(run(ids)[0], first)
  model.lm_head.weight.set_value(-model.lm_head.weight.get_value())  # argmax becomes argmin
  flipped = run(ids)[0]
  np.testing.assert_array_equal(flipped, mla_jax.generate(model, ids, 3)[0])
  assert not np.array_equal(flipped[:, 0], first[:, 0])


def test_generate_fn_calls_hash_no_module_graph(rng, monkeypatch):
  """After its first call (which compiles), a generate_fn call hashes no graphdef: as a static
  argument of a jit it would be hashed at every call, a walk of every module on the host."""
  model = _load("absorbed")
  ids = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (2, 4)), jnp.int32)
  run = mla_jax.generate_fn(model, 3)
  run(ids)
  graphdef_type = type(nnx.split(model)[0])
  hashes = []
  original = graphdef_type.__hash__
  monkeypatch.setattr(graphdef_type, "__hash__", lambda self: hashes.append(1) or original(self))
  run(ids)
  assert not hashes


@pytest.mark.parametrize("mode", ["absorbed", "standard"])
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prefill_generates_as_one_prefill(rng, mode, chunk):
  """A prompt of 7 taken 1, 3 (two whole chunks and one padded) or 7 tokens at a time gives the
  tokens and the cache of the prefill that takes it at once: row 0 is left-padded, and row 1's
  last real token (right padding) lies in an earlier chunk than the prompt's end."""
  model, _ = _golden_model(mode)
  T, N = 7, 3
  ids = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (2, T)), jnp.int32)
  pos = jnp.asarray([[-1, -1, 0, 1, 2, 3, 4], [0, 1, 2, 3, -1, -1, -1]], jnp.int32)
  want, want_cache = mla_jax.generate(model, ids, N, positions=pos)
  tokens, cache = mla_jax.generate(model, ids, N, positions=pos, prefill_chunk=chunk)
  np.testing.assert_array_equal(tokens, want)
  # atol 1e-5: on a GPU one-token chunks' products are row reductions and the whole prompt's
  # GEMMs, whose sums round apart (up to 1.4e-6 on an H100, entries of order 1)
  for got, expected in zip(jax.tree.leaves(cache), jax.tree.leaves(want_cache)):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens,slots", [(1, 8), (8, 8), (9, 16), (16449, 16456)])
def test_generation_caches_have_slots_every_decode_kernel_takes(tokens, slots):
  """mla_jax.generate sizes its cache by round_slots: the least count of at least the tokens
  that the Mosaic kernels' TMA tiles take (an S they refuse runs on Triton)."""
  assert mla_jax.cache.round_slots(tokens) == slots
  assert mosaic_common.rows_unsupported(slots) is None
  assert mosaic_common.rows_unsupported(slots + 1) is not None


def test_generation_rounds_its_cache_up(rng):
  """A prompt of 3 and 2 new tokens get a fresh cache of 8 slots, 5 of them used."""
  model, _ = _golden_model("absorbed")
  ids = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (1, 3)), jnp.int32)
  _, cache = mla_jax.generate(model, ids, 2)
  assert cache[0].max_len == 8
  np.testing.assert_array_equal(cache[0].lengths, [4])  # the last token is not yet fed


def test_sampling_follows_rng(rng):
  model, _ = _golden_model("absorbed")
  ids = jnp.asarray(rng.integers(0, 512, (2, 4)), jnp.int32)
  key = jax.random.key(int(rng.integers(2**31)))
  sample = lambda **kw: mla_jax.generate(model, ids, 5, temperature=1.5, top_p=0.9, **kw)[0]
  first = sample(rng=key)
  np.testing.assert_array_equal(first, sample(rng=key))
  assert not np.array_equal(first, sample(rng=jax.random.fold_in(key, 1)))
  with pytest.raises(ValueError, match="rng"):
    sample()


def test_sampler_nucleus_and_temperature(rng):
  probs = np.array([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]])
  kept = _nucleus(jnp.log(jnp.asarray(probs, jnp.float32)), 0.8)
  np.testing.assert_array_equal(np.isfinite(kept), [[1, 0, 1, 0], [1, 1, 1, 1]])
  logits = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
  key = jax.random.key(int(rng.integers(2**31)))
  greedy = jnp.argmax(logits, axis=-1)
  # A nucleus of nearly no mass keeps the most likely token only.
  np.testing.assert_array_equal(mla_jax.Sampler(1.5, 1e-6)(logits, key), greedy)
  np.testing.assert_array_equal(mla_jax.Sampler()(logits, key), greedy)
  assert not np.array_equal(mla_jax.Sampler(1.5)(logits, key), greedy)
  with pytest.raises(ValueError, match="top_p"):
    mla_jax.Sampler(1.0, 0.0)
  for temperature in (-1.0, float("nan"), float("inf")):  # NaN fails every comparison
    with pytest.raises(ValueError, match="temperature"):
      mla_jax.Sampler(temperature)
  with pytest.raises(ValueError, match="top_p"):
    mla_jax.Sampler(1.0, float("nan"))


def _write_sharded(src, dst, shards):
  dst.mkdir()
  shutil.copy(src / "config.json", dst / "config.json")
  tensors = load_file(str(src / "model.safetensors"))
  names, weight_map = sorted(tensors), {}
  for i in range(shards):
    file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    save_file({n: tensors[n] for n in names[i::shards]}, str(dst / file))
    weight_map.update({n: file for n in names[i::shards]})
  (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_checkpoint_loads_the_same_parameters(tmp_path):
  _write_sharded(GOLDEN_DIR, tmp_path / "sharded", shards=3)
  sharded = nnx.to_flat_state(nnx.state(_load("absorbed", tmp_path / "sharded"), nnx.Param))
  single = dict(nnx.to_flat_state(nnx.state(_golden_model("absorbed")[0], nnx.Param)))
  assert len(sharded) == len(single) == 29
  for path, param in sharded:
    np.testing.assert_array_equal(param[...], single[path][...], err_msg=str(path))


def _copy_with(tmp_path, edit, config=None):
  """The golden checkpoint with its tensors dict passed through edit (and config updated)."""
  tmp_path.mkdir(exist_ok=True)
  hf = json.loads((GOLDEN_DIR / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**hf, **(config or {})}))
  tensors = load_file(str(GOLDEN_DIR / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  return tmp_path


def test_missing_or_misshaped_tensors_are_named(tmp_path):
  expert = "model.layers.1.mlp.experts.2.up_proj.weight"
  missing = _copy_with(tmp_path / "missing", lambda t: t.pop(expert))
  with pytest.raises(ValueError, match=expert.replace(".", r"\.")):
    _load("absorbed", missing)
  name = "model.layers.0.mlp.down_proj.weight"
  misshaped = _copy_with(tmp_path / "misshaped", lambda t: t.update({name: t[name][:, :-1]}))
  with pytest.raises(ValueError, match=name.replace(".", r"\.") + r": shape \(128, 255\)"):
    _load("absorbed", misshaped)


def test_tied_embeddings_reuse_embed_tokens(tmp_path):
  tied = _copy_with(tmp_path, lambda t: t.pop("lm_head.weight"), {"tie_word_embeddings": True})
  model = _load("absorbed", tied)
  np.testing.assert_array_equal(model.lm_head.weight[...], model.model.embed_tokens.weight[...])


def test_model_config_reads_the_moe_fields():
  cfg = mla_jax.ModelConfig.from_hf(GOLDEN_DIR)
  assert (cfg.vocab_size, cfg.intermediate_size, cfg.moe_intermediate_size) == (512, 256, 64)
  assert (cfg.n_routed_experts, cfg.n_shared_experts, cfg.num_experts_per_tok) == (4, 1, 2)
  assert (cfg.first_k_dense_replace, cfg.topk_method, cfg.n_group, cfg.topk_group) == (
      1, "greedy", 1, 1)
  assert not cfg.norm_topk_prob and cfg.routed_scaling_factor == 1.0
  assert [cfg.is_moe_layer(i) for i in range(2)] == [False, True]
  assert dataclasses.asdict(mla_jax.MLAConfig.from_hf(GOLDEN_DIR)).items() <= dataclasses.asdict(
      cfg).items()
  lite = mla_jax.ModelConfig.deepseek_v2_lite()
  assert (lite.vocab_size, lite.n_routed_experts, lite.num_experts_per_tok) == (102400, 64, 6)
  assert (lite.moe_intermediate_size, lite.intermediate_size, lite.num_layers) == (1408, 10944,
                                                                                    27)


def test_model_config_refuses_what_is_not_implemented():
  hf = json.loads((GOLDEN_DIR / "config.json").read_text())
  for field, value in [("topk_method", "noaux_tc"), ("scoring_func", "sigmoid"),
                       ("hidden_act", "gelu"), ("moe_layer_freq", 2)]:
    with pytest.raises(ValueError, match=field):
      mla_jax.ModelConfig.from_hf({**hf, field: value})
  with pytest.raises(ValueError, match="V3"):
    mla_jax.ModelConfig.deepseek_v3()


def test_bad_inputs_are_named():
  model, _ = _golden_model("absorbed")
  cache = model.init_cache(1, 4, jnp.float32)
  ids = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="positions.shape"):
    model(ids, jnp.zeros((1, 2), jnp.int32), cache)
  with pytest.raises(ValueError, match="input_ids.shape"):
    model(ids[0], ids[0], cache)
  with pytest.raises(ValueError, match=r"len\(cache\)"):
    model(ids, ids, cache[:1])
  for steps in (0, 2.0, True):  # named as max_new_tokens, not as a cache size
    with pytest.raises(ValueError, match="max_new_tokens"):
      mla_jax.generate(model, ids, steps)
  with pytest.raises(ValueError, match="cache holds 2 rows"):  # named as the cache's batch
    mla_jax.generate(model, ids, 1, cache=model.init_cache(2, 8, jnp.float32))
  with pytest.raises(ValueError, match="prefill_chunk"):
    mla_jax.generate(model, ids, 1, prefill_chunk=0)
  with pytest.raises(ValueError, match="overflow"):
    mla_jax.generate(model, ids, 1, cache=model.init_cache(1, 2, jnp.float32))


@pytest.mark.parametrize("bad_id", [-1, "vocab_size"])
def test_token_ids_outside_the_vocabulary(bad_id):
  """A real token's id outside [0, vocab_size) raises outside jit (in the call and in generate),
  and under jit makes its row's logits NaN from there on, never another token's (-1 would index
  the table's last row); the other row is untouched. A padding token's id is not checked."""
  model, forward = _golden_model("absorbed")
  vocab = model.cfg.vocab_size
  bad = vocab if bad_id == "vocab_size" else bad_id
  ids = jnp.asarray([[1, 2, 3], [4, bad, 5]], jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (2, 3))
  cache = lambda: model.init_cache(2, 8, jnp.float32)
  with pytest.raises(ValueError, match=rf"input_ids\[1, 1\]={bad}.*vocab_size={vocab}"):
    model(ids, positions, cache())
  with pytest.raises(ValueError, match=rf"input_ids\[1, 1\]={bad}"):
    mla_jax.generate(model, ids, 1)
  logits, _ = forward(ids, positions, cache())
  assert np.all(np.isfinite(logits[0])) and np.all(np.isnan(logits[1, 1:]))
  padded = positions.at[1, 1].set(-1)
  logits, _ = model(ids, padded, cache())
  assert np.all(np.isfinite(logits))


# Contraction axes that are multiples of 32, as GGML blocks need (the golden model's K is 16).
QUANT_CFG = dataclasses.replace(mla_jax.ModelConfig.deepseek_v2_lite(), hidden_size=64,
                                num_heads=2, kv_lora_rank=32, qk_nope_head_dim=32,
                                qk_rope_head_dim=8, v_head_dim=32, num_layers=2, vocab_size=128,
                                intermediate_size=96, moe_intermediate_size=32,
                                n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2)


def _random_model(cfg, rng):
  """A CausalLM with fresh normal weights (norm weights around 1), drawn in numpy: random
  initializers would compile once per weight shape."""
  model = nnx.eval_shape(lambda: mla_jax.CausalLM(cfg, backend="xla", rngs=nnx.Rngs(0)))
  for _, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = param.get_value().shape
    value = (rng.uniform(0.5, 1.5, shape) if len(shape) == 1
             else rng.standard_normal(shape) * shape[-1] ** -0.5)
    param.set_value(jnp.asarray(value, jnp.float32))
  return model


def test_quantized_model_equals_its_dequantized_weights(rng):
  """Every Linear weight, wk_b/wv_b and the experts are quantized (the routers are not), and
  the model computes with exactly their dequantized values: the layouts are right. q8_0 only:
  the formats share the layout, and tests/test_quant.py checks each format's values."""
  fmt = "q8_0"
  model = _random_model(QUANT_CFG, rng)
  dense = nnx.clone(model)
  model.set_weight_format(fmt)
  params = dict(nnx.to_flat_state(nnx.state(dense, nnx.Param)))
  quantized = 0
  for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = param.get_value()
    if isinstance(value, mla_jax.quant.QuantizedTensor):
      assert value.fmt == fmt
      w = mla_jax.quant.dequantize(value)
      # kv_b_proj keeps attention.py's [H,K,C]/[H,C,V]; the others store [in, out] (layers.py).
      params[path].set_value(w if "kv_b_proj" in path else jnp.swapaxes(w, -1, -2))
      quantized += 1
  assert quantized == 20  # lm_head; 5 a layer in attention; 3 for layer 0's MLP, 6 for the MoE
  assert dense.model.layers[1].mlp.gate.weight.get_value().dtype == jnp.float32
  ids = jnp.asarray(rng.integers(0, QUANT_CFG.vocab_size, (2, 5)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
  logits = lambda m: _jitted(m)(ids, pos, m.init_cache(2, 5, jnp.float32))[0]
  assert rel_err(logits(model), logits(dense)) < 2e-5


def test_weight_format_on_load(tmp_path):
  bf16 = mla_jax.load_hf_model(GOLDEN_DIR, dtype=jnp.float32, weight_format="bf16")
  assert bf16.lm_head.weight.get_value().dtype == jnp.bfloat16
  assert bf16.model.layers[1].mlp.experts.up_proj.get_value().dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.kv_b_proj.*wk_b.*K=16"):
    mla_jax.load_hf_model(GOLDEN_DIR, dtype=jnp.float32, weight_format="q8_0")
  with pytest.raises(ValueError, match="weight_format"):
    mla_jax.load_hf_model(GOLDEN_DIR, dtype=jnp.float32, weight_format="q4_k")


@pytest.mark.parametrize("weight_format", [None, "q8_0"])
def test_moe_decode_step_reads_only_the_chosen_experts(weight_format):
  """The compiled B=1 decode step of a MoE model forms no all-experts array: every temporary is
  smaller than one projection's stacked expert weights (here 16 experts, top 2), so only the
  chosen experts' weights are read (gathered), dequantized included. With the grouped matmul
  forced the check sees the all-experts product (the check can fail)."""
  cfg = dataclasses.replace(
      mla_jax.ModelConfig.deepseek_v2_lite(), hidden_size=256, num_heads=2, kv_lora_rank=64,
      qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_layers=2, vocab_size=512,
      intermediate_size=256, moe_intermediate_size=256, n_routed_experts=16,
      n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1)
  expert_stack = 16 * 256 * 256 * 4  # one projection's [E, out, in] float32 weights

  def temporaries(moe_impl):
    lm = mla_jax.CausalLM(cfg, backend="xla", moe_impl=moe_impl, rngs=nnx.Rngs(0))
    lm.set_weight_format(weight_format)
    graphdef, state = nnx.split(lm)
    step = jax.jit(lambda s, ids, pos, c: nnx.merge(graphdef, s)(ids, pos, c),
                   donate_argnums=(3,))
    text = step.lower(state, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                      lm.init_cache(1, 64, jnp.float32)).compile().as_text()
    return hlo.large_temporaries(text, expert_stack)

  assert temporaries("auto") == []
  assert temporaries("grouped") != []
