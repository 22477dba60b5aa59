"""Reading optimized HLO text (Compiled.as_text()): which instruction writes each output.

Just enough of the text format for tests: instructions are `[ROOT ]%name = shape opcode(%a, %b, ...),
attributes`, computations are `[ENTRY ]%name (...) -> ... {` ... `}`, and a fusion names its body with
`calls=%body`.
"""

from __future__ import annotations

import dataclasses
import re

_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) ")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_IN_PLACE_OPS = ("dynamic-update-slice", "scatter")


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  shape: str  # e.g. "f32[1,4,4096,24]{3,2,1,0}"
  opcode: str
  operands: tuple[str, ...]
  args: str  # the text in the parentheses: operands, or a parameter's number
  calls: str | None  # a fusion's body
  tuple_index: int | None  # a get-tuple-element's index
  control: tuple[str, ...] = ()  # computations a while or conditional runs (body, branches)
  aliased: tuple[int, ...] = ()  # a custom call's outputs written into an operand's buffer


def parse(text: str) -> tuple[dict[str, dict[str, Instruction]], dict[str, str], str]:
  """Returns ({computation: {name: instruction}}, {computation: root name}, entry name)."""
  computations, roots, entry, current = {}, {}, None, None
  for line in text.splitlines():
    if (m := _COMPUTATION.match(line)) and line.rstrip().endswith("{"):
      current = m.group(2)
      computations[current] = {}
      entry = current if m.group(1) else entry
    elif current and (m := _INSTRUCTION.match(line)):
      args = m.group(5).split("), ")[0].rstrip(")")
      calls = re.search(r"calls=%([\w.\-]+)", m.group(5))
      index = re.search(r"\), index=(\d+)", m.group(5))
      control = re.findall(r"(?:body|condition|true_computation|false_computation)=%([\w.\-]+)",
                           m.group(5))
      if branches := re.search(r"branch_computations=\{([^}]*)\}", m.group(5)):
        control += re.findall(r"%([\w.\-]+)", branches.group(1))
      aliased = re.search(r"output_to_operand_aliasing=\{(.*?)\)\}", m.group(5))
      computations[current][m.group(2)] = Instruction(
          m.group(2), m.group(3), m.group(4), tuple(re.findall(r"%([\w.\-]+)", args)),
          args, calls and calls.group(1), index and int(index.group(1)), tuple(control),
          tuple(int(i) for i in re.findall(r"\{(\d+)\}:", aliased.group(1))) if aliased else ())
      if m.group(1):
        roots[current] = m.group(2)
  return computations, roots, entry


def shape_of(array) -> str:
  """An array's shape as HLO prints it, without the layout: "f32[2,64,8]"."""
  name = array.dtype.name
  name = {"bool": "pred", "bfloat16": "bf16"}.get(name) or (
      name.replace("float", "f").replace("uint", "u").replace("int", "s"))
  return f"{name}[{','.join(map(str, array.shape))}]"


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8}
# Instructions that write no buffer of their own: a while's results live in the buffers of its
# operand tuple (XLA's while semantics; a copy made to form that tuple shows as a copy).
_NO_BUFFER = ("parameter", "bitcast", "get-tuple-element", "tuple", "opt-barrier", "constant",
              "while")


def _run_by(computations, name: str) -> list[str]:
  """name and the computations its whiles and conditionals run, recursively (not fusion bodies,
  whose values live in registers and loops, not buffers)."""
  found = [name]
  for inst in computations[name].values():
    for called in inst.control:
      found += [c for c in _run_by(computations, called) if c not in found]
  return found


def large_temporaries(text: str, min_bytes: int) -> list[str]:
  """Arrays of at least min_bytes that the entry computation, or a loop body or conditional
  branch it runs, writes and does not return (so neither inputs nor outputs such as the in-place
  cache updates), as "name opcode shape". Not counted: the s8 workspace that a cuBLAS custom
  call carries, and a custom call's outputs aliased to its operands (a Pallas kernel's in-place
  cache write: the buffer is the operand's)."""
  computations, roots, entry = parse(text)
  found = []
  for name in _run_by(computations, entry):
    found += _written(computations[name], roots[name], min_bytes)
  return found


def _written(body, root: str, min_bytes: int) -> list[str]:
  returned = {inst.name for inst in _outputs(body, root)}
  found = []
  for inst in body.values():
    if inst.opcode in _NO_BUFFER or inst.name in returned:
      continue
    for index, (dtype, dims) in enumerate(re.findall(r"(\w+)\[([\d,]*)\]", inst.shape)):
      if inst.opcode == "custom-call" and (dtype == "s8" or index in inst.aliased):
        continue
      size = _BYTES[dtype]
      for d in filter(None, dims.split(",")):
        size *= int(d)
      if size >= min_bytes:
        found.append(f"{inst.name} {inst.opcode} {dtype}[{dims}]")
  return found


def in_place_writes(text: str, shapes: list[str]) -> dict[str, str]:
  """For each output array shape (e.g. "f32[1,4,4096,24]"), how the entry computation produces
  it: "in place" when it is a dynamic-update-slice or scatter (bare or as a fusion's root) whose
  updated operand is an entry parameter, as XLA writes such an update into the donated buffer;
  otherwise a description of the producer (a copy, a fusion with another root, ...). Each shape
  must belong to one output; all_writes takes outputs that share a shape."""
  found = {}
  for shape, described in all_writes(text, shapes).items():
    assert len(described) == 1, f"{len(described)} outputs of shape {shape}"
    found[shape] = described[0]
  return found


def all_writes(text: str, shapes: list[str]) -> dict[str, list[str]]:
  """For each shape, how the entry computation produces every output of that shape (as
  in_place_writes describes one): one description per output, e.g. one per layer's cache."""
  computations, roots, entry = parse(text)
  body = computations[entry]
  outputs = _outputs(body, roots[entry])
  return {shape: [_describe(i, body, computations, roots) for i in outputs
                  if i.shape.split("{")[0] == shape] for shape in shapes}


def _outputs(body, root_name) -> list[Instruction]:
  """The instructions whose values the computation returns (a tuple's elements, or the root)."""
  root = body[root_name]
  return [body[name] for name in root.operands] if root.opcode == "tuple" else [root]


def _describe(inst, body, computations, roots) -> str:
  index = None  # which output of a multi-output fusion
  while inst.opcode in ("bitcast", "get-tuple-element"):
    if inst.opcode == "bitcast":
      inst = body[inst.operands[0]]
      continue
    source = body[inst.operands[0]]
    if source.opcode == "opt-barrier":  # passes its operand tuple through
      source = body[source.operands[0]]
    if source.opcode == "tuple":
      inst = body[source.operands[inst.tuple_index]]
    else:
      inst, index = source, inst.tuple_index
  if inst.opcode == "fusion":
    fused = computations[inst.calls]
    update = fused[roots[inst.calls]]
    if update.opcode == "tuple" and index is not None:
      update = fused[update.operands[index]]
    if update.opcode not in _IN_PLACE_OPS:
      return f"{inst.name}: fusion rooted in {update.opcode}"
    target = fused[update.operands[0]]
    if target.opcode != "parameter":
      return f"{inst.name}: {update.opcode} of a computed {target.opcode}"
    updated = inst.operands[int(target.args)]
  elif inst.opcode in _IN_PLACE_OPS:
    updated = inst.operands[0]
  else:
    return f"{inst.name}: {inst.opcode}"
  if body[updated].opcode != "parameter":
    return f"{inst.name}: {inst.opcode} of {body[updated].opcode} %{updated}"
  return "in place"
