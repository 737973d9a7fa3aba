"""Engine-neutral description of host functions.

Every capability (event, kv, http, nn, ...) describes its functions once, as `HostFunction`s whose body
works on a small `GuestMemory` accessor and a per-run `RunContext`. Each engine (wasmtime, WasmEdge)
adapts these descriptions to its own API, so the two engines get the same functions from one definition
and a new capability touches one place.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

_log = logging.getLogger("wasmflow.host")


class Code(enum.IntEnum):
    """Error codes of the `wasmflow` import module (docs/abi.md)."""

    OK = 0
    NOT_FOUND = 1
    DENIED = 2
    INVALID = 3
    BAD_POINTER = 4
    TOO_LARGE = 5
    UPSTREAM = 6
    LIMIT = 7
    INTERNAL = 8
    TIMEOUT = 9


class HostError(Exception):
    """Raised inside a host function body to return `code` to the guest.

    A body raises rather than returns codes so that helpers deep in a call (bounds checks, JSON parsing)
    can abort the call in one line; the engine adapter turns it into the i32 result.
    """

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or getattr(code, "name", str(code)))
        self.code = int(code)
        self.message = message


class Halt(Exception):
    """Raised by `invoke` when a host call hit a limit that ends the whole run, not just the call.

    A deadline that passes inside a back-end call, or a graph that would allocate past the flow's
    memory cap, must stop the guest at once: returning an error code would let a guest that ignores
    codes carry on. Each engine adapter turns this into its own way of unwinding the guest (wasmtime:
    the exception propagates through the trampoline as a trap; WasmEdge: the host function returns
    `Terminate`), and the run's status comes from `RunContext.halted`.
    """

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class CancelSignal:
    """Set from any thread to stop one run, the way its deadline would: it makes the deadline pass at once.

    The dispatcher hands one to each run it executes and sets it when the run is cancelled. Whatever
    stops a run at its deadline then stops it now (the engines' interrupt check, the LLM token loop,
    back-end waits bounded by `RunContext.remaining`), and the run is reported `cancelled`, not
    `timeout`. `at` is when it was set (time.monotonic), for measuring how fast a guest stops.
    """

    __slots__ = ("reason", "at")

    def __init__(self) -> None:
        self.reason: str | None = None
        self.at: float | None = None

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.at = time.monotonic()
            self.reason = reason

    def __bool__(self) -> bool:
        return self.reason is not None


class GuestMemory(Protocol):
    """Bounds-checked view of a guest's linear memory, valid for one host call."""

    def size(self) -> int: ...

    def read(self, ptr: int, length: int) -> bytes:
        """Bytes at [ptr, ptr+length); raises HostError(BAD_POINTER) outside memory."""
        ...

    def write(self, ptr: int, data: bytes) -> None:
        """Write data at ptr; raises HostError(BAD_POINTER) outside memory."""
        ...


def check_range(mem_size: int, ptr: int, length: int, code: int = Code.BAD_POINTER) -> None:
    """Shared bounds check. Arguments reach bodies as u32 (`invoke` converts them); a negative value
    can only be a host bug, and is refused rather than read as an address."""
    if ptr < 0 or length < 0 or ptr + length > mem_size:
        raise HostError(code, f"range {ptr}+{length} outside guest memory of {mem_size} bytes")


class BoundedMemory:
    """The bounds rule of every `GuestMemory`, written once.

    Engines (and WASI-NN, which answers its own error codes) subclass it and supply only `size()` and the
    raw, unchecked `_load`/`_store`; `_oob` says what an out-of-bounds access raises.
    """

    __slots__ = ()

    def size(self) -> int:
        raise NotImplementedError

    def _load(self, ptr: int, length: int) -> bytes:
        """Bytes at [ptr, ptr+length), already checked to lie inside memory; length > 0."""
        raise NotImplementedError

    def _store(self, ptr: int, data: bytes) -> None:
        """Write non-empty data at ptr, already checked to fit."""
        raise NotImplementedError

    def _oob(self, ptr: int, length: int) -> Exception:
        return HostError(Code.BAD_POINTER, f"range {ptr}+{length} outside guest memory of {self.size()} bytes")

    def fits(self, ptr: int, length: int) -> bool:
        return ptr >= 0 and length >= 0 and ptr + length <= self.size()

    def read(self, ptr: int, length: int) -> bytes:
        if not self.fits(ptr, length):
            raise self._oob(ptr, length)
        return self._load(ptr, length) if length else b""

    def write(self, ptr: int, data: bytes) -> None:
        if not self.fits(ptr, len(data)):
            raise self._oob(ptr, len(data))
        if data:
            self._store(ptr, data)

    def u32(self, ptr: int) -> int:
        return int.from_bytes(self.read(ptr, 4), "little")

    def put_u32(self, ptr: int, value: int) -> None:
        self.write(ptr, value.to_bytes(4, "little"))


