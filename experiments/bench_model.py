"""Token generation through the whole model (mla_jax.CausalLM, MoE included): tg@pp t/s.

For each implementation (experiments/model.py's spec grammar "mode/backend[:key=value...]"; the
options go to CausalLM, weight_format to its set_weight_format) the model is built once with
random weights from config.seed (_build), so all implementations hold the same weights. For each
prompt length N, with a random prompt of B rows:
- pp t/s: B·N over the seconds of mla_jax.generate_fn(model, 1)(prompt) (the jitted prefill,
  config.prefill_chunk tokens at a time, and the first token), median over reps;
- tg t/s: B·n_gen over the seconds of mla_jax.generate_fn(model, n_gen)(next_token) from a cache
  holding the prompt (n_gen greedy decode steps, the last n_gen - 1 inside one jit), median;
  each function is built once per implementation and prompt length, outside the timing;
- floor_us: the bytes a decode step must read (active_weight_bytes: every weight, but one
  embedding row a token and only the chosen routed experts; and the cache up to N) over
  floor_tbps, and x_floor the measured µs a step over it;
- tokens_agree: the fraction of the generated tokens equal to the first implementation's (the
  same weights and prompt: 1.0 unless rounding flips a near-tie);
- device_us_per_token, kernels_per_token and kernel_us_per_token (GPU only): one more tg call
  under the profiler, its GPU kernels' summed time, count and longest kernels, per token.
Each timed call runs once before timing (compilation). With config.alternate (the CPU config)
every model is built first and, at each prompt length, the implementations' timed reps
alternate, the order rotating every rep, so that a change in a shared host's load falls on all
of them (_rows); otherwise one model is built at a time. config.compare names the pairs
"candidate vs baseline" of the published table's form (t/s standard, t/s MLA, speedup) and of
the plot.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mla_jax

from experiments import decode_step, harness, model, report

KIND = "model_tg"


def model_config(overrides: str) -> mla_jax.ModelConfig:
  """DeepSeek-V2-Lite's ModelConfig with "field=value,..." overrides."""
  return dataclasses.replace(mla_jax.ModelConfig.deepseek_v2_lite(),
                             **model.parse_options(overrides))


def _build(impl: model.Implementation, cfg, config) -> mla_jax.CausalLM:
  """The implementation's CausalLM with random weights drawn on the device from config.seed
  (normal, scaled by fan-in^-0.5; norm weights uniform in [0.5, 1.5]): the same for every
  implementation, one compiled draw per weight shape (the real V2-Lite's 15.7B parameters fill
  in seconds), and without jax's initializers, which compile once per module."""
  options = dict(impl.options)
  weight_format = options.pop("weight_format", None)
  lm = nnx.eval_shape(lambda: mla_jax.CausalLM(
      cfg, mode=impl.layer, backend=impl.backend, dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype), rngs=nnx.Rngs(0), **options))
  key = jax.random.key(config.seed)
  for i, (_, param) in enumerate(nnx.to_flat_state(nnx.state(lm, nnx.Param))):
    shape = tuple(param.get_value().shape)
    param.set_value(_draw(jax.random.fold_in(key, i), shape, jnp.dtype(config.param_dtype)))
  lm.set_weight_format(weight_format)
  return lm


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw(key, shape, dtype):
  if len(shape) == 1:
    return jax.random.uniform(key, shape, jnp.float32, 0.5, 1.5).astype(dtype)
  return (jax.random.normal(key, shape, jnp.float32) * shape[-1] ** -0.5).astype(dtype)


