"""Text from a prompt through a transformers DeepSeek-V2 checkpoint: tokenizer, model, generate.

The checkpoint directory (config.checkpoint) holds config.json, the safetensors weights and the
tokenizer (tokenizer.json, read with the `tokenizers` package). The prompt is encoded (with the
tokenizer's own special tokens, e.g. BOS), mla_jax.load_hf_model builds the model and
mla_jax.generate continues the prompt (greedy at temperature 0, else temperature and top-p);
the text is decoded up to the first end-of-sequence token. Printed, and written as
<name>.json/.md with the token ids and the time of the prefill and of the decode steps (the
compile excluded: each call runs once untimed first).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp

import mla_jax

from experiments import harness

KIND = "generate_text"


def load_tokenizer(checkpoint: str):
  """The checkpoint's tokenizer.json as a tokenizers.Tokenizer; a clear ConfigError without."""
  path = os.path.join(checkpoint, "tokenizer.json")
  if not os.path.isfile(path):
    raise harness.ConfigError(f"checkpoint={checkpoint!r} has no tokenizer.json: text generation "
                              "needs the checkpoint's own tokenizer")
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise harness.ConfigError("text generation needs the tokenizers package: "
                              "pip install tokenizers (or mla_jax[text])") from err
  return tokenizers.Tokenizer.from_file(path)


def _check(config):
  if not config.checkpoint:
    raise harness.ConfigError("checkpoint: pass --config.checkpoint=<transformers checkpoint "
                              "directory>")
  if not config.prompt:
    raise harness.ConfigError("prompt: pass --config.prompt=<text>")
  if config.max_new_tokens < 1:
    raise harness.ConfigError(f"max_new_tokens={config.max_new_tokens}: expected >= 1")


def eos_ids(checkpoint: str) -> set[int]:
  """The checkpoint's end-of-sequence token ids (config.json's eos_token_id: one or a list)."""
  with open(os.path.join(checkpoint, "config.json")) as f:
    eos = json.load(f).get("eos_token_id")
  return set() if eos is None else set(eos) if isinstance(eos, list) else {eos}


def until_eos(ids: list[int], eos: set[int]) -> list[int]:
  """ids up to (without) the first of eos."""
  for i, token in enumerate(ids):
    if token in eos:
      return ids[:i]
  return ids


def _timed_generate(lm, prompt, config):
  """(tokens, prefill seconds, decode seconds): mla_jax.generate_fn of 1 token (the prefill),
  then of max_new_tokens from the prompt, each after an untimed call that compiles it."""
  rng = jax.random.key(config.seed)
  seconds = []
  for n in (1, config.max_new_tokens):
    generate = mla_jax.generate_fn(lm, n, temperature=config.temperature, top_p=config.top_p)
    jax.block_until_ready(generate(prompt, rng=rng))
    start = time.perf_counter()
    tokens, _ = jax.block_until_ready(generate(prompt, rng=rng))
    seconds.append(time.perf_counter() - start)
  return tokens, seconds[0], max(seconds[1] - seconds[0], 0.0)


def run(config, workdir: str, name: str = "generate_text", title: str = "") -> dict:
  """Generates from config.prompt; prints and writes the text."""
  _check(config)
  checkpoint = os.fspath(config.checkpoint)
  tokenizer = load_tokenizer(checkpoint)
  ids = tokenizer.encode(config.prompt).ids
  lm = mla_jax.load_hf_model(checkpoint, mode=config.mode, backend=config.backend,
                             dtype=jnp.dtype(config.dtype),
                             weight_format=config.weight_format or None)
  if max(ids) >= lm.cfg.vocab_size:
    raise harness.ConfigError(f"the tokenizer gives id {max(ids)}, outside the model's "
                              f"vocabulary of {lm.cfg.vocab_size}")
  tokens, prefill_s, decode_s = _timed_generate(lm, jnp.asarray([ids], jnp.int32), config)
  new = until_eos([int(t) for t in tokens[0]], eos_ids(checkpoint))
  results = harness.new_results(config, name, KIND, title)
  results["rows"] = [{"prompt": config.prompt, "prompt_ids": ids, "new_ids": new,
                      "text": tokenizer.decode(new), "full_text": tokenizer.decode(ids + new),
                      "prefill_s": prefill_s, "decode_s": decode_s,
                      "decode_tps": (config.max_new_tokens - 1) / decode_s if decode_s else None}]
  results["status"] = "complete"
  write(workdir, results)
  print(results["rows"][0]["full_text"])
  return results


def table(results: dict) -> str:
  header = ["prompt tokens", "new tokens", "prefill s", "decode t/s"]
  rows = [[len(r["prompt_ids"]), len(r["new_ids"]), harness.fmt(r["prefill_s"], ".3f"),
           harness.fmt(r["decode_tps"], ".1f")] for r in results["rows"]]
  return harness.md_table(header, rows)


def markdown(results: dict) -> str:
  row = results["rows"][0]
  quote = lambda text: "> " + text.replace("\n", "\n> ")
  return "\n".join([table(results), "", "Prompt:", "", quote(row["prompt"]), "",
                    "Prompt and continuation, decoded:", "", quote(row["full_text"]), ""])


plot = None  # no plot: the text is the result


def write(workdir: str, results: dict) -> list[str]:
  return harness.write(workdir, results, markdown=markdown)
