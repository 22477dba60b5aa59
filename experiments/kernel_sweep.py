"""A seeded random sweep of cases through every GPU kernel path, against float64 oracles.

Decode (ops.mla_decode, impl "pallas"), each kernel forced on cases drawn where it runs: the
Triton kernel, Mosaic GPU's few-heads kernel (float caches), its int8 kernel and its many-heads
kernel. A case draws the batch, heads, cache length, C/R, the cache format, the row lengths (0,
1, S, tile edges ±1 and in between), the logit scale (to ±1e4) and what fills the slots past
each length (NaN, ±Inf or stale values, which must never reach the result). GEMV
(ops.batched_gemv, impl "pallas"): the Triton and Mosaic kernels over bf16, q8_0 and iq4_nl
weights, against x·w with the weights dequantized. Grouped matmul (ops.grouped_matmul, impl
"pallas"), float32 and bf16: group sizes with empty and negative ones, rows in no group and sizes
past the rows, against each row times its group's weight.

Per path: cases, failures, and the worst error over its tolerance; failing cases are kept whole
(their seeds redraw them). tests/test_fuzz.py draws its cases with hypothesis and checks them with
the same inputs, oracle and tolerance (make_decode_inputs, decode_oracle, decode_tolerance).
Without a GPU the kernels run interpreted (a smoke run: few cases), and the Mosaic paths only
where Mosaic's interpret mode runs them.
"""

from __future__ import annotations

from concurrent import futures
import multiprocessing
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax import quant
from mla_jax import ops
from mla_jax.ops import decode, gemv

from experiments import harness

KIND = "kernel_sweep"
EDGES = (1, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513)  # tiles (64) and shards
FILLS = ("nan", "inf", "-inf", "stale")
# Where each decode kernel runs (its unsupported() rules): heads, formats, C/R, cache lengths.
DECODE_PATHS = {
    "triton": dict(lowering="triton", H=(1, 3, 16, 40, 128), fmt=("float32", "bfloat16", "int8"),
                   CR=((128, 32), (512, 64)), S=(70, 600, 4096)),
    "mosaic": dict(lowering="mosaic", H=(1, 5, 16, 20, 32), fmt=("bfloat16", "float16"),
                   CR=((512, 64), (256, 32)), S=(64, 704, 4096)),
    "mosaic_int8": dict(lowering="mosaic", H=(1, 16, 32), fmt=("int8",), CR=((512, 64),),
                        S=(64, 704, 4096)),
    "mosaic_heads": dict(lowering="mosaic", H=(33, 64, 128), fmt=("bfloat16", "float16"),
                         CR=((512, 64),), S=(64, 704, 4096)),
}
GEMV_PATHS = {f"{lowering}_{fmt}": dict(lowering=lowering, fmt=fmt)
              for lowering in ("triton", "mosaic") for fmt in ("bf16", "q8_0", "iq4_nl")}
GROUPED_PATHS = {"grouped_float32": dict(dtype="float32", tol=2e-5),
                 "grouped_bfloat16": dict(dtype="bfloat16", tol=2e-2)}


def make_decode_inputs(B, H, S, C, R, fmt, lengths, logit, fill, seed):
  """(q_latent, q_rope, c_kv, k_rope, lengths): queries scaled so that scores reach about
  ±logit, the cache poisoned past each row's length with `fill`."""
  rng = np.random.default_rng(seed)
  dtype = jnp.bfloat16 if fmt == "int8" else jnp.dtype(fmt)
  scale = logit / np.sqrt(C + R)
  q_latent = jnp.asarray(rng.standard_normal((B, H, C)) * scale, dtype)
  q_rope = jnp.asarray(rng.standard_normal((B, H, R)) * scale, dtype)
  c_kv = rng.standard_normal((B, S, C)).astype(np.float32)
  k_rope = rng.standard_normal((B, S, R)).astype(np.float32)
  stale = np.arange(S)[None, :] >= np.asarray(lengths, np.int64).reshape(B, 1)
  value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "stale": 1e4}[fill]
  k_rope[stale] = value
  if fmt == "int8":
    cache = quant.quantize_rows(jnp.asarray(c_kv))
    values, scales = np.asarray(cache.values), np.asarray(cache.scales).copy()
    scales[stale] = value
    c_kv = quant.Int8Rows(jnp.asarray(values), jnp.asarray(scales))
  else:
    c_kv[stale] = value
    c_kv = jnp.asarray(c_kv, dtype)
  return q_latent, q_rope, c_kv, jnp.asarray(k_rope, dtype), jnp.asarray(lengths, jnp.int32)