def read_str(mem: GuestMemory, ptr: int, length: int) -> str:
    try:
        return mem.read(ptr, length).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HostError(Code.INVALID, f"argument is not UTF-8: {exc}") from None


def read_json(mem: GuestMemory, ptr: int, length: int) -> Any:
    try:
        return json.loads(read_str(mem, ptr, length))
    except json.JSONDecodeError as exc:
        raise HostError(Code.INVALID, f"argument is not JSON: {exc}") from None
    except RecursionError:  # a guest's thousands-deep array is its error, not ours
        raise HostError(Code.INVALID, "argument is JSON nested too deeply") from None


# Signature shorthand for n signed i32 parameters (the raw wasm type, no conversion to u32).
def i32s(n: int) -> tuple[str, ...]:
    return ("i32",) * n


# Parameter kinds a host function declares: kind -> (wasm type, bias, mask). `invoke` converts the engine's
# raw integer x to ((x + bias) & mask) - bias: the unsigned kinds keep the low 32 bits, the signed ones
# sign-extend from their width. It looks at nothing above the kind's width, so it accepts wasmtime-py's
# signed values, WasmEdge's raw bits, and a 64-bit slot whose upper half an i32 argument left unset.
ARG_KINDS: dict[str, tuple[str, int, int]] = {
    "ptr": ("i32", 0, 0xFFFFFFFF),  # an address in guest memory
    "len": ("i32", 0, 0xFFFFFFFF),  # a byte count
    "u32": ("i32", 0, 0xFFFFFFFF),  # a handle, an index, an enum value
    "i32": ("i32", 0x80000000, 0xFFFFFFFF),  # signed: a log level, an HTTP status
    "i64": ("i64", 0x8000000000000000, 0xFFFFFFFFFFFFFFFF),  # kv_increment's delta
}


def _caller(kinds: tuple[str, ...]) -> Callable[..., int]:
    """`apply(body, call, args)` for one signature: body(call, *converted args).

    It runs on every host call, where converting in a loop would cost several times more than the call
    itself, so each arity has its own function with the conversions written out (and `exec`, which
    would compile one per signature, cost a new process's first run about 50 µs a signature)."""
    conversions = [value for kind in kinds for value in ARG_KINDS[kind][1:]]
    if len(kinds) < len(_CALLERS):
        return _CALLERS[len(kinds)](*conversions)
    pairs = tuple(zip(conversions[::2], conversions[1::2]))

    def apply(body: Callable[..., int], call: "Call", args: Any) -> int:  # more parameters than any ABI call
        return body(call, *[((a + b) & m) - b for a, (b, m) in zip(args, pairs)])
    return apply


def _caller0() -> Callable[..., int]:
    def apply(body: Callable[..., int], call: "Call", args: Any) -> int:
        return body(call)
    return apply


def _caller1(b0: int, m0: int) -> Callable[..., int]:
    def apply(body: Callable[..., int], call: "Call", args: Any) -> int:
        a0, = args
        return body(call, ((a0 + b0) & m0) - b0)
    return apply


def _caller2(b0: int, m0: int, b1: int, m1: int) -> Callable[..., int]:
    def apply(body: Callable[..., int], call: "Call", args: Any) -> int:
        a0, a1 = args
        return body(call, ((a0 + b0) & m0) - b0, ((a1 + b1) & m1) - b1)
    return apply


def _caller3(b0: int, m0: int, b1: int, m1: int, b2: int, m2: int) -> Callable[..., int]:
    def apply(body: Callable[..., int], call: "Call", args: Any) -> int:
        a0, a1, a2 = args
        return body(call, ((a0 + b0) & m0) - b0, ((a1 + b1) & m1) - b1, ((a2 + b2) & m2) - b2)
    return apply


def _caller4(b0: int, m0: int, b1: int, m1: int, b2: int, m2: int, b3: int, m3: int) -> Callable[..., int]:
    def apply(body: Callable[..., int], call: "Call", args: Any) -> int:
        a0, a1, a2, a3 = args
        return body(call, ((a0 + b0) & m0) - b0, ((a1 + b1) & m1) - b1, ((a2 + b2) & m2) - b2,
                    ((a3 + b3) & m3) - b3)
    return apply


