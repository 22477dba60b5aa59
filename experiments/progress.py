"""The progress line of a long sweep: time elapsed and an estimate of the time left."""

from __future__ import annotations

import time


def format_seconds(s: float) -> str:
  s = max(0.0, s)
  return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.1f}s"


class Progress:
  """Estimates the time left of a sweep over prompt lengths.

  Cost model per prompt length N with an S = N + n_gen slot cache: compile time (about
  constant), prefill time linear in N·S (every prompt token attends over the whole cache) and
  decode time linear in S (each step reads the cache, plus a fixed per-step cost). The last two
  finished lengths fix each line; after only one, time is taken as proportional (pessimistic).
  """

  def __init__(self, prompt_lengths, n_gen: int):
    self.start = time.perf_counter()
    self.n_gen = n_gen
    self.remaining = list(prompt_lengths)
    self.current = None
    self.current_start = self.start
    self.history = []  # (prompt_len, compile_s, prefill_s, decode_s) of finished lengths

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def begin(self, prompt_len: int):
    self.remaining.remove(prompt_len)
    self.current = prompt_len
    self.current_start = time.perf_counter()

  def finish(self, prompt_len: int, compile_s: float, prefill_s: float):
    decode_s = max(0.0, time.perf_counter() - self.current_start - compile_s - prefill_s)
    self.history.append((prompt_len, compile_s, prefill_s, decode_s))

  def predict(self, prompt_len: int) -> float | None:
    """Predicted seconds for one prompt length, or None before any has finished."""
    if not self.history:
      return None
    prefill_work = lambda n: n * (n + self.n_gen)
    decode_work = lambda n: n + self.n_gen
    points = self.history[-2:]
    compile_s = points[-1][1]
    prefill = _extrapolate([(prefill_work(p[0]), p[2]) for p in points], prefill_work(prompt_len))
    decode = _extrapolate([(decode_work(p[0]), p[3]) for p in points], decode_work(prompt_len))
    return compile_s + prefill + decode

  def eta(self) -> float | None:
    """Seconds left: the rest of the current length plus the lengths not started; None until two
    lengths have finished (one point cannot split fixed from per-token costs)."""
    if len(self.history) < 2:
      return None
    current = 0.0
    if self.current is not None and self.current != self.history[-1][0]:
      current = max(0.0, self.predict(self.current) - (time.perf_counter() - self.current_start))
    return current + sum(self.predict(n) for n in self.remaining)

  def line(self) -> str:
    eta = self.eta()
    left = "estimating" if eta is None else f"~{format_seconds(eta)} left"
    return f"elapsed {format_seconds(self.elapsed())}, {left}"


def _extrapolate(points, work: float) -> float:
  """Seconds at `work` on the line through (work, seconds) points; proportional for one point."""
  (w1, t1), (w2, t2) = points[0], points[-1]
  if len(points) == 1 or w2 == w1:
    return t2 * work / w2
  slope = max(0.0, (t2 - t1) / (w2 - w1))
  return max(0.0, t2 + slope * (work - w2))