def decode_oracle(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale):
  """float64 softmax over each row's first lengths[b] slots (out 0, lse -inf when empty), and
  the largest |score| seen."""
  if isinstance(c_kv, quant.Int8Rows):
    with np.errstate(invalid="ignore"):  # 0·NaN in stale slots, never read below
      c = np.asarray(c_kv.values, np.float64) * np.asarray(c_kv.scales, np.float64)[..., None]
  else:
    c = np.asarray(c_kv, np.float64)
  q, qr, kr = (np.asarray(a, np.float64) for a in (q_latent, q_rope, k_rope))
  out = np.zeros(q.shape)
  lse = np.full(q.shape[:2], -np.inf)
  largest = 0.0
  for b, n in enumerate(np.asarray(lengths)):
    if n == 0:
      continue
    s = (q[b] @ c[b, :n].T + qr[b] @ kr[b, :n].T) * sm_scale
    largest = max(largest, float(np.abs(s).max()))
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    out[b] = p @ c[b, :n] / p.sum(-1, keepdims=True)
    lse[b] = m[:, 0] + np.log(p.sum(-1))
  return out, lse, largest


def decode_tolerance(impl: str, fmt: str, largest: float, C: int, R: int) -> float:
  """The bound on a row's relative error (and lse's error) of a decode. The inputs are rounded
  to their dtype before the oracle reads them, so what is left is the kernel's own rounding. A
  score s carries an absolute error, which p inherits relatively and lse absolutely: float32
  accumulation gives ~|s|·2^-24·sqrt(C+R); the int8 paths also round the dequantized cache or the
  query to 16 bits, ~|s|·2^-8 (so at logits of 1e4 only finiteness and the empty rows are
  checked there). bf16 probabilities add 2^-8."""
  unit = 2.0 ** -24 if fmt == "float32" or impl == "reference" else 2.0 ** -8
  sixteen_bit_scores = fmt == "int8" and impl != "reference"
  score_unit = 2.0 ** -8 if sixteen_bit_scores else 2.0 ** -24 * np.sqrt(C + R)
  return 8 * unit + 4 * largest * score_unit


def row_errors(out, want_out, lengths) -> dict[int, float]:
  """{b: ‖out[b] − want_out[b]‖ / ‖want_out[b]‖} over the rows of nonzero length."""
  out = np.asarray(out, np.float64)
  return {int(b): np.linalg.norm(out[b] - want_out[b]) / max(np.linalg.norm(want_out[b]), 1e-30)
          for b in np.flatnonzero(np.asarray(lengths) != 0)}


def decode_errors(out, lse, want_out, want_lse, lengths, tol) -> list[str]:
  """What is wrong with (out, lse) against the oracle's, as messages; [] when right."""
  out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
  if not np.all(np.isfinite(out)):
    return ["non-finite output"]
  empty = np.asarray(lengths) == 0
  errors = []
  if not (np.all(out[empty] == 0) and np.all(np.isneginf(lse[empty]))):
    errors.append("an empty row is not out 0, lse -inf")
  for b, err in row_errors(out, want_out, lengths).items():
    lse_err = np.max(np.abs(lse[b] - want_lse[b]) / (1 + np.abs(want_lse[b])))
    if err > tol or lse_err > tol:
      errors.append(f"row {b} (length {lengths[b]}): out {err:.2e}, lse {lse_err:.2e} "
                    f"> {tol:.2e}")
  return errors


def _draw_decode(rng, path: str, large: bool) -> dict:
  space = DECODE_PATHS[path]
  S = int(rng.choice(space["S"] + ((16384,) if large else ())))
  C, R = space["CR"][rng.integers(len(space["CR"]))]
  B = int(rng.integers(1, 7))
  choices = [0, S, *(e for e in EDGES if e < S)]
  lengths = [int(rng.choice(choices)) if rng.random() < 0.6 else int(rng.integers(0, S + 1))
             for _ in range(B)]
  return dict(B=B, H=int(rng.choice(space["H"])), S=S, C=int(C), R=int(R),
              fmt=str(rng.choice(space["fmt"])), lengths=lengths,
              logit=float(rng.choice((1.0, 30.0, 1e4))), fill=str(rng.choice(FILLS)),
              seed=int(rng.integers(2**31)))


def _run_decode(path: str, case: dict, interpret: bool) -> dict:
  args = make_decode_inputs(**case)
  space = DECODE_PATHS[path]
  kernel = decode.plan(*args, impl="pallas", lowering=space["lowering"],
                       interpret=interpret).kernel
  if kernel != path:
    return {"ok": False, "errors": [f"the plan runs {kernel!r}, not {path!r}"], "ratio": None}
  out, lse = decode.mla_decode(*args, sm_scale=1.0, impl="pallas", lowering=space["lowering"],
                               interpret=interpret)  # the queries carry the logit scale
  want_out, want_lse, largest = decode_oracle(*args, 1.0)
  tol = decode_tolerance("pallas", case["fmt"], largest, case["C"], case["R"])
  errors = decode_errors(out, lse, want_out, want_lse, case["lengths"], tol)
  rows = list(row_errors(out, want_out, case["lengths"]).values())
  ratio = max(rows, default=0.0) / tol if np.all(np.isfinite(rows)) else None
  return {"ok": not errors, "errors": errors, "ratio": ratio}


