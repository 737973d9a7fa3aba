"""WAT guests for the WASI-NN hostile tests, generated around model bytes built in the test.

A guest made here calls, in order: `load` (builders as data segments) or `load_by_name_with_config`,
`init_execution_context`, `set_input` for each input, `compute`, `get_output(0)`; it prints output 0
to stdout and exits 0. The first call that fails makes it print two bytes, the stage (1 load, 2 init,
3 set_input, 4 compute, 5 get_output) and the WASI-NN error code, and exit 1, so a test can tell
which call was refused and how.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

STAGES = {"load": 1, "init": 2, "set_input": 3, "compute": 4, "get_output": 5}
OUT_MAX = 65536


@dataclass
class NnInput:
    index: int
    dims: list[int]
    type: int  # WASI-NN tensor type: F16 0, F32 1, F64 2, U8 3, I32 4, I64 5
    data: bytes


@dataclass
class NnGuest:
    builders: list[bytes] = field(default_factory=list)  # `load` builders (model bytes or a path, config)
    encoding: int = 1  # ONNX 1, GGML 6
    target: int = 0  # CPU
    name: Optional[str] = None  # load_by_name_with_config(name, builders[0] or "{}") instead of load
    inputs: list[NnInput] = field(default_factory=list)
    compute: bool = True


def _escape(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


def nn_guest_wat(g: NnGuest) -> str:
    """The WAT text of the guest described by `g`."""
    segments: list[tuple[int, bytes]] = []
    top = 4096

    def place(data: bytes) -> int:
        nonlocal top
        at = top
        segments.append((at, data))
        top += (len(data) + 15) // 16 * 16 + 16
        return at

    builder_array = bytearray()
    blobs = list(g.builders) if g.name is None else [g.name.encode(), g.builders[0] if g.builders else b"{}"]
    for blob in blobs:
        builder_array += place(blob).to_bytes(4, "little") + len(blob).to_bytes(4, "little")
    builders_at = place(bytes(builder_array))
    tensors = []
    for inp in g.inputs:
        dims_at = place(b"".join(d.to_bytes(4, "little") for d in inp.dims))
        data_at = place(inp.data)
        struct_at = place(b"".join(v.to_bytes(4, "little") for v in (dims_at, len(inp.dims), inp.type, data_at, len(inp.data))))
        tensors.append((inp.index, struct_at))
    out_at = top
    top += OUT_MAX
    pages = top // 65536 + 1

    if g.name is None:
        load = f"(call $load (i32.const {builders_at}) (i32.const {len(blobs)}) (i32.const {g.encoding}) (i32.const {g.target}) (i32.const 0))"
    else:
        (name_at, name_len), (cfg_at, cfg_len) = [
            (int.from_bytes(builder_array[i : i + 4], "little"), int.from_bytes(builder_array[i + 4 : i + 8], "little")) for i in (0, 8)]
        load = (f"(call $load_by_name (i32.const {name_at}) (i32.const {name_len}) (i32.const {cfg_at}) (i32.const {cfg_len}) "
                f"(i32.const 0))")
    body = [f"(local.set $rc {load})", "(if (local.get $rc) (then (call $fail (i32.const 1) (local.get $rc))))",
            "(local.set $rc (call $init (i32.load (i32.const 0)) (i32.const 4)))",
            "(if (local.get $rc) (then (call $fail (i32.const 2) (local.get $rc))))"]
    for index, struct_at in tensors:
        body += [f"(local.set $rc (call $set_input (i32.load (i32.const 4)) (i32.const {index}) (i32.const {struct_at})))",
                 "(if (local.get $rc) (then (call $fail (i32.const 3) (local.get $rc))))"]
    if g.compute:
        body += ["(local.set $rc (call $compute (i32.load (i32.const 4))))",
                 "(if (local.get $rc) (then (call $fail (i32.const 4) (local.get $rc))))",
                 f"(local.set $rc (call $get_output (i32.load (i32.const 4)) (i32.const 0) (i32.const {out_at}) "
                 f"(i32.const {OUT_MAX}) (i32.const 8)))",
                 "(if (local.get $rc) (then (call $fail (i32.const 5) (local.get $rc))))",
                 f"(i32.store (i32.const 200) (i32.const {out_at}))",
                 "(i32.store (i32.const 204) (i32.load (i32.const 8)))",
                 "(drop (call $fd_write (i32.const 1) (i32.const 200) (i32.const 1) (i32.const 208)))"]
    data = "\n".join(f'  (data (i32.const {at}) "{_escape(blob)}")' for at, blob in segments)
    lines = "\n    ".join(body)
    return f"""(module
  (import "wasi_ephemeral_nn" "load" (func $load (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "load_by_name_with_config" (func $load_by_name (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "init_execution_context" (func $init (param i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "set_input" (func $set_input (param i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "compute" (func $compute (param i32) (result i32)))
  (import "wasi_ephemeral_nn" "get_output" (func $get_output (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") {pages})
{data}
  (func $fail (param $stage i32) (param $code i32)
    (i32.store8 (i32.const 12) (local.get $stage))
    (i32.store8 (i32.const 13) (local.get $code))
    (i32.store (i32.const 200) (i32.const 12))
    (i32.store (i32.const 204) (i32.const 2))
    (drop (call $fd_write (i32.const 1) (i32.const 200) (i32.const 1) (i32.const 208)))
    (call $exit (i32.const 1)))
  (func (export "_start") (local $rc i32)
    {lines}))
"""


def failure(stdout: bytes) -> Optional[tuple[str, int]]:
    """(stage, WASI-NN code) when the guest reported a failed call, else None."""
    if len(stdout) == 2 and stdout[0] in STAGES.values():
        stage = next(k for k, v in STAGES.items() if v == stdout[0])
        return stage, stdout[1]
    return None


__all__ = ["NnGuest", "NnInput", "nn_guest_wat", "failure", "STAGES"]