def active_weight_bytes(lm, batch: int) -> int:
  """Weight bytes a decode step of `batch` tokens must read: every parameter (in its stored
  format), but of the embedding table one row a token (the whole table when lm_head shares it)
  and of each MoE layer's routed experts at most batch·k of the E."""
  cfg = lm.cfg
  total = 0
  for path, param in nnx.to_flat_state(nnx.state(lm, nnx.Param)):
    nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(param.get_value()))
    if path[-2:] == ("embed_tokens", "weight") and not cfg.tie_word_embeddings:
      nbytes = nbytes // cfg.vocab_size * min(batch, cfg.vocab_size)
    elif "experts" in path:  # the routed experts' stacks; shared experts are "shared_experts"
      E = cfg.n_routed_experts
      nbytes = nbytes // E * min(E, batch * cfg.num_experts_per_tok)
    total += nbytes
  return total


class _Case:
  """One implementation at one prompt length: a random prompt of B rows, its prefill (pp: the
  prompt and the first token) and n_gen greedy tokens from the prefilled cache (tg), each timed
  as a single waited-for call of a mla_jax.generate_fn built once (the model split outside the
  timing, as a user generating many times would); the cache each call gets is made outside the
  timing."""

  def __init__(self, lm, impl, config, prompt_len: int):
    self.lm, self.impl, self.config, self.prompt_len = lm, impl, config, prompt_len
    key = jax.random.fold_in(jax.random.key(config.seed), prompt_len)
    self.prompt = jax.random.randint(key, (config.batch_size, prompt_len), 0,
                                     lm.cfg.vocab_size, jnp.int32)
    self.pp_s, self.tg_s = [], []
    self.prefill = mla_jax.generate_fn(lm, 1, prefill_chunk=config.prefill_chunk or None)
    self.generate = mla_jax.generate_fn(lm, config.n_gen)
    self.first, self.cache, self.tokens = None, None, None

  def _empty(self):
    return jax.block_until_ready(self.lm.init_cache(
        self.config.batch_size, self.prompt_len + self.config.n_gen,
        dtype=jnp.dtype(self.impl.cache_dtype)))

  def _copy(self):  # generate donates the cache it is given: each tg call continues from a copy
    return jax.block_until_ready(jax.tree.map(jnp.copy, self.cache))

  def _tg(self, cache):
    return self.generate(self.first, cache=cache)

  def run(self, timed: bool = True):
    """One pp call and one tg call; timed=False: the untimed first calls (compilation)."""
    seconds, (self.first, self.cache) = _seconds(
        lambda c: self.prefill(self.prompt, cache=c), self._empty())
    if timed:
      self.pp_s.append(seconds)
    seconds, (self.tokens, _) = _seconds(self._tg, self._copy())
    if timed:
      self.tg_s.append(seconds)

  def row(self) -> dict:
    B, n_gen, prompt_len = self.config.batch_size, self.config.n_gen, self.prompt_len
    pp_s, tg_s = statistics.median(self.pp_s), statistics.median(self.tg_s)
    traced = _traced(self._copy, self._tg, n_gen)
    floor_bytes = (active_weight_bytes(self.lm, B)
                   + decode_step.cache_read_bytes(self.cache, prompt_len))
    floor_us = floor_bytes / (self.config.floor_tbps * 1e6)
    return {"impl": self.impl.name, "prompt_len": prompt_len, "batch": B, "n_gen": n_gen,
            "pp_s": pp_s, "pp_tps": B * prompt_len / pp_s, "tg_s": tg_s,
            "tg_tps": B * n_gen / tg_s, "floor_us": floor_us,
            "x_floor": tg_s / n_gen * 1e6 / floor_us, "pp_s_reps": self.pp_s,
            "tg_s_reps": self.tg_s, "tokens": np.asarray(self.tokens).tolist(), **traced}


def _seconds(call, args) -> tuple[float, object]:
  start = time.perf_counter()
  out = jax.block_until_ready(call(args))
  return time.perf_counter() - start, out


def _rows(config, entries, prompt_len: int) -> list[dict]:
  """Rows of the (impl, lm) entries at one prompt length: each runs once untimed, then
  config.reps timed reps; with several entries the reps alternate, the order rotating every
  rep, so that a change in a shared host's load falls on all of them."""
  cases = [_Case(lm, impl, config, prompt_len) for impl, lm in entries]
  for case in cases:
    case.run(timed=False)
  for rep in range(config.reps):
    for k in range(len(cases)):
      cases[(rep + k) % len(cases)].run()
  names = [case.impl.name for case in cases]
  return [{**case.row(), **({"alternated": names} if len(cases) > 1 else {})}
          for case in cases]


