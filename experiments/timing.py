"""Statistics and the progress/ETA line of a sweep."""

from __future__ import annotations

import math
import time


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def format_seconds(s: float) -> str:
  s = max(0.0, s)
  return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.1f}s"


class Progress:
  """Estimates the time left of a sweep over prompt lengths.

  Cost model per prompt length N with an S = N + n_gen slot cache: compile time (about
  constant), prefill time ∝ N·S (every prompt token attends over the whole cache) and decode time
  ∝ S (each step reads the cache). The last finished length calibrates the three terms.
  """

  def __init__(self, prompt_lengths, n_gen: int):
    self.start = time.perf_counter()
    self.n_gen = n_gen
    self.remaining = list(prompt_lengths)
    self.current = None
    self.current_start = self.start
    self.last = None  # (prompt_len, compile_s, prefill_s, decode_s) of the last finished length

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def begin(self, prompt_len: int):
    self.remaining.remove(prompt_len)
    self.current = prompt_len
    self.current_start = time.perf_counter()

  def finish(self, prompt_len: int, compile_s: float, prefill_s: float):
    decode_s = max(0.0, time.perf_counter() - self.current_start - compile_s - prefill_s)
    self.last = (prompt_len, compile_s, prefill_s, decode_s)

  def predict(self, prompt_len: int) -> float | None:
    """Predicted seconds for one prompt length, or None before any has finished."""
    if self.last is None:
      return None
    n, compile_s, prefill_s, decode_s = self.last
    s, s_new = n + self.n_gen, prompt_len + self.n_gen
    return compile_s + prefill_s * (prompt_len * s_new) / (n * s) + decode_s * s_new / s

  def eta(self) -> float | None:
    """Seconds left: the rest of the current length plus the lengths not started."""
    if self.last is None:
      return None
    current = 0.0
    if self.current is not None and self.current != self.last[0]:
      current = max(0.0, self.predict(self.current) - (time.perf_counter() - self.current_start))
    return current + sum(self.predict(n) for n in self.remaining)

  def line(self) -> str:
    eta = self.eta()
    left = "estimating" if eta is None else f"~{format_seconds(eta)} left"
    return f"elapsed {format_seconds(self.elapsed())}, {left}"