def _draw_gemv(rng, path: str, large: bool) -> dict:
  del large
  return dict(B=int(rng.choice((1, 2, 8, 64))), H=int(rng.choice((1, 16, 128))),
              K=int(rng.choice((128, 512))), N=int(rng.choice((128, 512))),
              fmt=GEMV_PATHS[path]["fmt"], seed=int(rng.integers(2**31)))


def _run_gemv(path: str, case: dict, interpret: bool) -> dict:
  rng = np.random.default_rng(case["seed"])
  B, H, K, N, fmt = (case[k] for k in ("B", "H", "K", "N", "fmt"))
  w = jnp.asarray(rng.standard_normal((H, K, N)) * K ** -0.5, jnp.float32)
  w = w.astype(jnp.bfloat16) if fmt == "bf16" else quant.quantize(w, fmt)
  x = jnp.asarray(rng.standard_normal((B, H, K)), jnp.bfloat16)
  y = gemv.batched_gemv(x, w, impl="pallas", lowering=GEMV_PATHS[path]["lowering"],
                        interpret=interpret)
  want = np.einsum("bhk,hkn->bhn", np.asarray(x, np.float64),
                   np.asarray(quant.dequantize(w, jnp.float32), np.float64))
  y = np.asarray(y, np.float64)
  if not np.all(np.isfinite(y)):
    return {"ok": False, "errors": ["non-finite output"], "ratio": None}
  tol = 2e-2  # bf16 output and operands (tests/helpers.py's RTOL)
  err = np.linalg.norm(y - want) / max(np.linalg.norm(want), 1e-30)
  return {"ok": err <= tol, "errors": [] if err <= tol else [f"{err:.2e} > {tol:.0e}"],
          "ratio": err / tol}


def _draw_grouped(rng, path: str, large: bool) -> dict:
  del path
  M = int(rng.choice((16, 40, 200) + ((768, 6144) if large else ())))
  G = int(rng.choice((1, 3, 8, 64)))
  sizes = rng.multinomial(M, np.ones(G) / G)  # every row in a group, as the MoE routes them
  if rng.random() < 0.5:  # or some groups emptied, made negative (empty) or grown past M
    sizes = sizes * rng.choice((0, 1, -1, 2), G, p=(0.2, 0.5, 0.1, 0.2))
  N, K = (int(rng.choice((16, 48, 128, 1408 if large else 80))) for _ in range(2))
  return dict(M=M, N=N, K=K, sizes=[int(n) for n in sizes], seed=int(rng.integers(2**31)))