def _traced(prepare, generate, n_gen: int) -> dict:
  """Where a token's GPU time goes, from generate(prepare()) run once under the profiler
  (prepare's work outside it): decode_step.traced_fields and kernels_per_token; {} without a
  GPU, where nothing runs."""
  if jax.default_backend() != "gpu":
    return {}
  arg = jax.block_until_ready(prepare())
  device, _ = harness.device_trace(lambda: generate(arg), calls=n_gen)
  return {**decode_step.traced_fields(device), "kernels_per_token": device.kernels}


def run(config, workdir: str, name: str = "model_tg", title: str = "") -> dict:
  """Times every implementation at every prompt length; writes <name>.json and <name>.md."""
  cfg = model_config(config.model_overrides)
  impls = [model.Implementation.parse(s, config.cache_dtype)
           for s in config.impls.split(",") if s.strip()]
  try:
    pairs = report.parse_pairs(config.compare, [impl.name for impl in impls])
  except ValueError as err:
    raise harness.ConfigError(f"compare: {err}") from err
  results = harness.new_results(config, name, KIND, title)
  results.update(model_config=dataclasses.asdict(cfg), pairs=[list(p) for p in pairs])
  reference: dict[int, list] = {}

  def add(rows):
    for row in rows:
      expected = np.asarray(reference.setdefault(row["prompt_len"], row["tokens"]))
      row["tokens_agree"] = float(np.mean(np.asarray(row["tokens"]) == expected))
      results["rows"].append(row)
      print(f"{row['impl']} tg{row['n_gen']}@pp{row['prompt_len']}: tg {row['tg_tps']:.1f} "
            f"t/s, pp {row['pp_tps']:.1f} t/s, tokens agree {row['tokens_agree']:.2f}",
            flush=True)
    write(workdir, results)

  with harness.run_status(results):
    if config.alternate:  # every model at once, their reps alternating
      entries = [(impl, _build(impl, cfg, config)) for impl in impls]
      for prompt_len in config.prompt_lengths:
        add(_rows(config, entries, int(prompt_len)))
    else:
      for impl in impls:
        lm = _build(impl, cfg, config)
        for prompt_len in config.prompt_lengths:
          add(_rows(config, [(impl, lm)], int(prompt_len)))
        del lm  # before the next is built: two bf16 V2-Lite models (63 GB) leave an H100 no room
  write(workdir, results)
  print(table(results))
  return results


def table(results: dict) -> str:
  header = ["impl", "test", "tg t/s", "pp t/s", "floor µs", "× floor", "tokens agree"]
  rows = [[r["impl"], f"tg{r['n_gen']}@pp{r['prompt_len']}", harness.fmt(r["tg_tps"], ".1f"),
           harness.fmt(r["pp_tps"], ".1f"), harness.fmt(r.get("floor_us"), ".1f"),
           harness.fmt(r.get("x_floor"), ".2f"), harness.fmt(r["tokens_agree"], ".2f")]
          for r in results["rows"]]
  return harness.md_table(header, rows, "llrrrrr")


def published_table(results: dict, candidate: str, baseline: str) -> str:
  """One compared pair in the published tables' form: per prompt length the t/s of the
  baseline (standard attention) and of the candidate (MLA), and the speedup."""
  rows = {(r["impl"], r["prompt_len"]): r for r in results["rows"]}
  lengths = sorted({r["prompt_len"] for r in results["rows"]})
  lines = []
  for n in lengths:
    a, b = rows.get((candidate, n)), rows.get((baseline, n))
    if a and b:
      lines.append([_model_label(results), f"tg{a['n_gen']}@pp{n}", f"{b['tg_tps']:.2f}",
                    f"{a['tg_tps']:.2f}", f"{speedup(a, b):.2f}"])
  return harness.md_table(["model", "test", f"t/s ({baseline})", f"t/s ({candidate})",
                           "Speedup"], lines, "llrrr")


