"""Decode loops and generation: N decode steps inside one jit, the caches carried and donated.

One jitted call per token costs host dispatch (about 60 µs on the lent H200, more than a small
step takes on the GPU); a loop inside one jit pays it once. The caches are donated, so every step
writes its token in place (the loop's carry aliases the input buffers).

decode_loop feeds an attention stack's outputs back as its next inputs; generate runs a language
model (model.CausalLM): one jitted prefill, then the same loop feeding back sampled tokens.
decode_loop_fn and generate_fn split the module once and return the function to call many times.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_jax.cache import round_slots
from mla_jax.model import check_tokens


def decode_loop_fn(module: nnx.Module, num_steps: int, *,
                   next_input: Callable[[jax.Array], jax.Array] | None = None):
  """Returns run(x, positions, caches) -> (ys [B,num_steps,D], caches): num_steps decode steps
  of `module` inside one jit, the caches donated.

  module: an MLAttention, an AttentionStack, or anything with their calling convention
  `y, caches = module(x, positions, caches)`. x [B,1,D] and positions [B,1] are the first step's
  input; step t+1 gets next_input(y_t) (default: y_t itself, what an attention-only stack can
  feed back) at positions + 1, padding rows (position -1) staying padding.

  Like jit_step, run follows the module's current parameter values (the split state holds the
  module's own Variables) but not a Variable or submodule replaced by a new object. Inside jit
  the caches' overflow flags are not checked: call `cache.check()` on the returned caches.
  """
  _check_num_steps(num_steps)
  graphdef, state = nnx.split(module)
  loop = _jitted_loop(graphdef, num_steps, _FeedBack(next_input or _identity))

  def run(x, positions, caches):
    if x.ndim != 3 or x.shape[1] != 1:
      raise ValueError(f"x.shape={tuple(x.shape)}; expected [B,1,D] (one token a row)")
    if positions.shape != x.shape[:2]:
      raise ValueError(f"positions.shape={tuple(positions.shape)}; expected [B,1]="
                       f"{tuple(x.shape[:2])}")
    return loop(state, x, positions, caches)

  return run


def decode_loop(module: nnx.Module, x, positions, caches, num_steps: int, *,
                next_input: Callable[[jax.Array], jax.Array] | None = None):
  """`decode_loop_fn(module, num_steps, next_input=next_input)(x, positions, caches)`: one
  call. Build the function once with decode_loop_fn to run the loop many times."""
  return decode_loop_fn(module, num_steps, next_input=next_input)(x, positions, caches)


def generate(model: nnx.Module, input_ids, max_new_tokens: int, *, positions=None, cache=None,
             temperature: float = 0.0, top_p: float = 1.0, rng: jax.Array | None = None,
             prefill_chunk: int | None = None):
  """Generates max_new_tokens tokens a row after the prompt input_ids [B,T] int32 ->
  (tokens [B,max_new_tokens] int32, cache).

  model: a model.CausalLM. positions [B,T] (-1 = padding, e.g. left padding; default: each
  row's cache length + 0..T-1). cache: what the prompt continues (default: a fresh one of
  T + max_new_tokens slots, rounded up as cache.round_slots does, in the model's dtype); it is
  donated. One jitted prefill takes the prompt, prefill_chunk tokens at a time (None: all at
  once); the first token comes from the logits of each row's last real token, and the next
  max_new_tokens - 1 tokens from decode steps inside one jit (lax.scan), each row's positions
  counting on from its last real one. A row of padding only stays padding (its tokens mean
  nothing). The returned cache holds the prompt and every generated token but the last (feed
  tokens[:, -1:] with it to continue); a cache too short raises ValueError (cache.check).

  Sampling: temperature 0 takes the argmax (greedy); otherwise softmax(logits / temperature),
  restricted to the top_p nucleus (the smallest set of most likely tokens whose probability
  reaches top_p; Holtzman et al. 2020), drawn with rng (a jax.random key, required then).

  prefill_chunk bounds the prefill's memory, whose temporaries grow with the tokens it takes at
  once (compiled for an H200, DeepSeek-V2-Lite's dense and first MoE layer, bf16, standard
  mode: 2.1 GB for 16384 tokens at once, 0.5 GB in chunks of 4096). Chunks run in order inside
  the one jit (lax.scan), each attending to the cache that the chunks before it wrote
  (MLAttention's chunked prefill); the prompt is padded to whole chunks with padding tokens.

  Each call splits the model (nnx.split), which walks all of its modules; to generate from one
  model many times, build the function once with generate_fn.
  """
  run = generate_fn(model, max_new_tokens, temperature=temperature, top_p=top_p,
                    prefill_chunk=prefill_chunk)
  return run(input_ids, positions=positions, cache=cache, rng=rng)


def generate_fn(model: nnx.Module, max_new_tokens: int, *, temperature: float = 0.0,
                top_p: float = 1.0, prefill_chunk: int | None = None):
  """Returns run(input_ids, *, positions=None, cache=None, rng=None) -> (tokens, cache), which is
  `generate(model, input_ids, max_new_tokens, ...)` with the model split once, here, instead of
  at every call. The split walks every module of the model: 22 ms for DeepSeek-V2-Lite's 27
  layers (404 arrays) on a 2-core CPU, 340 µs a token of a 64-token call, spent on the host
  before the GPU gets the step. Like decode_loop_fn, run follows the model's current parameter
  values but not a Variable or submodule replaced by a new object.
  """
  _check_num_steps(max_new_tokens, "max_new_tokens")
  if prefill_chunk is not None:
    _check_num_steps(prefill_chunk, "prefill_chunk")
  sampler = Sampler(float(temperature), float(top_p))
  graphdef, state = nnx.split(model)
  prefill = _jitted_prefill(graphdef, sampler, prefill_chunk)
  loop = _jitted_loop(graphdef, max_new_tokens - 1, _SampleNext(sampler))

  def run(input_ids, *, positions=None, cache=None, rng: jax.Array | None = None):
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids.shape={tuple(input_ids.shape)}; expected [B,T]")
    B, T = input_ids.shape
    if cache is None:
      cache = model.init_cache(B, round_slots(T + max_new_tokens), dtype=model.dtype)
    if cache[0].batch_size != B:
      raise ValueError(f"cache holds {cache[0].batch_size} rows; input_ids.shape="
                       f"{tuple(input_ids.shape)} has B={B}")
    if positions is None:
      positions = cache[0].lengths[:, None] + jnp.arange(T, dtype=jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    check_tokens(input_ids, positions, model.cfg.vocab_size)
    if sampler.temperature > 0 and rng is None:
      raise ValueError(f"temperature={sampler.temperature} samples: pass rng (a jax.random key)")
    rng = jax.random.key(0) if rng is None else rng  # unused by greedy decoding
    prefill_key, loop_key = jax.random.split(rng)
    first, next_positions, cache = prefill(state, input_ids, positions, cache, prefill_key)
    tokens = first[:, None]
    if max_new_tokens > 1:
      rest, cache = loop(state, tokens, next_positions, cache,
                         jax.random.split(loop_key, max_new_tokens - 1))
      tokens = jnp.concatenate([tokens, rest], axis=1)
    cache[0].check()  # every layer caches the same tokens
    return tokens, cache

  return run


@dataclasses.dataclass(frozen=True)
class Sampler:
  """logits [B,V], key -> tokens [B] int32: greedy at temperature 0, else temperature and
  nucleus (top_p) sampling. Frozen and hashable: jit compiles once per setting."""

  temperature: float = 0.0
  top_p: float = 1.0

  def __post_init__(self):
    if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN compares False
      raise ValueError(f"temperature={self.temperature}; expected a finite number >= 0")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p}; expected in (0, 1]")

  def __call__(self, logits, key):
    if self.temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / self.temperature
    if self.top_p < 1:
      logits = _nucleus(logits, self.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _nucleus(logits, top_p):
  """logits [B,V] with every token outside the top_p nucleus set to -inf: a token stays when the
  probability of the tokens more likely than it is below top_p (so the most likely always does)."""
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
  kept = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1
  threshold = jnp.take_along_axis(sorted_logits, kept - 1, axis=-1)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def _check_num_steps(num_steps: int, name: str = "num_steps"):
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"{name}={num_steps!r}; expected an integer >= 1")


def _identity(y):
  return y


@dataclasses.dataclass(frozen=True)
class _FeedBack:
  """The loop's step output for decode_loop: the next input is fn(y), the loop records y."""

  fn: Callable[[jax.Array], jax.Array] = _identity

  def __call__(self, y, key):
    del key
    return self.fn(y), y[:, 0]


@dataclasses.dataclass(frozen=True)
class _SampleNext:
  """The loop's step output for generate: logits y [B,1,V] -> the sampled token, fed back as
  the next input [B,1] and recorded."""

  sampler: Sampler

  def __call__(self, y, key):
    tokens = self.sampler(y[:, 0], key)
    return tokens[:, None], tokens


# The jitted functions are built once per module structure (graphdef) and setting, and cached,
# so that a call does not hash the graphdef again, as a static argument of a module-level jit
# would: a walk of the whole module graph on the host before the GPU gets any work. The prefill
# and the loop stay two functions: a new prompt length compiles the prefill alone.


@functools.lru_cache(maxsize=64)
def _jitted_loop(graphdef, num_steps: int, next_input):
  """jit of (state, x, positions, caches, keys=None) -> _decode_loop of the merged module."""

  def loop(state, x, positions, caches, keys=None):
    return _decode_loop(nnx.merge(graphdef, state), x, positions, caches, keys,
                        num_steps=num_steps, next_input=next_input)

  return jax.jit(loop, donate_argnames=("caches",))


@functools.lru_cache(maxsize=64)
def _jitted_prefill(graphdef, sampler, prefill_chunk: int | None):
  """jit of (state, input_ids, positions, cache, key) -> _prefill of the merged model, in chunks
  of prefill_chunk tokens (None: the whole prompt at once)."""

  def prefill(state, input_ids, positions, cache, key):
    T = input_ids.shape[1]
    return _prefill(nnx.merge(graphdef, state), input_ids, positions, cache, key,
                    sampler=sampler, chunk=min(prefill_chunk or T, T))

  return jax.jit(prefill, donate_argnames=("cache",))


def _decode_loop(module, x, positions, caches, keys, *, num_steps, next_input):
  """num_steps steps of the module; next_input(y, key) -> (next x, what the loop records);
  keys [num_steps] (one a step) or None."""

  def step(carry, key):
    x, positions, caches = carry
    y, caches = module(x, positions, caches)
    positions = jnp.where(positions >= 0, positions + 1, positions)
    x_next, out = next_input(y, key)
    return (x_next.astype(x.dtype), positions, caches), out

  (_, _, caches), outs = jax.lax.scan(step, (x, positions, caches), keys, length=num_steps)
  return jnp.moveaxis(outs, 0, 1), caches


def _prefill(model, input_ids, positions, cache, key, *, sampler, chunk):
  """The prompt through a CausalLM, chunk tokens at a time -> (first tokens [B], next positions
  [B,1], cache); the lm head runs on each row's last real token only."""
  T = positions.shape[1]
  pad = -T % chunk  # the last chunk is filled with padding tokens
  pieces = lambda a, fill: jnp.moveaxis(
      jnp.pad(a, ((0, 0), (0, pad)), constant_values=fill).reshape(a.shape[0], -1, chunk), 1, 0)

  def step(carry, xs):  # one chunk; keeps each row's hidden state at its last real token so far
    cache, last_hidden = carry
    ids, pos = xs
    hidden, cache = model.model(ids, pos, cache)
    valid = pos >= 0
    h = jnp.take_along_axis(hidden, _last_real(valid)[:, None, None], axis=1)[:, 0]
    return (cache, jnp.where(jnp.any(valid, axis=1)[:, None], h.astype(jnp.float32),
                             last_hidden)), None

  # float32 holds any hidden dtype exactly; lm_head casts it to its own dtype
  empty = jnp.zeros((positions.shape[0], model.cfg.hidden_size), jnp.float32)
  (cache, last_hidden), _ = jax.lax.scan(step, (cache, empty),
                                         (pieces(input_ids, 0), pieces(positions, -1)))
  logits = model.lm_head(last_hidden)
  last_position = jnp.take_along_axis(positions, _last_real(positions >= 0)[:, None], axis=1)
  next_positions = jnp.where(last_position >= 0, last_position + 1, -1)
  return sampler(logits, key), next_positions, cache


def _last_real(valid):
  """valid [B,T] bool -> [B] int32: each row's last real token (T - 1 where it has none)."""
  return valid.shape[1] - 1 - jnp.argmax(valid[:, ::-1], axis=1).astype(jnp.int32)
