"""Token generation through the whole model (mla_jax.CausalLM, MoE included): tg@pp t/s.

For each implementation (experiments/model.py's spec grammar "mode/backend[:key=value...]"; the
options go to CausalLM, weight_format to its set_weight_format) the model is built once with
random weights from config.seed (_build), so all implementations hold the same weights. For each prompt
length N, with a random prompt of B rows:
- pp t/s: B·N over the seconds of mla_jax.generate(model, prompt, 1) (the jitted prefill and the
  first token), median over reps;
- tg t/s: B·n_gen over the seconds of mla_jax.generate(model, next_token, n_gen) from a cache
  holding the prompt (n_gen greedy decode steps, the last n_gen - 1 inside one jit), median;
- tokens_agree: the fraction of the generated tokens equal to the first implementation's (the
  same weights and prompt: 1.0 unless rounding flips a near-tie).
Each timed call runs once before timing (compilation).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mla_jax

from experiments import harness, model

KIND = "model_tg"


def model_config(overrides: str) -> mla_jax.ModelConfig:
  """DeepSeek-V2-Lite's ModelConfig with "field=value,..." overrides."""
  return dataclasses.replace(mla_jax.ModelConfig.deepseek_v2_lite(),
                             **model.parse_options(overrides))


def _build(impl: model.Implementation, cfg, config) -> mla_jax.CausalLM:
  """The implementation's CausalLM with random weights drawn in numpy from config.seed (normal,
  scaled by fan-in^-0.5; norm weights uniform in [0.5, 1.5]): the same for every implementation,
  and without jax's initializers, which compile once per weight shape (~10 s for a tiny model)."""
  options = dict(impl.options)
  weight_format = options.pop("weight_format", None)
  lm = nnx.eval_shape(lambda: mla_jax.CausalLM(
      cfg, mode=impl.layer, backend=impl.backend, dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype), rngs=nnx.Rngs(0), **options))
  rng = np.random.default_rng(config.seed)
  for _, param in nnx.to_flat_state(nnx.state(lm, nnx.Param)):
    shape = param.get_value().shape
    value = (rng.uniform(0.5, 1.5, shape) if len(shape) == 1
             else rng.standard_normal(shape, np.float32) * shape[-1] ** -0.5)
    param.set_value(jnp.asarray(value, config.param_dtype))
  lm.set_weight_format(weight_format)
  return lm


def _timed(prepare, call, reps: int) -> tuple[float, object]:
  """(median seconds of call(*prepare()) over reps calls after one untimed call, the last
  result); prepare's work (fresh caches) is not timed."""
  seconds, out = [], None
  for rep in range(reps + 1):
    args = prepare()
    start = time.perf_counter()
    out = jax.block_until_ready(call(*args))
    if rep:
      seconds.append(time.perf_counter() - start)
  return statistics.median(seconds), out


def _row(lm, impl, config, prompt_len: int) -> dict:
  B, n_gen = config.batch_size, config.n_gen
  key = jax.random.fold_in(jax.random.key(config.seed), prompt_len)
  prompt = jax.random.randint(key, (B, prompt_len), 0, lm.cfg.vocab_size, jnp.int32)
  empty = lambda: (lm.init_cache(B, prompt_len + n_gen, dtype=jnp.dtype(impl.cache_dtype)),)
  pp_s, (first, cache) = _timed(empty, lambda c: mla_jax.generate(lm, prompt, 1, cache=c),
                                config.reps)
  # generate donates the cache it is given: each rep continues from a copy.
  copy = lambda: (jax.tree.map(jnp.copy, cache),)
  tg_s, (tokens, _) = _timed(copy, lambda c: mla_jax.generate(lm, first, n_gen, cache=c),
                             config.reps)
  return {"impl": impl.name, "prompt_len": prompt_len, "batch": B, "n_gen": n_gen,
          "pp_s": pp_s, "pp_tps": B * prompt_len / pp_s, "tg_s": tg_s, "tg_tps": B * n_gen / tg_s,
          "tokens": np.asarray(tokens).tolist()}


def run(config, workdir: str, name: str = "model_tg", title: str = "") -> dict:
  """Times every implementation at every prompt length; writes <name>.json and <name>.md."""
  cfg = model_config(config.model_overrides)
  impls = [model.Implementation.parse(s, config.cache_dtype)
           for s in config.impls.split(",") if s.strip()]
  results = harness.new_results(config, name, KIND, title)
  results["model_config"] = dataclasses.asdict(cfg)
  start = time.perf_counter()
  reference: dict[int, list] = {}
  for impl in impls:
    lm = _build(impl, cfg, config)
    for prompt_len in config.prompt_lengths:
      row = _row(lm, impl, config, int(prompt_len))
      expected = np.asarray(reference.setdefault(row["prompt_len"], row["tokens"]))
      row["tokens_agree"] = float(np.mean(np.asarray(row["tokens"]) == expected))
      results["rows"].append(row)
      print(f"{impl.name} tg{row['n_gen']}@pp{row['prompt_len']}: tg {row['tg_tps']:.1f} t/s, "
            f"pp {row['pp_tps']:.1f} t/s, tokens agree {row['tokens_agree']:.2f}", flush=True)
      write(workdir, results)
  results["status"] = "complete"
  results["elapsed_s"] = time.perf_counter() - start
  write(workdir, results)
  print(table(results))
  return results


def table(results: dict) -> str:
  header = ["impl", "test", "tg t/s", "pp t/s", "tokens agree"]
  rows = [[r["impl"], f"tg{r['n_gen']}@pp{r['prompt_len']}", harness.fmt(r["tg_tps"], ".1f"),
           harness.fmt(r["pp_tps"], ".1f"), harness.fmt(r["tokens_agree"], ".2f")]
          for r in results["rows"]]
  return harness.md_table(header, rows, "llrrr")


def markdown(results: dict) -> str:
  c, m = results["config"], results["model_config"]
  return "\n".join([
      table(results), "",
      f"The whole model (CausalLM): {m['num_layers']} layers, D={m['hidden_size']}, "
      f"H={m['num_heads']}, {m['n_routed_experts']} routed experts (top "
      f"{m['num_experts_per_tok']}) + {m['n_shared_experts']} shared, vocabulary "
      f"{m['vocab_size']}; random weights, {c['dtype']}, B={c['batch_size']}. pp: the prefill "
      f"and first token (mla_jax.generate, 1 token); tg: {c['n_gen']} greedy tokens from the "
      f"prefilled cache; medians of {c['reps']} reps after one untimed call. tokens agree: "
      "generated tokens equal to the first implementation's.", ""])


plot = None  # no plot: the table is the result


def write(workdir: str, results: dict) -> list[str]:
  return harness.write(workdir, results, markdown=markdown)