def speedup(a: dict, b: dict) -> float:
  """Row a's tg t/s over row b's: the median of the per-rep ratios where their reps alternated
  (rep i of each ran in the same round, under the same host load), else the ratio of the
  medians."""
  if b["impl"] in a.get("alternated", ()):
    return statistics.median(tb / ta for ta, tb in zip(a["tg_s_reps"], b["tg_s_reps"]))
  return a["tg_tps"] / b["tg_tps"]


def _model_label(results: dict) -> str:
  m, c = results["model_config"], results["config"]
  return (f"DeepSeek-V2 {m['num_layers']}L D={m['hidden_size']} {c['param_dtype']} "
          f"B={c['batch_size']}")


def markdown(results: dict) -> str:
  c, m = results["config"], results["model_config"]
  alternated = (", the implementations' reps alternating, the order rotating every rep "
                "(speedup: the median of the per-rep ratios)" if c.get("alternate") else "")
  lines = [table(results), ""]
  for candidate, baseline in results.get("pairs", []):
    lines += [published_table(results, candidate, baseline), ""]
  lines.append(
      f"The whole model (CausalLM): {m['num_layers']} layers, D={m['hidden_size']}, "
      f"H={m['num_heads']}, {m['n_routed_experts']} routed experts (top "
      f"{m['num_experts_per_tok']}) + {m['n_shared_experts']} shared, vocabulary "
      f"{m['vocab_size']}; random weights, {c['dtype']}, B={c['batch_size']}. pp: the prefill "
      f"and first token (mla_jax.generate, 1 token); tg: {c['n_gen']} greedy tokens from the "
      f"prefilled cache; medians of {c['reps']} reps after one untimed call"
      f"{alternated}. floor: the weights "
      "a step reads (one embedding row a token, only the chosen routed experts) and the cache "
      f"up to the prompt, over {c['floor_tbps']} TB/s; × floor: µs a step over it. tokens "
      "agree: generated tokens equal to the first implementation's.")
  lines += decode_step.kernel_lines(results["rows"])
  return harness.page(lines, results)


def plot(results: dict, path: str):
  """tg t/s against the prompt length per implementation, and each compared pair's speedup."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                    gridspec_kw={"height_ratios": [2, 1]})
  by_impl: dict[str, list] = {}
  for r in results["rows"]:
    by_impl.setdefault(r["impl"], []).append(r)
  for name, rows in by_impl.items():
    rows = sorted(rows, key=lambda r: r["prompt_len"])
    top.plot([r["prompt_len"] for r in rows], [r["tg_tps"] for r in rows], "o-", label=name)
  rows = {(r["impl"], r["prompt_len"]): r for r in results["rows"]}
  for candidate, baseline in results.get("pairs", []):
    points = sorted((n, speedup(rows[(candidate, n)], rows[(baseline, n)]))
                    for (impl, n) in rows if impl == candidate and (baseline, n) in rows)
    if points:
      bottom.plot(*zip(*points), "o-", label=f"{candidate} over {baseline}")
  top.set_ylabel("decode throughput (tokens/s)")
  top.set_title(f"{_model_label(results)} on {harness.run_info(results)['device']}", fontsize=10)
  bottom.axhline(1.0, color="gray", lw=0.8)
  bottom.set_ylabel("speedup (×)")
  bottom.set_xlabel("prompt length (tokens)")
  bottom.set_xscale("log", base=2)
  for axes in (top, bottom):
    axes.grid(True, which="both", alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
      axes.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(workdir: str, results: dict) -> list[str]:
  return harness.write(workdir, results, markdown=markdown, plot=plot if results["rows"] else None)