def _caller5(b0: int, m0: int, b1: int, m1: int, b2: int, m2: int, b3: int, m3: int,
             b4: int, m4: int) -> Callable[..., int]:
    def apply(body: Callable[..., int], call: "Call", args: Any) -> int:
        a0, a1, a2, a3, a4 = args
        return body(call, ((a0 + b0) & m0) - b0, ((a1 + b1) & m1) - b1, ((a2 + b2) & m2) - b2,
                    ((a3 + b3) & m3) - b3, ((a4 + b4) & m4) - b4)
    return apply


def _caller6(b0: int, m0: int, b1: int, m1: int, b2: int, m2: int, b3: int, m3: int,
             b4: int, m4: int, b5: int, m5: int) -> Callable[..., int]:
    def apply(body: Callable[..., int], call: "Call", args: Any) -> int:
        a0, a1, a2, a3, a4, a5 = args
        return body(call, ((a0 + b0) & m0) - b0, ((a1 + b1) & m1) - b1, ((a2 + b2) & m2) - b2,
                    ((a3 + b3) & m3) - b3, ((a4 + b4) & m4) - b4, ((a5 + b5) & m5) - b5)
    return apply


def _caller7(b0: int, m0: int, b1: int, m1: int, b2: int, m2: int, b3: int, m3: int,
             b4: int, m4: int, b5: int, m5: int, b6: int, m6: int) -> Callable[..., int]:
    def apply(body: Callable[..., int], call: "Call", args: Any) -> int:
        a0, a1, a2, a3, a4, a5, a6 = args
        return body(call, ((a0 + b0) & m0) - b0, ((a1 + b1) & m1) - b1, ((a2 + b2) & m2) - b2,
                    ((a3 + b3) & m3) - b3, ((a4 + b4) & m4) - b4, ((a5 + b5) & m5) - b5, ((a6 + b6) & m6) - b6)
    return apply


_CALLERS = (_caller0, _caller1, _caller2, _caller3, _caller4, _caller5, _caller6, _caller7)


@dataclass(frozen=True)
class HostFunction:
    """One import a guest may call.

    `params` declares each parameter's kind (`ARG_KINDS`), as a tuple or a space-separated string such
    as "ptr len ptr"; `invoke` converts the engine's raw integers once, so bodies get unsigned pointers,
    lengths and handles and never mask. `body(call, *args)` receives a `Call` and the converted
    arguments, and returns an int (the error code) or raises HostError. Any other exception is turned
    into INTERNAL by the adapter and logged, so nothing a guest does can raise through the engine.
    """

    module: str
    name: str
    params: tuple[str, ...]
    results: tuple[str, ...]
    body: Callable[..., int]
    wasm_params: tuple[str, ...] = field(init=False, repr=False, compare=False)  # what engines declare
    apply: Callable[..., int] = field(init=False, repr=False, compare=False)  # (body, call, raw args) -> code

    def __post_init__(self) -> None:
        try:
            kinds, wasm_params, apply = _signature(self.params if isinstance(self.params, str) else tuple(self.params))
        except KeyError as exc:
            raise ValueError(f"{self.module}::{self.name}: unknown parameter kind {exc.args[0]!r} "
                             f"(one of {', '.join(ARG_KINDS)})") from None
        object.__setattr__(self, "params", kinds)
        object.__setattr__(self, "wasm_params", wasm_params)
        object.__setattr__(self, "apply", apply)


@functools.lru_cache(maxsize=None)
def _signature(params: "str | tuple[str, ...]") -> tuple[tuple[str, ...], tuple[str, ...], Callable[..., int]]:
    """(kinds, wasm types, caller) of a parameter declaration; KeyError names an unknown kind.

    Made once per distinct declaration: a host makes dozens of HostFunctions of a few signatures each
    time an engine is created, which is a new process's first run."""
    kinds = tuple(params.split()) if isinstance(params, str) else params
    return kinds, tuple(ARG_KINDS[k][0] for k in kinds), _caller(kinds)


