"""What ptxas reports of each kernel compiled for an H200: registers, stack and spills.

XLA turns every kernel's PTX into machine code by running `ptxas` from its CUDA directory
(the debug option xla_gpu_cuda_data_dir). Pointed at a directory whose bin/ptxas runs the real
one with `-v` and keeps the report, a compilation leaves each entry function's resource usage
behind: the register spills that a kernel's size choices cause are visible without a GPU.
Mosaic GPU compiles its kernels itself; with MOSAIC_GPU_DUMP_PTXAS set it writes the same
report of each into MOSAIC_GPU_DUMP_TO (a `.ptxas` file a kernel), read here too.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import tempfile
from unittest import mock

import pytest

_WRAPPER = """#!/bin/sh
out=$(mktemp "{reports}/XXXXXX")
"{ptxas}" -v "$@" 2>"$out"
status=$?
cat "$out" >&2
exit $status
"""
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


@dataclasses.dataclass(frozen=True)
class Usage:
  registers: int
  stack_bytes: int
  spill_store_bytes: int
  spill_load_bytes: int


def usage(compile_with) -> dict[str, Usage]:
  """{entry function: Usage} of what compile_with(compiler_options) compiles (e.g. through
  helpers.compile_for_h200); of several kernels with one entry name (Mosaic GPU names every
  launch of a kernel alike), the one that spills most. Skips the test where no ptxas is found on
  PATH or XLA ran none."""
  ptxas = shutil.which("ptxas")
  if ptxas is None:
    pytest.skip("no ptxas on PATH to report the kernels' resource usage")
  with tempfile.TemporaryDirectory() as root:
    cuda, reports = pathlib.Path(root, "cuda"), pathlib.Path(root, "reports")
    (cuda / "bin").mkdir(parents=True)
    reports.mkdir()
    wrapper = cuda / "bin" / "ptxas"
    wrapper.write_text(_WRAPPER.format(reports=reports, ptxas=ptxas))
    wrapper.chmod(0o755)
    with mock.patch.dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_TO=str(reports)):
      compile_with({"xla_gpu_cuda_data_dir": str(cuda)})
    found = {}
    for report in reports.iterdir():
      if report.suffix in ("", ".ptxas"):  # the wrapper's reports, Mosaic GPU's
        for name, use in _parse(report.read_text()).items():  # launches of one kernel: the worst
          found[name] = max(found.get(name, use), use, key=lambda u: u.spill_store_bytes)
  if not found:
    pytest.skip("XLA ran no ptxas (it may compile PTX in process)")
  return found


def _parse(text: str) -> dict[str, Usage]:
  """ptxas -v's report: per entry function a stack-frame line, then a registers line."""
  found, name, frame = {}, None, None
  for line in text.splitlines():
    if m := _ENTRY.search(line):
      name = m.group(1)
    elif (m := _FRAME.search(line)) and name:
      frame = tuple(map(int, m.groups()))
    elif (m := _REGISTERS.search(line)) and name and frame:
      found[name] = Usage(int(m.group(1)), *frame)
      name = frame = None
  return found
