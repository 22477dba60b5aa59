"""The experiment runner: the tg sweep on a tiny MLA stack end to end through the CLI (the table,
JSON and plot it writes, the correctness gate that a perturbed implementation must fail,
unavailable kernels), the kernel benchmarks on a CPU in interpret mode, the help text, the shared
harness and publishing results into a README."""

import io
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from configs import batched_gemv, tg_sweep
from experiments import (EXPERIMENTS, bench_gemv, config_doc, decode_step, harness, model, publish,
                         report, sweep)
from experiments.progress import Progress
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
  blocks = [b for b in text.split("\n\n") if b.lstrip().startswith("|")]
  lines = [l for l in blocks[0].splitlines() if l.startswith("|")]
  split = lambda l: [c.strip() for c in l.strip("|").split("|")]
  assert set(lines[1].replace("|", "").split()) <= {"---", "---:"}
  return split(lines[0]), [split(l) for l in lines[2:]]


def test_cli_end_to_end_writes_table_json_plot(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "experiments.main", "--config=configs/tg_sweep.py",
         "--config.num_layers=2", f"--config.mla_overrides={TINY}",
         "--config.prompt_lengths=(8,20)", "--config.n_gen=3", "--config.reps=2",
         "--config.impls=standard/xla,absorbed/xla",
         "--config.compare=absorbed/xla vs standard/xla",
         "--config.prefill_chunk=8", f"--workdir={workdir}"]
  # JAX_PLATFORMS unset, so that jax probes for a TPU as it does for a user.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "tg3@pp20" in proc.stdout and "elapsed" in proc.stdout  # table and progress printed
  assert "backend 'tpu'" not in proc.stdout + proc.stderr  # the TPU probe's log line is dropped
  assert f"written: {workdir / 'tg_sweep.json'}" in proc.stdout  # says where it wrote

  results = json.loads((workdir / "tg_sweep.json").read_text())
  assert (results["name"], results["kind"], results["status"]) == ("tg_sweep", "tg_sweep",
                                                                   "complete")
  env = results["environment"]
  assert env["device_kind"] and env["jax"] and env["jaxlib"] and env["flax"] and env["python"]
  assert env["command"].startswith("python -m experiments.main --config=configs/tg_sweep.py")
  assert env["git_commit"] and env["started_utc"]
  assert results["config"]["mla_overrides"] == TINY and results["mla_config"]["num_heads"] == 2
  cells = rows_by(results)
  for n in (8, 20):
    for impl in ("standard/xla", "absorbed/xla"):
      row = cells[(n, impl)]
      assert row["status"] == "ok", row
      assert len(row["tg_s"]) == 2 and all(t > 0 for t in row["tg_s"])
      np.testing.assert_allclose(row["tg_tps"], [3 / t for t in row["tg_s"]])
      # in one jit (the tg columns) and dispatched step by step, each timed on its own
      assert len(row["tg_dispatch_s"]) == 2 and row["tg_dispatch_s"] != row["tg_s"]
      np.testing.assert_allclose(row["tg_dispatch_tps"], [3 / t for t in row["tg_dispatch_s"]])
      assert row["pp_tps"] > 0
  assert results["implementations"]["absorbed/xla"]["gate_rel_err"] < 1e-3

  text = (workdir / "tg_sweep.md").read_text()
  assert env["command"] in text and env["device_name"] in text  # the run above its table
  header, table = parse_table(text)
  assert header == ["model", "test", "t/s (standard/xla)", "t/s (absorbed/xla)", "Speedup"]
  assert [r[1] for r in table] == ["tg3@pp8", "tg3@pp20"]
  for (n, std_cell, abs_cell, speedup), n_expected in zip([r[1:] for r in table], (8, 20)):
    mean = float(abs_cell.split("±")[0])
    assert mean == pytest.approx(cells[(n_expected, "absorbed/xla")]["tg_tps_mean"], rel=1e-2)
    # The two modes keep different caches, so they share no prefill and their reps do not
    # alternate: the speedup is the ratio of the means, printed to two decimals.
    a, b = cells[(n_expected, "absorbed/xla")], cells[(n_expected, "standard/xla")]
    assert "standard/xla" not in a["alternated"]
    assert float(speedup) == pytest.approx(np.mean(a["tg_tps"]) / np.mean(b["tg_tps"]), abs=5.1e-3)

  assert "Dispatched: each decode step its own jitted call." in text

  image = matplotlib.image.imread(workdir / "tg_sweep.png")
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_gate_rejects_a_wrong_implementation(tmp_path, monkeypatch):
  monkeypatch.setitem(model.LAYERS, "perturbed",
                      lambda cfg, **kw: Perturbed(cfg, mode="absorbed", **kw))
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
  header, table = parse_table((tmp_path / "tiny.md").read_text())
  column = header.index("t/s (perturbed/xla)")
  assert [r[column] for r in table] == ["failed", "failed"]
  assert "perturbed/xla: failed; gate rel err" in (tmp_path / "tiny.md").read_text()