def grouped_oracle(x, w, sizes):
  """Row r of group g (groups in order, each owning the next max(size, 0) rows, cut at M) is
  x[r] · w[g]ᵀ in float64; rows in no group are 0."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  y, row = np.zeros((x.shape[0], w.shape[1])), 0
  for g, n in enumerate(sizes):
    end = min(row + max(int(n), 0), x.shape[0])
    y[row:end] = x[row:end] @ w[g].T
    row = end
  return y


def _run_grouped(path: str, case: dict, interpret: bool) -> dict:
  rng = np.random.default_rng(case["seed"])
  M, N, K, sizes = (case[k] for k in ("M", "N", "K", "sizes"))
  dtype, tol = (GROUPED_PATHS[path][k] for k in ("dtype", "tol"))
  x = jnp.asarray(rng.standard_normal((M, K)), dtype)
  w = jnp.asarray(rng.standard_normal((len(sizes), N, K)) * K ** -0.5, dtype)
  y = np.asarray(ops.grouped_matmul(x, w, jnp.asarray(sizes, jnp.int32), impl="pallas",
                                    interpret=interpret), np.float64)
  if not np.all(np.isfinite(y)):
    return {"ok": False, "errors": ["non-finite output"], "ratio": None}
  want = grouped_oracle(x, w, sizes)
  err = np.linalg.norm(y - want) / max(np.linalg.norm(want), 1e-30)
  errors = [] if err <= tol else [f"{err:.2e} > {tol:.0e}"]
  if np.any(y[np.all(want == 0, axis=1)]):
    errors.append("a row in no group is not 0")
  return {"ok": not errors, "errors": errors, "ratio": err / tol}


_FAMILIES = {"decode": (DECODE_PATHS, _draw_decode, _run_decode),
             "gemv": (GEMV_PATHS, _draw_gemv, _run_gemv),
             "grouped": (GROUPED_PATHS, _draw_grouped, _run_grouped)}


def _path_row(family: str, path: str, cases: int, seed: int) -> dict:
  """`cases` cases of one path, drawn from their own stream (the seed and the path's name),
  so that a path's cases do not depend on which other paths run or where."""
  interpret = jax.default_backend() != "gpu"
  _, draw, check = _FAMILIES[family]
  rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
  row = {"family": family, "path": path, "cases": 0, "failures": [], "worst_ratio": 0.0,
         "skipped": ""}
  for _ in range(cases):
    case = draw(rng, path, large=not interpret)
    try:
      outcome = check(path, case, interpret)
    except (NotImplementedError, ImportError) as err:  # a kernel the device lacks
      row["skipped"] = f"{type(err).__name__}: {err}"[:200]
      break
    except Exception as err:  # pylint: disable=broad-except
      outcome = {"ok": False, "errors": [f"{type(err).__name__}: {err}"[:300]], "ratio": None}
    row["cases"] += 1
    if not outcome["ok"]:
      row["failures"].append({"case": case, "errors": outcome["errors"][:3]})
    if outcome["ratio"] is not None:
      row["worst_ratio"] = max(row["worst_ratio"], outcome["ratio"])
  return row


def _selected(config) -> list[tuple[str, str]]:
  """(family, path) of config.paths ("" all), in the families' order; refuses unknown paths and
  counts below 1."""
  every = [(family, path) for family, (paths, _, _) in _FAMILIES.items() for path in paths]
  wanted = set(config.paths.split(",")) if config.paths else {path for _, path in every}
  unknown = wanted - {path for _, path in every}
  if unknown:
    raise harness.ConfigError(f"config.paths: {sorted(unknown)}; expected some of "
                              f"{[path for _, path in every]}")
  for field in ("cases", "workers"):
    if int(config[field]) < 1:
      raise harness.ConfigError(f"config.{field}={config[field]}: expected >= 1")
  return [(family, path) for family, path in every if path in wanted]


def _rows(config, selected):
  """(family, path, row) as each path finishes: in this process, or over config.workers
  processes (spawned: each compiles its kernels on its own cores; the cases are small, so
  they share one GPU)."""
  if config.workers <= 1:
    for family, path in selected:
      yield family, path, _path_row(family, path, config.cases, config.seed)
    return
  context = multiprocessing.get_context("spawn")
  with futures.ProcessPoolExecutor(config.workers, mp_context=context) as pool:
    jobs = {pool.submit(_path_row, family, path, config.cases, config.seed): (family, path)
            for family, path in selected}
    for job in futures.as_completed(jobs):
      yield *jobs[job], job.result()


def run(config, workdir: str, name: str = "kernel_sweep", title: str = "") -> dict:
  """config.cases cases a path, for every path of config.paths; writes <name>.json and .md."""
  results = harness.new_results(config, name, KIND, title)
  selected = _selected(config)
  start = time.perf_counter()
  done = {}
  with harness.run_status(results):
    for family, path, row in _rows(config, selected):
      done[path] = row
      results["rows"] = [done[p] for _, p in selected if p in done]
      note = f" ({row['skipped']})" if row["skipped"] else ""
      print(f"[{time.perf_counter() - start:.0f} s] {family} {path}: {row['cases']} cases, "
            f"{len(row['failures'])} failures, worst error {row['worst_ratio']:.2f} of its "
            f"tolerance{note}", flush=True)
      write(workdir, results)
  write(workdir, results)
  print(table(results))
  return results


def table(results: dict) -> str:
  header = ["family", "path", "cases", "failures", "worst error / tolerance"]
  rows = [[r["family"], r["path"], r["cases"], len(r["failures"]),
           r["skipped"] or harness.fmt(r["worst_ratio"], ".3f")] for r in results["rows"]]
  return harness.md_table(header, rows, "llrrr")


def markdown(results: dict) -> str:
  total = sum(r["cases"] for r in results["rows"])
  failed = sum(len(r["failures"]) for r in results["rows"])
  lines = [table(results), "",
           f"{total} cases, {failed} failures. Decode: out and lse of every row against a float64 "
           "softmax over the row's valid slots, the slots past each length poisoned; GEMV: "
           "against x·w in float64 with w dequantized (bf16 tolerance 2e-2); grouped: against "
           "each row times its group's weight in float64 (tolerance 2e-5 in float32, 2e-2 in "
           "bf16), rows in no group 0."]
  for r in results["rows"]:
    for failure in r["failures"][:5]:
      lines.append(f"- {r['path']}: {failure['case']}: {'; '.join(failure['errors'])}")
  return harness.page(lines, results)


plot = None  # no plot: the table is the result


def write(workdir: str, results: dict) -> list[str]:
  return harness.write(workdir, results, markdown=markdown)
