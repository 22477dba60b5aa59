"""The experiment runner on a tiny MLA stack: end to end through the CLI, the table/JSON/plot it
writes, the correctness gate (a perturbed implementation must fail it) and unavailable kernels."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from configs import tg_sweep
from experiments import model, report, sweep
from experiments.timing import Progress
from mla_jax import MLAttention

ROOT = pathlib.Path(__file__).parent.parent
TINY = ("hidden_size=64,num_heads=2,kv_lora_rank=32,qk_rope_head_dim=8,qk_nope_head_dim=16,"
        "v_head_dim=16")


def tiny_config(**fields):
  config = tg_sweep.get_config()
  config.update(dict(num_layers=2, mla_overrides=TINY, prompt_lengths=(8, 24), n_gen=3, reps=2,
                     warmup_reps=0, prefill_chunk=16, time_budget_s=0,
                     seed=int(np.random.default_rng().integers(1 << 20))))
  config.update(fields)
  return config


class Perturbed(MLAttention):
  """Absorbed attention whose output is off by a relative 1e-2: wrong, but only slightly."""

  def __call__(self, x, positions, cache):
    y, cache = super().__call__(x, positions, cache)
    return y * 1.01, cache


class Unimplemented(MLAttention):
  """A layer whose decode kernel does not exist yet."""

  def __call__(self, x, positions, cache):
    if x.shape[1] == 1:
      raise NotImplementedError("decode kernel not written yet")
    return super().__call__(x, positions, cache)


def rows_by(results):
  return {(r["prompt_len"], r["impl"]): r for r in results["rows"]}


def parse_table(text):
  """First markdown table of text -> (header, rows) with cells stripped."""
  lines = [l for l in text.split("\n\n")[0].splitlines() if l.startswith("|")]
  split = lambda l: [c.strip() for c in l.strip("|").split("|")]
  assert set(lines[1].replace("|", "").split()) <= {"---", "---:"}
  return split(lines[0]), [split(l) for l in lines[2:]]


def test_cli_end_to_end_writes_table_json_plot(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "experiments.main", "--config=configs/tg_sweep.py",
         "--config.num_layers=2", f"--config.mla_overrides={TINY}",
         "--config.prompt_lengths=(8,20)", "--config.n_gen=3", "--config.reps=2",
         "--config.impls=standard/xla,absorbed/xla", "--config.compare=absorbed/xla vs standard/xla",
         "--config.prefill_chunk=8", f"--workdir={workdir}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "tg3@pp20" in proc.stdout and "elapsed" in proc.stdout  # table and progress printed

  results = json.loads((workdir / "results.json").read_text())
  assert results["status"] == "complete"
  assert results["environment"]["device_kind"] and results["environment"]["jax"]
  assert results["config"]["mla_overrides"] == TINY and results["mla_config"]["num_heads"] == 2
  cells = rows_by(results)
  for n in (8, 20):
    for impl in ("standard/xla", "absorbed/xla"):
      row = cells[(n, impl)]
      assert row["status"] == "ok", row
      assert len(row["tg_s"]) == 2 and all(t > 0 for t in row["tg_s"])
      np.testing.assert_allclose(row["tg_tps"], [3 / t for t in row["tg_s"]])
      assert row["pp_tps"] > 0
  assert results["implementations"]["absorbed/xla"]["gate_rel_err"] < 1e-3

  header, table = parse_table((workdir / "table.md").read_text())
  assert header == ["model", "test", "t/s (standard/xla)", "t/s (absorbed/xla)", "Speedup"]
  assert [r[1] for r in table] == ["tg3@pp8", "tg3@pp20"]
  for (n, std_cell, abs_cell, speedup), n_expected in zip([r[1:] for r in table], (8, 20)):
    mean = float(abs_cell.split("±")[0])
    assert mean == pytest.approx(cells[(n_expected, "absorbed/xla")]["tg_tps_mean"], rel=1e-2)
    assert float(speedup) == pytest.approx(mean / float(std_cell.split("±")[0]), rel=2e-2)

  image = matplotlib.image.imread(workdir / "plot.png")
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_gate_rejects_a_wrong_implementation(tmp_path, monkeypatch):
  monkeypatch.setitem(model.LAYERS, "perturbed", lambda cfg, **kw: Perturbed(cfg, "absorbed", **kw))
  config = tiny_config(impls="standard/xla,absorbed/xla,perturbed/xla",
                       compare="absorbed/xla vs standard/xla,perturbed/xla vs standard/xla")
  results = sweep.run(config, str(tmp_path), "tiny")
  cells = rows_by(results)
  for n in (8, 24):
    assert cells[(n, "absorbed/xla")]["status"] == "ok"
    assert cells[(n, "perturbed/xla")]["status"] == "failed"
    assert "tg_tps" not in cells[(n, "perturbed/xla")]
  info = results["implementations"]["perturbed/xla"]
  assert info["state"] == "failed" and info["gate_rel_err"] > info["gate_rtol"]
  assert results["implementations"]["absorbed/xla"]["gate_rel_err"] < info["gate_rtol"]
  header, table = parse_table((tmp_path / "table.md").read_text())
  column = header.index("t/s (perturbed/xla)")
  assert [r[column] for r in table] == ["failed", "failed"]
  assert "perturbed/xla: failed; gate rel err" in (tmp_path / "table.md").read_text()


def test_missing_kernel_and_unknown_option_are_reported_not_timed(tmp_path, monkeypatch):
  monkeypatch.setitem(model.LAYERS, "unwritten",
                      lambda cfg, **kw: Unimplemented(cfg, "absorbed", **kw))
  config = tiny_config(impls="standard/xla,unwritten/xla,absorbed/xla:no_such_option=1",
                       compare="unwritten/xla vs standard/xla", prompt_lengths=(8,))
  results = sweep.run(config, str(tmp_path), "tiny")
  cells = rows_by(results)
  assert cells[(8, "standard/xla")]["status"] == "ok"
  assert cells[(8, "unwritten/xla")]["status"] == "not available"
  assert "NotImplementedError" in results["implementations"]["unwritten/xla"]["reason"]
  assert cells[(8, "absorbed/xla:no_such_option=1")]["status"] == "unsupported"
  _, table = parse_table(report.markdown(results))
  assert table[0][3:] == ["not available", "unsupported", ""]


def test_int8_cache_option_runs_under_its_own_tolerance(tmp_path):
  config = tiny_config(impls="standard/xla,absorbed/xla:cache=int8", compare="",
                       prompt_lengths=(8,))
  results = sweep.run(config, str(tmp_path), "tiny")
  info = results["implementations"]["absorbed/xla:cache=int8"]
  assert info["state"] == "ok" and info["gate_rtol"] == config.gate_rtol["int8"]
  assert 0 < info["gate_rel_err"] < info["gate_rtol"]  # int8 rounding is visible, and bounded


def test_time_budget_skips_long_prompts(tmp_path):
  config = tiny_config(impls="standard/xla", compare="", prompt_lengths=(8, 1 << 20),
                       time_budget_s=1e-3)
  results = sweep.run(config, str(tmp_path), "tiny")
  cells = rows_by(results)
  assert cells[(8, "standard/xla")]["status"] == "ok"
  assert cells[(1 << 20, "standard/xla")]["status"] == "skipped"
  assert "skipped: time budget" in (tmp_path / "table.md").read_text()


def test_implementation_specs_and_pairs_parse():
  impl = model.Implementation.parse("absorbed/pallas:cache=int8:weight_format=q8_0", "bfloat16")
  assert (impl.layer, impl.backend, impl.cache_dtype) == ("absorbed", "pallas", "int8")
  assert impl.options == (("weight_format", "q8_0"),)
  assert impl.prefill_key == model.Implementation.parse(
      "absorbed/xla:weight_format=q8_0:cache=int8", "float32").prefill_key
  for bad in ("absorbed", "absorbed/xla:cache", "/xla"):
    with pytest.raises(ValueError):
      model.Implementation.parse(bad, "bfloat16")
  names = ["standard/xla", "absorbed/xla"]
  assert report.parse_pairs("absorbed/xla vs standard/xla", names) == [tuple(names[::-1])]
  with pytest.raises(ValueError, match="not in impls"):
    report.parse_pairs("absorbed/cpu vs standard/xla", names)
  cfg = model.mla_config("deepseek_v2_lite", 3, "num_heads=4,q_lora_rank=None")
  assert (cfg.num_layers, cfg.num_heads, cfg.q_lora_rank, cfg.hidden_size) == (3, 4, None, 2048)


def test_progress_predicts_prefill_quadratic_and_decode_linear():
  progress = Progress([100, 200, 400], n_gen=0)
  progress.begin(100)
  progress.history.append((100, 1.0, 2.0, 3.0))  # compile, prefill, decode seconds at N=100
  assert progress.predict(200) == pytest.approx(1.0 + 2.0 * 4 + 3.0 * 2)
  assert progress.eta() is None
  progress.begin(200)
  progress.history.append((200, 1.0, 5.0, 4.0))  # prefill 1 + 1e-4·N², decode 2 + N/100
  assert progress.predict(400) == pytest.approx(1.0 + 17.0 + 6.0)
  assert progress.eta() == pytest.approx(progress.predict(400))


@pytest.mark.parametrize("dtype,cache,key", [("float32", "float32", "float32"),
                                             ("float32", "bfloat16", "bfloat16"),
                                             ("bfloat16", "int8", "int8")])
def test_gate_tolerance_follows_the_least_precise_dtype(dtype, cache, key):
  config = tiny_config(dtype=dtype)
  impl = model.Implementation.parse(f"absorbed/xla:cache={cache}", "float32")
  assert sweep._gate_rtol(config, impl) == (key, config.gate_rtol[key])  # pylint: disable=protected-access
  assert jnp.dtype(key)  # every key names a dtype