def test_implementations_of_one_prefill_are_timed_in_alternating_reps(tmp_path, monkeypatch):
  """absorbed/xla and absorbed/cpu decode the same prefilled caches: after each compiles its
  loop, their timed reps alternate, the order rotating every rep; their speedup is the median of
  the per-rep ratios, and the host's load is recorded."""
  calls = []
  decode_loop = model.AttentionStack.decode_loop

  def logged(stack, num_steps):
    loop = decode_loop(stack, num_steps)
    return lambda *args: (calls.append(stack.impl.name), loop(*args))[1]

  monkeypatch.setattr(model.AttentionStack, "decode_loop", logged)
  config = tiny_config(impls="absorbed/xla,absorbed/cpu", compare="absorbed/cpu vs absorbed/xla",
                       gate_reference="absorbed/xla", prompt_lengths=(8,), reps=3)
  results = sweep.run(config, str(tmp_path), "tiny")
  x, c = "absorbed/xla", "absorbed/cpu"
  assert calls == [x, c, x, c, c, x, x, c]  # compiles, then reps 0, 1 (rotated), 2
  rows = {r["impl"]: r for r in results["rows"]}
  assert rows[x]["alternated"] == rows[c]["alternated"] == [x, c]
  ratios = [a / b for a, b in zip(rows[c]["tg_tps"], rows[x]["tg_tps"])]
  header, table = parse_table((tmp_path / "tiny.md").read_text())
  assert table[0][header.index("Speedup")] == f"{sorted(ratios)[1]:.2f}"
  assert len(results["loadavg_before"]) == len(results["loadavg_after"]) == 3
  assert f"host load {results['loadavg_before']} before" in (tmp_path / "tiny.md").read_text()


def test_missing_kernel_and_unknown_option_are_reported_not_timed(tmp_path, monkeypatch):
  monkeypatch.setitem(model.LAYERS, "unwritten",
                      lambda cfg, **kw: Unimplemented(cfg, mode="absorbed", **kw))
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
  assert "skipped: time budget" in (tmp_path / "tiny.md").read_text()


def test_implementation_specs_and_pairs_parse():
  impl = model.Implementation.parse("absorbed/pallas:cache=int8:weight_format=q8_0", "bfloat16")
  assert (impl.layer, impl.backend, impl.cache_dtype) == ("absorbed", "pallas", "int8")
  assert impl.options == (("weight_format", "q8_0"),)
  assert impl.prefill_key == model.Implementation.parse(
      "absorbed/xla:weight_format=q8_0:cache=int8", "float32").prefill_key
  for bad in ("absorbed", "absorbed/xla:cache", "/xla", "absorbd/xla", "absorbed/pallsa",
              "absorbed/xla:cache=int9"):
    with pytest.raises(harness.ConfigError, match="implementation"):
      model.Implementation.parse(bad, "bfloat16")
  names = ["standard/xla", "absorbed/xla"]
  assert report.parse_pairs("absorbed/xla vs standard/xla", names) == [tuple(names[::-1])]
  with pytest.raises(ValueError, match="not in impls"):
    report.parse_pairs("absorbed/cpu vs standard/xla", names)
  cfg = model.mla_config("deepseek_v2_lite", 3, "num_heads=4,q_lora_rank=None")
  assert (cfg.num_layers, cfg.num_heads, cfg.q_lora_rank, cfg.hidden_size) == (3, 4, None, 2048)


@pytest.mark.parametrize("fields,name", [(dict(impls="standard/xla,absorbd/xla"), "absorbd"),
                                         (dict(prompt_lengths=(8, -24)), "prompt_lengths"),
                                         (dict(n_gen=0), "n_gen")])