def invoke(fn: "HostFunction", call: "Call", args: "tuple[int, ...] | list[int]") -> int:
    """Run a host function body for an engine adapter: every failure becomes a code, never an exception,
    except `Halt` when the call ended the run (`RunContext.halt`).

    The raw arguments are converted here, once, to the kinds the function declares (`ARG_KINDS`).
    Both engines call this, so they agree on what a refusal is: a bad pointer counts as a denial (the run
    ends `denied` if the guest then fails), and an UPSTREAM or TIMEOUT answer is remembered so that a run
    failing because a remote service failed is retried as `upstream`, not filed as a bug in the guest.
    """
    run = call.run
    try:
        tape = run.tape  # the run's transcript recorder or replay tape (host_functions/transcript.py)
        code = int(fn.apply(fn.body, call, args) if tape is None else tape.call(fn, call, args))
    except HostError as err:
        if err.code == Code.BAD_POINTER:
            run.denials.append(f"{fn.module}::{fn.name}: {err.message}")
        elif err.code in (Code.UPSTREAM, Code.TIMEOUT) and run.halted is None:
            run.upstream_failures.append(f"{fn.module}::{fn.name}: {err.message}")
        code = err.code
        run.record_error(fn, code, err.message)
    except Exception:  # a bug of ours must not unwind through the engine
        _log.exception("host function %s::%s failed in run %s", fn.module, fn.name, run.run_id)
        code = int(Code.INTERNAL)
        run.record_error(fn, code, f"internal host error; the host logged it with run id {run.run_id}")
    cancel = run.cancel
    if cancel is not None and cancel.reason is not None and (run.halted is None or run.halted[0] == "timeout"):
        run.halted = ("cancelled", cancel.reason)  # the early deadline a cancel makes is not a timeout
    if run.halted is not None:
        raise Halt(*run.halted)
    return code


@dataclass
class Call:
    """What a host function body sees: the guest's memory for this call and the run it belongs to."""

    memory: GuestMemory
    run: "RunContext"


MAX_RESULTS = 64
MAX_ERROR_MESSAGE = 4096  # bytes of the last failed call's message kept for `last_error`
MAX_NOTES = 20  # host-written lines (why a call failed) per run: a guest repeating a bad call cannot fill the log


@dataclass
class RunContext:
    """Per-run state shared by all capabilities.

    Each capability keeps its own per-run state in `state[capability_name]`; this class only holds what
    every capability needs: the run's identity, its deadline, the pending results, the captured logs and
    output, and the record of refusals that turns a failed run into status `denied`.
    """

    flow: Any  # wasmflow.flows.model.Flow
    event: "Event"
    run_id: str
    attempt: int = 1
    execution: int = 1  # grows on every claim of the run, releases included: a key for idempotent effects
    deadline: float = float("inf")  # time.monotonic() value
    state: dict[str, Any] = field(default_factory=dict)
    logs: list[tuple[float, str, str]] = field(default_factory=list)
    output: bytes | None = None
    # Where host-side writes into the guest's stdout go (WASI-NN stream-stdout), in order with the
    # guest's own writes: set by both engines for every run; None (no engine) means nowhere.
    stdout: Callable[[bytes], Any] | None = None
    response_status: int | None = None
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_body: bytes | None = None
    denials: list[str] = field(default_factory=list)
    upstream_failures: list[str] = field(default_factory=list)  # calls that failed beyond the guest
    halted: tuple[str, str] | None = None  # (status, reason) once a host-enforced limit ended the run
    truncated: dict[str, int] = field(default_factory=dict)  # output kind -> items cut or refused at a cap
    last_error: bytes | None = None  # "module::name: message" of the most recent failed call (`last_error`)
    # Set by the dispatcher when the run is cancelled (None: a run nobody can cancel, e.g. `wasmflow run`).
    cancel: CancelSignal | None = None
    # The flow's LLM token budget for this run's key, if it has one: the LLM host functions ask it before
    # each call and tell it what the call spent (see `TokenBudget`).
    budget: "TokenBudget | None" = None
    # Records (or, on an offline replay, answers) the calls that reach outside the guest: see
    # wasmflow/host_functions/transcript.py. None: the run is neither recorded nor replayed.
    tape: Any = None
    _results: dict[int, bytes] = field(default_factory=dict)
    _next_handle: int = 1
    _notes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def remaining(self) -> float:
        """Seconds left before the deadline; -1 once the run is cancelled (its deadline passed early)."""
        cancel = self.cancel
        if cancel is not None and cancel.reason is not None:
            return -1.0
        return self.deadline - time.monotonic()

    def cancelled(self) -> str | None:
        """Why the run was cancelled ("cancelled by ..."), or None."""
        return self.cancel.reason if self.cancel is not None else None

    def record_error(self, fn: "HostFunction", code: int, message: str) -> None:
        """Keep why a call failed so the guest can read it with `last_error` (a code alone says too little).

        Bounded to MAX_ERROR_MESSAGE bytes, cut on a character boundary; each failure replaces the last.
        """
        if not message:
            known = fn.module == "wasmflow" and code in set(Code)
            message = Code(code).name if known else f"error code {code}"
        data = f"{fn.module}::{fn.name}: {message}".encode("utf-8")
        if len(data) > MAX_ERROR_MESSAGE:
            data = data[:MAX_ERROR_MESSAGE].decode("utf-8", errors="ignore").encode("utf-8")
        self.last_error = data

    def deny(self, reason: str) -> HostError:
        """Record a refusal (it decides the run's status if the guest then fails) and return the error."""
        self.denials.append(reason)
        return HostError(Code.DENIED, reason)

    def note(self, message: str, level: str = "warn") -> None:
        """Log a host-side line into the run, e.g. why a call was refused (the guest gets the code, and the
        message through `last_error`).

        At most MAX_NOTES per run, then one line saying the rest were dropped.
        """
        self._notes += 1
        if self._notes <= MAX_NOTES:
            self.logs.append((time.time(), level, f"wasmflow: {message}"))
        elif self._notes == MAX_NOTES + 1:
            self.logs.append((time.time(), "warn", f"wasmflow: more than {MAX_NOTES} host messages; the rest are dropped"))

    def halt(self, status: str, reason: str) -> HostError:
        """End the run with `status` ("timeout" or "oom") once the current host call returns.

        Returns the error for the call to raise; `invoke` then raises `Halt` so the engine unwinds the
        guest at once, and the engine reports `status` whatever the guest would have done next.
        """
        if self.halted is None:
            self.halted = (status, reason)
        return HostError(Code.TIMEOUT if status == "timeout" else Code.LIMIT, reason)

    def put_result(self, data: bytes) -> tuple[int, int]:
        if len(self._results) >= MAX_RESULTS:
            raise HostError(Code.LIMIT, f"more than {MAX_RESULTS} unread results")
        handle = self._next_handle
        self._next_handle += 1
        self._results[handle] = bytes(data)
        return handle, len(data)

    def take_result(self, handle: int, length: int) -> bytes:
        data = self._results.get(handle)
        if data is None:
            raise HostError(Code.NOT_FOUND, f"no result handle {handle}")
        if len(data) != length:
            raise HostError(Code.INVALID, f"result {handle} has {len(data)} bytes, not {length}")
        del self._results[handle]
        return data


