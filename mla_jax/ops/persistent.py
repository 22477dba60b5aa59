"""Persistent kernels (Pallas, Triton lowering): one launch whose programs run several phases in
turn, with a grid-wide barrier between phases.

A B=1 decode layer is a chain of small dependent steps (projections, attention, projections),
and as separate kernels each costs a launch and a dependent load and store of its own, ~1.7 µs
inside a CUDA graph whatever it moves (docs/decode_step.md). Here a phase is a function of a
unit index: each of the launch's P programs runs the phase's units p, p + P, p + 2P, ..., then
waits until every program has finished the phase.

The barrier is a counter in GPU memory, zeroed before the launch (an operand aliased to an
output): at its k-th barrier each program adds 1 to it (one thread's atomic, acquire-release at
GPU scope, between two thread barriers of the program), polls it with volatile loads until it
reaches k·P, then with atomic reads until it does. The count only grows, so no program can miss a
barrier's release, and the acquiring read orders the program's later loads after every
program's earlier stores (the pattern of CUDA's cooperative grid sync). Measured on an H100 with
the layer kernel (docs/decode_step.md): polling with atomics alone was slow, the arriving
programs' atomics queueing behind the polls; volatile polls alone gave wrong results, as no
barrier at all did (the acquire is missing); the two in turn were right.

Interpret mode runs a grid's programs one after another, where a barrier would never open; there
each phase runs as a launch of its own, a program per unit, over the same buffers (every output
is passed in and aliased), so that the phases are tested on a CPU and only the barrier needs a
GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mla_jax.ops import device


@dataclasses.dataclass(frozen=True)
class Phase:
  """`units` units, each run by `body(u, in_refs, out_refs, fetched)`; `name` names its launch
  in interpret mode. prefetch(u, in_refs), if given, loads what unit u reads from the inputs
  alone (its weights): where the phase has no more units than programs, each program calls it
  at the launch's start, so that those loads overlap the phases before, and passes its result
  to body as `fetched` (None otherwise, and body loads them itself). u may then be past the
  last unit (its program runs none): prefetch must load from valid addresses for any u <
  programs."""

  name: str
  units: int
  body: Callable
  prefetch: Callable | None = None


def barrier(counter_ref, target):
  """Waits until every program has arrived: adds 1 to counter_ref[0], polls it with volatile
  loads until it is at least `target` (k·P at the k-th barrier of P programs), then with atomic
  reads (adds of 0) until it is, which acquire."""
  pltriton.debug_barrier()
  pltriton.atomic_add(counter_ref, (0,), jnp.int32(1))
  for read in (lambda: pltriton.load(counter_ref.at[0], volatile=True),
               lambda: pltriton.atomic_add(counter_ref, (0,), jnp.int32(0))):
    jax.lax.while_loop(lambda count: count < target, lambda _, read=read: read(), jnp.int32(0))
  pltriton.debug_barrier()


def _run_units(phase: Phase, p, programs: int, in_refs, out_refs, fetched):
  """Program p's units of the phase: p, p + programs, ..."""
  units = phase.units
  if units <= programs:
    pl.when(p < units)(lambda: phase.body(p, in_refs, out_refs, fetched))
    return

  def step(i, carry):
    phase.body(p + i * programs, in_refs, out_refs, None)
    return carry

  jax.lax.fori_loop(0, pl.cdiv(units - p, programs), step, 0)


def persistent_call(phases, operands, out_shape, *, aliases: dict, programs: int, name: str,
                    num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
  """Runs `phases` in order over operands (a list of arrays) -> the outputs (out_shape, a list
  of jax.ShapeDtypeStruct). aliases {operand index: output index}: outputs that are operands
  updated in place; bodies read and write those through the output refs. Other outputs start
  undefined (zeros in interpret mode); each phase's body sees every output as the earlier
  phases left it. programs: P, at most the GPU's SMs (a grid-wide barrier needs every program
  resident)."""
  n_in, n_out = len(operands), len(out_shape)
  if interpret:
    outputs = [jnp.zeros(s.shape, s.dtype) for s in out_shape]
    for i, o in aliases.items():
      outputs[o] = operands[i]
    for phase in phases:
      def kernel(*refs, phase=phase):
        u, in_refs = pl.program_id(0), refs[:n_in]
        fetched = phase.prefetch(u, in_refs) if phase.prefetch else None
        phase.body(u, in_refs, refs[n_in + n_out:], fetched)

      outputs = pl.pallas_call(
          kernel, grid=(phase.units,), out_shape=out_shape,
          input_output_aliases={n_in + o: o for o in range(n_out)}, interpret=True,
          name=f"{name}_{phase.name}")(*operands, *outputs)
    return list(outputs)

  if not 1 <= programs <= device.num_sms():
    raise ValueError(f"programs={programs}: expected 1 to the GPU's {device.num_sms()} SMs (a "
                     "grid-wide barrier waits for every program, so all must be resident)")

  def kernel(*refs):
    in_refs, out_refs, counter_ref = refs[:n_in], refs[n_in + 1:-1], refs[-1]
    p = pl.program_id(0)
    fetched = [phase.prefetch(p, in_refs) if phase.prefetch and phase.units <= programs
               else None for phase in phases]
    for k, phase in enumerate(phases):
      if k:
        barrier(counter_ref, k * programs)
      _run_units(phase, p, programs, in_refs, out_refs, fetched[k])

  counter = jax.ShapeDtypeStruct((1,), jnp.int32)
  outputs = pl.pallas_call(
      kernel, grid=(programs,), out_shape=[*out_shape, counter],
      input_output_aliases={**aliases, n_in: n_out},
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name=name)(*operands, jnp.zeros((1,), jnp.int32))
  return list(outputs[:-1])