def test_the_runner_refuses_a_config_that_cannot_run(tmp_path, fields, name):
  """A mistyped implementation or an impossible size stops the run with an error naming it
  (exit status 1), before anything is built or timed."""
  overrides = [f"--config.{k}={v}".replace(" ", "") for k, v in fields.items()]
  proc = subprocess.run([sys.executable, "-m", "experiments.main", "--config=configs/tg_sweep.py",
                         f"--workdir={tmp_path}", *overrides], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and name in last


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
  # pylint: disable-next=protected-access
  assert sweep._gate_rtol(config, impl) == (key, config.gate_rtol[key])
  assert jnp.dtype(key)  # every key names a dtype


def run_cli(*args, timeout=600):
  proc = subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc


KERNEL_RUNS = {
    "decode_kernels": ["--config.heads=(16,)", "--config.shapes=((2,64),)",
                       "--config.interpret=True", "--config.reps=1", "--config.trials=1",
                       "--config.min_trial_s=0", "--config.profile_runs=1",
                       "--config.rotate_bytes=1"],
    "batched_gemv": ["--config.heads=(2,)", "--config.experts=3", "--config.batch_sizes=(1,)",
                     "--config.products=((128,64),)", "--config.weight_formats=(\"q8_0\",)",
                     "--config.timed=(\"pallas\",\"pallas_int8\",\"fma32\")",
                     "--config.interpret=True", "--config.warmup=1", "--config.iters=1",
                     "--config.repeats=1", "--config.rotate_bytes=1", "--config.max_chain=2",
                     "--config.decode_len=32"],
    "cpu_decode": ["--config.seq_lens=(128,)", "--config.formats=(\"bfloat16\",\"int8\")",
                   "--config.seconds_per_case=0", "--config.min_rounds=2", "--config.passes=2",
                   "--config.partial_fills=((256,64),)", "--config.rotate_bytes=1",
                   "--config.bandwidth_bytes=1048576", "--config.gemm_size=64"],
    "parallel_decode": ["--config.num_heads=4", "--config.shapes=((2,64),)",
                        "--config.formats=(\"bf16\",\"int8\")", "--config.impl=cpu",
                        "--config.merge_shapes=((1,4),)", "--config.rounds=1",
                        "--config.calls_per_block=1", "--config.rotate_bytes=1"],
}


def test_batched_gemv_times_xla_over_the_linear_layout():
  """The "xla_out_in" variant times XLA's product over weights stored [N, K], as layers.Linear
  stores them, against the same oracle as the others; it takes bf16 weights of H heads only."""
  config = batched_gemv.get_config()
  config.update(timed=("xla_out_in",), interpret=True, warmup=1, iters=1, repeats=1,
                rotate_bytes=1, max_chain=2)
  rng = np.random.default_rng(0)
  rows = {r["path"]: r for r in bench_gemv._shape(config, 1, 256, 64, 1, "bf16", rng, io.StringIO(),
                                                   with_sweep=False)}
  assert set(rows) == {"xla", "xla_out_in"}
  row = rows["xla_out_in"]
  assert row["ok"] and row["plan"] == "xla, weights [out, in]" and row["us"] > 0, row
  assert rows["xla"]["ok"] and row["weight_bytes"] == rows["xla"]["weight_bytes"] == 256 * 64 * 2
  config.experts = 3  # gathered heads: refused, not timed on the wrong weights
  gathered = bench_gemv._shape(config, 2, 256, 64, 1, "bf16", rng, io.StringIO(), with_sweep=False)
  assert "unsupported" in next(r for r in gathered if r["path"] == "xla_out_in")


@pytest.mark.parametrize("name", sorted(KERNEL_RUNS))
def test_kernel_benchmark_runs_on_cpu_through_the_runner(name, tmp_path):
  """Each benchmark config runs end to end on a CPU with the tiniest shapes (the Pallas kernels in
  interpret mode): correct outputs, the kernel each variant ran, tables and goals written."""
  proc = run_cli(f"--config=configs/{name}.py", *KERNEL_RUNS[name], f"--workdir={tmp_path}")
  results = json.loads((tmp_path / f"{name}.json").read_text())
  assert results["status"] == "complete" and results["rows"]
  assert results["environment"]["command"] in (tmp_path / f"{name}.md").read_text()
  assert f"written: {tmp_path / name}.json" in proc.stdout
  text = (tmp_path / f"{name}.md").read_text()
  assert "| goal | target | measured | holds? |" in text
  rows = results["rows"]
  if name == "decode_kernels":
    assert [r["format"] for r in rows] == ["bf16", "int8"]
    for r in rows:
      assert "error" not in json.dumps(r), r
      assert r["xla_plan"] == "xla" and r["pallas_plan"].startswith("pallas/triton")
      assert r["pallas_rel_err"] < 2e-2 and r["xla_rel_err"] < 2e-2 and r["pallas_us"] > 0
  elif name == "batched_gemv":
    assert [r["path"] for r in rows] == ["xla", "pallas", "pallas_int8", "fma32"]
    for r in rows:  # 2 heads gathered from 3 expert weights: the bytes of 2 read
      assert "error" not in r, r
      assert r["ok"] and r["us"] > 0 and r["kernels"] >= 1 and r["E"] == 3
      assert r["weight_bytes"] == 2 * (128 * 64 + 128 // 32 * 64 * 2)
    fma = next(r for r in rows if r["path"] == "fma32")
    assert "block_n=32" in fma["plan"] and "dot=False" in fma["plan"]
    step = {r["path"]: r for r in results["decode_step"]}
    assert set(step) == {"xla", "xla_gemv+pallas_decode", "fused_gemv+pallas_decode"}
    assert all(r["rel_err"] < 2e-2 and "error" not in r for r in step.values())
  elif name == "parallel_decode":  # a one-device mesh: the CLI's process has one CPU device
    assert [r["format"] for r in rows] == ["bf16", "int8"] and len(results["merge_rows"]) == 1
    for r in rows:
      assert r["devices"] == 1 and r["psum_us"] > 0 and r["gather_us"] > 0
      assert max(r[f"{c}_rel_err"] for c in ("single", "psum", "gather")) < 2e-2
  else:
    assert len(rows) == 2 and len(results["partial_fills"]) == 1
    for r in rows + results["partial_fills"]:
      assert max(r[f"{i}_rel_err"] for i in ("einsum", "head_parallel", "shard")) < 2e-2
      assert r["plan"].startswith("cpu") and r["shard_ms"] > 0 and r["rounds"] == 2
    assert [(r["S"], r["length"]) for r in results["partial_fills"]] == [(256, 64)]
    assert (tmp_path / "cpu_decode.png").exists()


def test_help_lists_config_fields_with_their_comments():
  proc = subprocess.run([sys.executable, "-m", "experiments.main", "--helpfull",
                         "--config=configs/tg_sweep_gpu.py"], cwd=ROOT, capture_output=True,
                        text=True, timeout=60)
  text = proc.stdout
  assert "--config.prompt_lengths" in text
  assert "pp: prompt lengths N, one table row each" in text  # inherited from configs/tg_sweep.py
  assert "attention layers in the stack (all of V2-Lite's)" in text  # its own comment
  assert "layer/backend[:key=value...]" in text and "absorbed/pallas:cache=int8" in text
  assert "--publish" in text
  proc = subprocess.run([sys.executable, "-m", "experiments.main", "--help"], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  for name, what in config_doc.available():
    assert re.search(rf"configs/{name}\.py +{re.escape(what)}\n", proc.stdout), name


def test_every_config_loads_by_path_and_documents_every_field():
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  names = [name for name, _ in config_doc.available()]
  assert {"tg_sweep", "tg_sweep_gpu", "decode_kernels", "batched_gemv", "cpu_decode"} <= set(names)
  for name in names:
    path = str(ROOT / "configs" / f"{name}.py")
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", path, flag_values=values)
    values(["prog"])
    config = values.config
    assert config.kind in EXPERIMENTS, name
    assert config_doc.title(path), name
    comments = config_doc.field_comments(path)
    undocumented = [k for k in config.keys() if not comments.get(k)]
    assert not undocumented, (name, undocumented)
    assert "seed" in config, name  # fixed seeds: a rerun draws the same inputs


def test_harness_error_rotation_and_goals():
  ref = np.arange(1.0, 5.0)
  assert harness.rel_err(ref * (1 + 1e-3), ref) == pytest.approx(1e-3)
  assert np.isnan(harness.rel_err([1.0, np.nan, 3.0, 4.0], ref))
  assert harness.num_sets(100, 1000, max_sets=64) == 10
  assert harness.num_sets(10 ** 9, 1000, min_sets=4, max_sets=64) == 4
  assert harness.num_sets(1, 10 ** 9, max_sets=64) == 64
  rows = [{"H": 16, "fmt": "bf16", "path": "xla", "us": 4.0},
          {"H": 16, "fmt": "bf16", "path": "pallas", "us": 2.0},
          {"H": 16, "fmt": "q8_0", "path": "xla", "us": 9.0},
          {"H": 16, "fmt": "q8_0", "path": "pallas", "us": 3.0}]
  speedup = "min(other(r, path='xla')['us'] / r['us'] for r in rows(path='pallas'))"
  assert harness.goal_value(speedup, rows, keys=("H", "fmt")) == 2.0
  goals = [("a", "worst speedup", speedup, ">=", 2.0),
           ("b", "q8_0 time", "row(fmt='q8_0', path='pallas')['us']", "<=", 2.5),
           ("c", "absent", "row(fmt='iq4_nl', path='pallas')['us']", "<=", 1.0)]
  _, table = parse_table(harness.goals_table(goals, rows, keys=("H", "fmt")))
  assert [r[2:] for r in table] == [["2", "yes"], ["3", "no"], ["not in this run", "-"]]


def test_timer_measures_wall_time_per_call_over_rotated_sets():
  sets = harness.copies((jnp.ones((64, 64)),), 3)
  calls = []
  fn = lambda a: calls.append(1) or a @ a  # traced once per set of the fused call
  timer = harness.Timer(fn, sets, ordered=True)
  assert timer.calls_per_run == 3 and len(calls) == 3
  us, samples = timer.wall(reps=2, trials=3)
  assert len(samples) == 3 and us == sorted(samples)[1] and us > 0
  assert timer.device() is None or jax_backend() == "gpu"
  single = harness.Timer(lambda a: a + 1, sets, fused=False)
  got = harness.interleave({"x": single, "y": harness.Timer(lambda a: a * 2, sets, fused=False)},
                           rounds=2, calls_per_block=3)
  assert {k: len(v) for k, v in got.items()} == {"x": 6, "y": 6}


def jax_backend():
  import jax  # pylint: disable=import-outside-toplevel
  return jax.default_backend()


def test_plan_variant_overrides_the_planned_tuning():
  from mla_jax import ops  # pylint: disable=import-outside-toplevel
  args = (jax_struct((1, 4, 64)), jax_struct((1, 4, 16)), jax_struct((1, 512, 64)),
          jax_struct((1, 512, 16)), jax_struct((1,), jnp.int32))
  default, _ = harness.plan_variant(ops.decode.plan, args, {"impl": "cpu"})
  plan, options = harness.plan_variant(ops.decode.plan, args,
                                       {"impl": "cpu", "tuning": {"shard_size": 64}})
  assert plan.kernel == "cpu" and plan.tuning.shard_size == 64
  assert options["tuning"] == plan.tuning
  assert plan.tuning.shards_per_step == default.tuning.shards_per_step  # the rest as planned
  gemv_args = (jax_struct((1, 2, 128)), jax_struct((2, 128, 64)))
  if ops.device.is_hopper():  # the Mosaic kernel runs compiled there
    assert harness.plan_variant(ops.gemv.plan, gemv_args, {"lowering": "mosaic"})[0].kernel == \
        "mosaic"
  else:
    with pytest.raises(ValueError, match="Mosaic GPU kernel needs a Hopper GPU"):
      harness.plan_variant(ops.gemv.plan, gemv_args, {"lowering": "mosaic"})


def jax_struct(shape, dtype=jnp.bfloat16):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.ShapeDtypeStruct(shape, dtype)


def test_publish_copies_a_run_and_regenerates_index_and_readme(tmp_path):
  workdir, results_dir = tmp_path / "run", tmp_path / "results"
  config = tiny_config(impls="standard/xla,absorbed/xla", compare="absorbed/xla vs standard/xla",
                       prompt_lengths=(8,), plot=False)
  results = sweep.run(config, str(workdir), "tg_sweep")
  readme = tmp_path / "README.md"
  readme.write_text("# Title\n\nintro\n\n<!-- results:tg_sweep -->\nstale table\n"
                    "<!-- /results:tg_sweep -->\n\nmiddle\n\n<!-- results:decode_kernels -->\n"
                    "hand-written, no results file yet\n<!-- /results:decode_kernels -->\nend\n")
  (results_dir).mkdir()
  (results_dir / "tg_sweep.png").write_text("a plot of an older run")
  written = publish.publish(str(workdir), "tg_sweep", str(results_dir), str(readme))
  assert {os.path.basename(p) for p in written} == {"tg_sweep.json", "tg_sweep.md", "README.md"}
  assert not (results_dir / "tg_sweep.png").exists()  # this run made none: no stale plot
  assert json.loads((results_dir / "tg_sweep.json").read_text()) == json.loads(
      json.dumps(results))

  text = readme.read_text()
  env = results["environment"]
  run_line = (f"{env['device_name']}, commit {env['git_commit'][:10]}"
              f"{' (dirty)' if env['git_dirty'] else ''}, {env['started_utc'][:10]}: "
              f"`{env['command']}`")
  assert text.startswith("# Title\n\nintro\n\n<!-- results:tg_sweep -->\n" + run_line + "\n\n|")
  assert "stale table" not in text and "hand-written, no results file yet" in text
  assert text.endswith("<!-- /results:decode_kernels -->\nend\n")
  header, table = parse_table(text)
  assert header[:4] == ["model", "test", "t/s (standard/xla)", "t/s (absorbed/xla)"]
  assert [r[1] for r in table] == ["tg3@pp8"]
  assert publish.update_readme(str(readme), str(results_dir)) == ["tg_sweep"]
  assert readme.read_text() == text  # regenerating from the JSON changes nothing

  index = (results_dir / "README.md").read_text()
  _, lines = parse_table(index)
  assert len(lines) == 1
  assert lines[0][0] == "[tg_sweep](tg_sweep.md)" and lines[0][2] == f"`{env['command']}`"
  assert lines[0][3:5] == [env["device_name"], env["started_utc"][:10]]
  assert lines[0][5].startswith(env["git_commit"][:10])


def test_decode_step_runs_gated_and_counts_kernels(tmp_path):
  """The decode-step benchmark on a CPU-sized stack: the gate passes against float32, every row
  has a time, a floor from the weight and cache bytes, and the compiled step's kernels."""
  from configs import decode_step_gpu  # pylint: disable=import-outside-toplevel
  from experiments import decode_step  # pylint: disable=import-outside-toplevel
  config = decode_step_gpu.get_config()
  config.update(dict(num_layers=2, mla_overrides=TINY, impls="absorbed/xla", batch_sizes=(1,),
                     prompt_lengths=(40,), n_gen=3, reps=2, dispatch_steps=2, gate_prompt_len=8,
                     dtype="float32", param_dtype="float32", cache_dtype="float32"))
  results = decode_step.run(config, str(tmp_path), name="tiny")
  [row] = results["rows"]
  assert results["status"] == "complete" and "skipped" not in row, row
  assert row["gate_ok"] and 0 < row["gate_rel_err"] < 1e-3
  assert row["us_per_token"] > 0 and row["us_per_token_dispatch"] > 0
  # dispatched: one round of dispatch_steps calls a rep, the median round reported
  assert len(row["us_per_token_dispatch_samples"]) == 2
  assert row["us_per_token_dispatch"] == np.median(row["us_per_token_dispatch_samples"])
  assert row["cache_bytes"] == 2 * 40 * (32 + 8) * 4  # 2 layers, 40 rows of c_kv and k_rope
  assert row["floor_us"] == pytest.approx((row["weight_bytes"] + row["cache_bytes"]) / 4e6)
  assert row["kernels_per_layer"] >= 1
  page = (tmp_path / "tiny.md").read_text()
  assert "| absorbed/xla | 1 | 40 |" in page and "over 2, median of 2 such rounds;" in page
  if jax.default_backend() == "gpu":  # the traced loop call: its kernels' time, by kernel
    assert row["device_us_per_token"] > 0
    assert 0 < len(row["kernel_us_per_token"]) <= decode_step.TRACED_KERNELS
    assert "longest kernels of each traced loop" in page
  else:
    assert "device_us_per_token" not in row and "kernel_us_per_token" not in row


def test_decode_step_lists_the_longest_kernels_of_each_traced_row():
  """The markdown names each traced row's longest kernels, longest first, µs a token; rows
  without a trace (no GPU) add nothing."""
  kernels = {f"k{i}": 10.0 - i for i in range(10)}
  rows = [{"impl": "absorbed/pallas", "batch": 1, "prompt_len": 128,
           "kernel_us_per_token": kernels}, {"impl": "standard/xla", "batch": 1, "prompt_len": 128}]
  lines = decode_step.kernel_lines(rows)
  assert len(lines) == 3 and lines[-1].startswith("- absorbed/pallas B=1 pp128: k0 10.0, k1 9.0")
  assert lines[-1].endswith("k7 3.0")
  assert decode_step.kernel_lines(rows[1:]) == []


def test_decode_step_table_has_a_device_column_only_for_traced_runs():
  row = {"impl": "absorbed/pallas", "batch": 1, "prompt_len": 128, "us_per_token": 800.0,
         "floor_us": 200.0, "x_floor": 4.0, "kernels_per_layer": 7.0,
         "us_per_token_dispatch": 900.0, "gate_rel_err": 1e-2}
  skipped = {"impl": "standard/xla", "batch": 8, "prompt_len": 65536, "skipped": "too large",
             "gate_rel_err": 1e-2}
  plain = decode_step.table({"rows": [row, skipped]}).splitlines()
  traced = decode_step.table({"rows": [{**row, "device_us_per_token": 700.0}, skipped]})
  traced = traced.splitlines()
  assert "device" not in plain[0] and "| device µs/token |" in traced[0]
  assert "| 800.0 | 700.0 | 200.0 |" in traced[2]
  assert all(line.count("|") == plain[0].count("|") for line in plain)
  assert all(line.count("|") == traced[0].count("|") for line in traced)


def test_device_trace_returns_the_result_and_on_a_gpu_the_kernels_time():
  device, out = harness.device_trace(lambda: jnp.cumsum(jnp.arange(1 << 16) % 7))
  assert int(out[-1]) == sum(i % 7 for i in range(1 << 16))
  if jax.default_backend() == "gpu":
    assert device is not None and device.us > 0 and device.kernels >= 1
  else:
    assert device is None


def test_decode_step_times_the_named_shapes_or_every_pair():
  """config.shapes names the (batch, prompt length) pairs; left empty, every pair is timed."""
  from configs import decode_step_gpu  # pylint: disable=import-outside-toplevel
  config = decode_step_gpu.get_config()
  config.update(dict(batch_sizes=(1, 8), prompt_lengths=(128, 16384)))
  assert decode_step.shapes(config) == [(1, 128), (1, 16384), (8, 128), (8, 16384)]
  config.shapes = ((1, 128), (8, 16384))
  assert decode_step.shapes(config) == [(1, 128), (8, 16384)]


def test_run_status_marks_a_run_complete_interrupted_or_neither():
  """A loop that ends is complete; one stopped by Ctrl-C (or SIGTERM) is interrupted, and the
  interrupt stops there; any other error leaves the status as it was and goes on up."""
  for body, status in [(lambda: None, "complete"), (_interrupt, "interrupted")]:
    results = {"status": "running"}
    with harness.run_status(results):
      body()
    assert results["status"] == status and results["elapsed_s"] >= 0
  results = {"status": "running"}
  with pytest.raises(ValueError), harness.run_status(results):
    raise ValueError("a bug")
  assert results["status"] == "running" and "elapsed_s" in results


def _interrupt():
  raise KeyboardInterrupt


def test_kernel_count_sees_kernels_with_several_outputs():
  """A kernel with a tuple of outputs (a Pallas call, a multi-output fusion) counts once, as a
  single-output one does; parameters, tuples and bitcasts count for nothing."""
  text = """HloModule m

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p)
}

ENTRY %main (a: f32[4], b: f32[8]) -> (f32[4], f32[8]) {
  %a = f32[4]{0} parameter(0)
  %b = f32[8]{0} parameter(1)
  %pallas_call.1 = (f32[4]{0}, f32[8]{0}) custom-call(%a, %b), custom_call_target="t"
  %gte = f32[4]{0} get-tuple-element(%pallas_call.1), index=0
  %fusion = f32[4]{0} fusion(%gte), kind=kLoop, calls=%fused
  %copy = f32[8]{0} copy(%b)
  %bc = f32[2,2]{1,0} bitcast(%fusion)
  ROOT %t = (f32[4]{0}, f32[8]{0}) tuple(%fusion, %copy)
}
"""
  assert decode_step.kernels(text) == {"custom-call": 1, "fusion": 1, "copy": 1}


def test_gate_compares_quantized_weights_with_the_same_weights_in_float(tmp_path):
  """An implementation with q8_0 weights passes the float32 gate: it is compared with the
  reference holding its weights rounded through q8_0 (against the unrounded reference, the
  quantization alone exceeds the float32 tolerance: the gate failed so before)."""
  config = tiny_config(impls="standard/xla,absorbed/xla:weight_format=q8_0", compare="",
                       prompt_lengths=(8,), mla_overrides=TINY.replace(
                           "qk_nope_head_dim=16", "qk_nope_head_dim=32"))  # K: GGML blocks of 32
  results = sweep.run(config, str(tmp_path), "tiny")
  row = rows_by(results)[(8, "absorbed/xla:weight_format=q8_0")]
  assert row["status"] == "ok", row


def test_model_benchmark_runs_the_whole_model(tmp_path):
  """configs/model_cpu.py on a 2-layer model (one dense layer, one MoE): pp and tg rows, the
  generated tokens, the table."""
  from configs import model_cpu  # pylint: disable=import-outside-toplevel
  from experiments import bench_model  # pylint: disable=import-outside-toplevel
  config = model_cpu.get_config()
  config.update(dict(model_overrides=TINY + ",num_layers=2,vocab_size=64,intermediate_size=32,"
                     "moe_intermediate_size=16,n_routed_experts=4,num_experts_per_tok=2",
                     impls="absorbed/xla,standard/xla", compare="absorbed/xla vs standard/xla",
                     prompt_lengths=(8,), n_gen=3, reps=1))
  results = bench_model.run(config, str(tmp_path), name="tiny")
  rows = {r["impl"]: r for r in results["rows"]}
  row = rows["absorbed/xla"]
  assert results["status"] == "complete" and row["tokens_agree"] == 1.0
  assert row["alternated"] == ["absorbed/xla", "standard/xla"]  # the CPU config alternates
  assert row["pp_tps"] > 0 and row["tg_tps"] > 0 and np.shape(row["tokens"]) == (1, 3)
  assert row["x_floor"] == pytest.approx(row["tg_s"] / 3 * 1e6 / row["floor_us"])
  text = (tmp_path / "tiny.md").read_text()
  assert "| absorbed/xla | tg3@pp8 |" in text
  speedup = rows["absorbed/xla"]["tg_tps"] / rows["standard/xla"]["tg_tps"]
  assert "| t/s (standard/xla) | t/s (absorbed/xla) | Speedup |" in text
  assert f"| {speedup:.2f} |" in text
  assert (tmp_path / "tiny.png").stat().st_size > 0
  if jax.default_backend() == "gpu":  # one more tg call traced: its kernels' time, by kernel
    assert row["device_us_per_token"] > 0 and row["kernels_per_token"] >= 1
    assert 0 < len(row["kernel_us_per_token"]) <= decode_step.TRACED_KERNELS
    assert "longest kernels of each traced loop" in text
  else:
    assert "device_us_per_token" not in row and "longest kernels" not in text


def test_model_benchmark_alternates_the_implementations_reps(tmp_path, monkeypatch):
  """config.alternate: after each implementation's untimed calls, their timed reps alternate, the
  order rotating every rep (a pp call, then a tg call, each rep)."""
  from configs import model_cpu  # pylint: disable=import-outside-toplevel
  from experiments import bench_model  # pylint: disable=import-outside-toplevel
  import mla_jax  # pylint: disable=import-outside-toplevel
  calls, generate_fn = [], mla_jax.generate_fn

  def logged(lm, n, **kwargs):
    run = generate_fn(lm, n, **kwargs)

    def logged_run(*args, **run_kwargs):
      calls.append((id(lm), n))
      return run(*args, **run_kwargs)

    return logged_run

  monkeypatch.setattr(mla_jax, "generate_fn", logged)
  config = model_cpu.get_config()
  config.update(dict(model_overrides=TINY + ",num_layers=1,vocab_size=64,intermediate_size=32",
                     impls="absorbed/xla,standard/xla", compare="absorbed/xla vs standard/xla",
                     prompt_lengths=(8,), n_gen=2, reps=3))
  results = bench_model.run(config, str(tmp_path), name="tiny")
  timed = calls[:16]  # a GPU then traces one more tg call of each
  models = list(dict.fromkeys(lm for lm, _ in timed))
  order = [models.index(lm) for lm, n in timed if n == 1]  # the pp calls, one a run
  assert order == [0, 1, 0, 1, 1, 0, 0, 1]  # untimed, then reps 0, 1 (rotated), 2
  assert [n for _, n in timed] == [1, 2] * 8
  a, b = ({r["impl"]: r for r in results["rows"]}[name] for name in ("absorbed/xla",
                                                                      "standard/xla"))
  ratios = sorted(tb / ta for ta, tb in zip(a["tg_s_reps"], b["tg_s_reps"]))  # paired by rep
  assert len(ratios) == 3 and bench_model.speedup(a, b) == ratios[1]
  assert f"| {ratios[1]:.2f} |" in (tmp_path / "tiny.md").read_text()


def test_model_floor_counts_one_embedding_row_and_the_chosen_experts():
  """active_weight_bytes against a count written here from the parameter shapes: a B=1 step
  reads every weight once, one embedding row, and k of the E routed experts of each MoE layer."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import mla_jax  # pylint: disable=import-outside-toplevel
  from experiments import bench_model  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(
      mla_jax.ModelConfig.deepseek_v2_lite(), hidden_size=64, num_heads=2, kv_lora_rank=32,
      qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_layers=2, vocab_size=100,
      intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1,
      num_experts_per_tok=2, first_k_dense_replace=1)
  lm = mla_jax.CausalLM(cfg, rngs=nnx.Rngs(0))
  D, f = 64, 4  # float32
  attention = (D * 2 * (32 + 16) + D * (32 + 16) + 32 + 2 * 32 * 32 * 2 + 2 * 32 * D) * f
  dense = 3 * D * 48 * f
  shared = 3 * D * 24 * f
  experts = 3 * D * 24 * f  # one expert's three projections
  norms = (2 * 2 + 1) * D * f
  want = (2 * attention + dense + shared + D * 8 * f + norms + D * f  # embedding: one row
          + 100 * D * f)  # lm_head
  assert bench_model.active_weight_bytes(lm, 1) == want + 2 * experts
  assert bench_model.active_weight_bytes(lm, 3) == want + 2 * D * f + 6 * experts
  assert bench_model.active_weight_bytes(lm, 8) == want + 7 * D * f + 8 * experts


def test_kernel_sweep_checks_every_case_and_records_failures(tmp_path, monkeypatch):
  """configs/kernel_sweep_gpu.py interpreted on two paths: every case passes; a decode that
  negates one row is recorded as that path's failure, with the case that redraws it."""
  from configs import kernel_sweep_gpu  # pylint: disable=import-outside-toplevel
  from experiments import kernel_sweep  # pylint: disable=import-outside-toplevel
  config = kernel_sweep_gpu.get_config()
  config.update(dict(cases=2, paths="triton,triton_bf16"))
  results = kernel_sweep.run(config, str(tmp_path), name="sweep")
  assert [(r["path"], r["cases"], r["failures"]) for r in results["rows"]] == [
      ("triton", 2, []), ("triton_bf16", 2, [])]
  assert "| decode | triton | 2 | 0 |" in (tmp_path / "sweep.md").read_text()

  real = kernel_sweep.decode.mla_decode
  def off(*args, **kwargs):  # the first row that holds a token, negated
    out, lse = real(*args, **kwargs)
    b = int(np.argmax(np.asarray(args[4]) > 0))
    return out.at[b].multiply(-1), lse
  monkeypatch.setattr(kernel_sweep.decode, "mla_decode", off)
  config.update(dict(paths="triton", seed=3))
  [row] = kernel_sweep.run(config, str(tmp_path), name="sweep")["rows"]
  failed = [f for f in row["failures"] if f["errors"][0].startswith("row ")]
  assert failed and set(failed[0]["case"]) >= {"B", "H", "S", "lengths", "fill", "seed"}


def test_kernel_sweep_in_worker_processes_gives_the_same_rows(tmp_path):
  """Paths run in spawned worker processes give the rows that one process gives, in the
  families' order, each path drawing the same cases wherever it runs."""
  from configs import kernel_sweep_gpu  # pylint: disable=import-outside-toplevel
  from experiments import kernel_sweep  # pylint: disable=import-outside-toplevel
  config = kernel_sweep_gpu.get_config()
  config.update(dict(cases=1, paths="triton_bf16,triton", seed=5))
  alone = kernel_sweep.run(config, str(tmp_path / "one"), name="sweep")["rows"]
  config.workers = 2
  spread = kernel_sweep.run(config, str(tmp_path / "two"), name="sweep")["rows"]
  assert [r["path"] for r in spread] == ["triton", "triton_bf16"]
  assert spread == alone


@pytest.mark.parametrize("field,value,message", [("paths", "triton,tritn", "'tritn'"),
                                                 ("cases", 0, "cases=0"),
                                                 ("workers", 0, "workers=0")])
def test_kernel_sweep_refuses_bad_configs(tmp_path, field, value, message):
  from configs import kernel_sweep_gpu  # pylint: disable=import-outside-toplevel
  from experiments import kernel_sweep  # pylint: disable=import-outside-toplevel
  config = kernel_sweep_gpu.get_config()
  config[field] = value
  with pytest.raises(harness.ConfigError, match=message):
    kernel_sweep.run(config, str(tmp_path), name="sweep")