def write_result(call: Call, out_ptr: int, data: bytes) -> int:
    """Store `data` as a result and write its descriptor (handle, len) at out_ptr."""
    check_range(call.memory.size(), out_ptr, 8)
    handle, length = call.run.put_result(data)
    call.memory.write(out_ptr, struct.pack("<II", handle, length))
    return Code.OK


class TokenBudget(Protocol):
    """What the LLM host functions need of a token budget; the platform supplies one per run.

    `left()` is the tokens still allowed (0 or less: exhausted), `spend(n)` records a call's tokens,
    and `describe()` names the budget in the error a refused call gets ("200000 tokens per 1d for key
    acme"). The host functions never see the store: the platform sums what was spent before the run.
    """

    def left(self) -> int: ...

    def spend(self, tokens: int) -> None: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class Event:
    """An event as a run sees it: name, raw body, headers, and the key that makes effects idempotent."""

    name: str
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    trigger: str = "manual"

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            return None


@dataclass
class Setup:
    """What capabilities are built from (`Capability.build`): the flows file (None for a bare host),
    the directory its relative paths start from, the state directory, the database, and the
    capabilities built so far, by name: a later one may share an earlier one's resources (the LLM host
    functions use the WASI-NN model registry, so weights load once per process)."""

    flows: Any
    base_dir: Path
    state_dir: Path
    db: Any
    built: dict[str, "Capability"] = field(default_factory=dict)


class Capability:
    """One unit of the host: its functions, its process-wide resources, its per-run state.

    Subclasses set `name`, build themselves from their flows.yaml section in `build` (the one way the
    runtime makes every capability), keep process-wide resources (clients, pools, registries) and return
    their functions from `functions()`. `open_run` may put per-run state in `run.state[name]`;
    `close_run` releases it, and runs whatever the outcome of the run.
    """

    name: str = ""

    @classmethod
    def build(cls, setup: Setup) -> "Capability":
        """This capability for `setup`; the default suits one that needs nothing from flows.yaml."""
        return cls()

    def functions(self) -> list[HostFunction]:
        raise NotImplementedError

    def open_run(self, run: RunContext) -> None:
        return None

    def close_run(self, run: RunContext) -> None:
        return None

    def close(self) -> None:
        """Release process-wide resources."""
        return None
