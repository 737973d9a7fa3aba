"""The per-run transcript of host calls that reach outside the guest (transcript_replay.py plays it back).

Every effect a guest has on the world, and everything the world tells it, passes through a host call.
Recording those calls (the event, kv, HTTP, GitHub, LLM, WASI-NN, the WASI clock and random values)
makes a run reproducible offline: the same module fed the same answers takes the same path.

The recording is generic, at the level of guest memory, so that no capability needs to know about it:
for each call the tape keeps the bytes the host read from the guest (its inputs), the bytes it wrote
back and the results it queued (its outputs), the code it returned, and what it said on the side (log
notes, denials, a halt, host-side stdout). Addresses are kept relative to the call's pointer arguments
(or to a pointer read inside the call, as WASI-NN's tensor structs hold), so a new build of a guest,
whose buffers lie elsewhere, can be fed the same answers.

Three kinds of calls:
- internal (`INTERNAL`: logging, output, reading results): touch only the run's own state; never
  recorded, executed for real on replay.
- live (`LIVE`: config and secret reads): recorded with the value REDACTED (a config value by digest,
  a secret not at all), executed for real on replay, from the current flows.yaml and environment.
- everything else: recorded in full and, on replay, answered from the transcript without running
  the body, so a replay makes no network call, no write and no model call.

Secret values are never stored: every value of a secret the flow may read is replaced in every stored
byte string by `[secret:NAME]` (values shorter than MIN_SECRET bytes cannot be told apart from data,
docs/replay.md says why).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .spec import Call, Capability, Code, HostError, HostFunction, RunContext

WASI = "wasi_snapshot_preview1"
FORMAT = 1  # version of the stored document

INTERNAL = frozenset({
    ("wasmflow", "result_read"), ("wasmflow", "last_error"), ("wasmflow", "log"), ("wasmflow", "set_output"),
    ("wasmflow", "set_response_status"), ("wasmflow", "set_response_header"), ("wasmflow", "set_response_body"),
})
LIVE = frozenset({("wasmflow", "config_get"), ("wasmflow", "secret_get")})
MIN_SECRET = 4  # shorter secret values are not scrubbed byte-wise (they would match ordinary data)
VIA_SCAN = 4096  # reads up to this size are searched for pointers that later reads follow
ENTRY_OVERHEAD = 160  # bytes of JSON an entry costs besides its data (estimate for the size cap)
MAX_CALLS = 4096  # calls kept per run: a guest polling the clock would otherwise fill the limit with reads
KEEP_FINISHED = 32  # finished recordings kept for a caller to take (`TranscriptCapability.take`)

# WASI errno values (wasi_snapshot_preview1)
ERRNO_SUCCESS, ERRNO_FAULT, ERRNO_INVAL = 0, 21, 28
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # bytes better stored as base64
_CLOCKS = {0: time.time_ns, 1: time.monotonic_ns, 2: time.process_time_ns, 3: time.thread_time_ns}


def qualified(fn: HostFunction) -> str:
    return f"{fn.module}::{fn.name}"


def convert_args(kinds: tuple[str, ...], args: "tuple[int, ...] | list[int]") -> list[int]:
    """The raw engine integers as the kinds declare them (what `invoke` gives bodies)."""
    out = []
    for kind, raw in zip(kinds, args):
        if kind == "i32":
            out.append(((raw + 0x80000000) & 0xFFFFFFFF) - 0x80000000)
        elif kind == "i64":
            out.append(((raw + 0x8000000000000000) & 0xFFFFFFFFFFFFFFFF) - 0x8000000000000000)
        else:
            out.append(raw & 0xFFFFFFFF)
    return out


# -- encoding bytes in the stored JSON -----------------------------------------------------------

def encode(data: bytes) -> Any:
    """Text stays readable in the stored document (a console can show it); other bytes are base64."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or _CONTROL.search(text):
        return {"b64": base64.b64encode(data).decode("ascii")}
    return text


def decode(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict) and "b64" in value:
        return base64.b64decode(value["b64"])
    raise ValueError(f"not an encoded byte string: {value!r:.80}")


class Scrubber:
    """Replaces every secret value the run could see with `[secret:NAME]` in bytes and text."""

    def __init__(self, secrets: dict[str, str]) -> None:
        pairs = [(v.encode("utf-8"), f"[secret:{k}]".encode()) for k, v in secrets.items() if len(v.encode()) >= MIN_SECRET]
        self.pairs = sorted(pairs, key=lambda p: -len(p[0]))  # longer first: one secret may contain another

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def bytes(self, data: bytes) -> bytes:
        for value, mark in self.pairs:
            if value in data:
                data = data.replace(value, mark)
        return data

    def text(self, text: str) -> str:
        return self.bytes(text.encode("utf-8", "surrogateescape")).decode("utf-8", "replace") if self.pairs else text


def secret_values(flow: Any, environ: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The values of every secret the flow names (its `secrets:` and its LLM endpoints' key secrets)."""
    env = os.environ if environ is None else environ
    names = set(getattr(flow, "secrets", None) or ())
    llm = getattr(flow, "llm", None)
    for endpoint in (getattr(llm, "chat", None), getattr(llm, "embed", None)):
        name = getattr(endpoint, "api_key_secret", None)
        if name:
            names.add(name)
    return {name: env[name] for name in sorted(names) if env.get(name)}


# -- a guest memory that keeps what the host read and wrote ---------------------------------------

class Tap:
    """Wraps the call's GuestMemory; keeps (address, bytes) of every successful read and write."""

    __slots__ = ("mem", "reads", "writes")

    def __init__(self, mem: Any) -> None:
        self.mem = mem
        self.reads: list[tuple[int, bytes]] = []
        self.writes: list[tuple[int, bytes]] = []

    def size(self) -> int:
        return self.mem.size()

    def fits(self, ptr: int, length: int) -> bool:
        return ptr >= 0 and length >= 0 and ptr + length <= self.mem.size()

    def read(self, ptr: int, length: int) -> bytes:
        data = self.mem.read(ptr, length)
        self.reads.append((ptr, bytes(data)))
        return data

    def write(self, ptr: int, data: bytes) -> None:
        self.mem.write(ptr, data)
        self.writes.append((ptr, bytes(data)))

    def u32(self, ptr: int) -> int:
        return int.from_bytes(self.read(ptr, 4), "little")

    def put_u32(self, ptr: int, value: int) -> None:
        self.write(ptr, value.to_bytes(4, "little"))


def locate(addr: int, ptr_args: list[tuple[int, int]], reads: list[tuple[int, bytes]]) -> list[Any]:
    """Where `addr` came from, so a replay can find the same place in another build's memory:
    ["a", i, off] (pointer argument i + off), ["r", k, pos, off] (the u32 at byte pos of read k + off)
    or ["m", addr] (an absolute address)."""
    for i, value in ptr_args:
        if value == addr:
            return ["a", i, 0]
    needle = addr.to_bytes(4, "little")
    for k, (_, data) in enumerate(reads):
        if len(data) <= VIA_SCAN:
            pos = data.find(needle)
            while pos >= 0 and pos % 4:
                pos = data.find(needle, pos + 1)
            if pos >= 0:
                return ["r", k, pos, 0]
    below = [(addr - value, i) for i, value in ptr_args if value <= addr]
    if below:
        off, i = min(below)
        return ["a", i, off]
    return ["m", addr]


def resolve(ref: list[Any], args: list[int], reads: list[bytes]) -> Optional[int]:
    kind = ref[0]
    if kind == "a":
        return args[ref[1]] + ref[2] if ref[1] < len(args) else None
    if kind == "r":
        if ref[1] >= len(reads) or ref[2] + 4 > len(reads[ref[1]]):
            return None
        return int.from_bytes(reads[ref[1]][ref[2]:ref[2] + 4], "little") + ref[3]
    return int(ref[1])


# -- entries ---------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One host call as recorded (bytes kept raw until the document is written)."""

    fn: str
    args: list[Optional[int]]  # non-pointer arguments (pointers: None)
    reads: list[tuple[list[Any], bytes, int]]  # (where, bytes as stored, bytes the guest had there)
    writes: list[tuple[list[Any], Any]]  # data: bytes, or ("res", j): the descriptor of result j
    results: list[bytes]
    code: int
    raised: bool
    message: Optional[str]
    ms: float
    logs: list[tuple[str, str]] = field(default_factory=list)
    denials: list[str] = field(default_factory=list)
    upstream: list[str] = field(default_factory=list)
    halted: Optional[tuple[str, str]] = None
    stdout: list[bytes] = field(default_factory=list)
    redacted: Optional[str] = None  # "config" (results by digest) or "secret" (nothing kept)
    digests: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"fn": self.fn, "args": self.args, "code": self.code, "ms": round(self.ms, 3)}
        if self.reads:
            doc["reads"] = [[ref, encode(d)] if n == len(d) else [ref, encode(d), n] for ref, d, n in self.reads]
        if self.writes:
            doc["writes"] = [[ref, {"res": d[1]} if isinstance(d, tuple) else encode(d)] for ref, d in self.writes]
        if self.results:
            doc["results"] = [encode(r) for r in self.results]
        for name in ("logs", "denials", "upstream", "digests"):
            value = getattr(self, name)
            if value:
                doc[name] = [list(v) if isinstance(v, tuple) else v for v in value]
        if self.stdout:
            doc["stdout"] = [encode(s) for s in self.stdout]
        if self.raised:
            doc["raised"] = True
        if self.message:
            doc["message"] = self.message
        if self.halted:
            doc["halted"] = list(self.halted)
        if self.redacted:
            doc["redacted"] = self.redacted
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Entry":
        writes: list[tuple[list[Any], Any]] = []
        for ref, d in doc.get("writes", ()):
            writes.append((ref, ("res", d["res"]) if isinstance(d, dict) and "res" in d else decode(d)))
        return cls(
            fn=doc["fn"], args=list(doc.get("args", ())), reads=[_read_of(r) for r in doc.get("reads", ())],
            writes=writes, results=[decode(r) for r in doc.get("results", ())], code=int(doc["code"]),
            raised=bool(doc.get("raised")), message=doc.get("message"), ms=float(doc.get("ms", 0.0)),
            logs=[(a, b) for a, b in doc.get("logs", ())], denials=list(doc.get("denials", ())),
            upstream=list(doc.get("upstream", ())), halted=tuple(doc["halted"]) if doc.get("halted") else None,  # type: ignore[arg-type]
            stdout=[decode(s) for s in doc.get("stdout", ())], redacted=doc.get("redacted"),
            digests=list(doc.get("digests", ())),
        )

    def describe(self) -> str:
        """`wasmflow::kv_get("count")`: the function and its first inputs, short."""
        shown = [short(d) for _, d, _ in self.reads[:2]] or [str(a) for a in self.args if a is not None][:2]
        if self.redacted == "secret" and not shown:
            shown = ["(redacted)"]
        return f"{self.fn}({', '.join(shown)})"


def _read_of(doc: list[Any]) -> tuple[list[Any], bytes, int]:
    data = decode(doc[1])
    return doc[0], data, int(doc[2]) if len(doc) > 2 else len(data)


def short(data: bytes, width: int = 60) -> str:
    text = data.decode("utf-8", "replace")
    text = text if len(text) <= width else text[: width - 3] + "..."
    return repr(text).replace("'", '"', 2) if text.isprintable() else repr(data[:width // 2])


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


class _Capture:
    """What one call changes in the run besides memory: new results, notes, denials, a halt."""

    __slots__ = ("handle", "logs", "denials", "upstream", "halted", "stdout")

    def __init__(self, run: RunContext) -> None:
        self.handle = run._next_handle
        self.logs, self.denials, self.upstream = len(run.logs), len(run.denials), len(run.upstream_failures)
        self.halted = run.halted
        self.stdout: list[bytes] = []


@dataclass
class _Raw:
    """One call as it happened, kept as is until the transcript is read (`Recorder.entries`)."""

    fn: HostFunction
    args: Any
    tap: Tap
    results: list[tuple[int, bytes]]  # (handle, data) of the results the call queued
    code: int
    error: Optional[HostError]
    crash: Optional[str]  # the type of an exception that was not a HostError
    ms: float
    logs: list[tuple[float, str, str]]
    denials: list[str]
    upstream: list[str]
    halted: Optional[tuple[str, str]]
    stdout: list[bytes]

    def size(self) -> int:
        """Estimated bytes of the entry as JSON (base64 for the worst case), what `limits.transcript` bounds."""
        data = sum(len(d) for _, d in self.tap.reads) + sum(len(d) for _, d in self.tap.writes)
        data += sum(len(d) for _, d in self.results) + sum(len(d) for d in self.stdout)
        data += sum(len(m) for _, _, m in self.logs)
        return data * 4 // 3 + ENTRY_OVERHEAD


class Recorder:
    """The tape of one recorded run: `call` runs the body and keeps what crossed the boundary."""

    replaying = False

    def __init__(self, run: RunContext, limit: int, secrets: Optional[dict[str, str]] = None) -> None:
        self.run = run
        self.limit = limit
        values = secret_values(run.flow) if secrets is None else secrets
        self.secret_names = sorted(values)
        self.scrub = Scrubber(values)
        self._raw: list[_Raw] = []
        self._entries: Optional[list[Entry]] = None
        self.size = 0
        self.truncated_at: Optional[int] = None  # 1-based number of the first call not kept
        self.dropped = 0
        self.started = time.time()
        self._capture: Optional[_Capture] = None
        self._host_stdout = run.stdout
        if run.stdout is not None:
            run.stdout = self._stdout

    def _stdout(self, data: bytes) -> Any:
        """Host-side writes into the guest's stdout (WASI-NN stream-stdout) belong to the call making them."""
        if self._capture is not None:
            self._capture.stdout.append(bytes(data))
        return self._host_stdout(data) if self._host_stdout is not None else None

    def call(self, fn: HostFunction, call: Call, args: "tuple[int, ...] | list[int]") -> int:
        key = (fn.module, fn.name)
        if key in INTERNAL or self.truncated_at is not None:  # past the limit nothing is kept: no tap
            if self.truncated_at is not None and key not in INTERNAL:
                self.dropped += 1
            return int(fn.apply(fn.body, call, args))
        run = self.run
        tap = Tap(call.memory)
        capture = self._capture = _Capture(run)
        t0 = time.perf_counter()
        raised: Optional[BaseException] = None
        code = int(Code.INTERNAL)
        try:
            code = int(fn.apply(fn.body, Call(tap, run), args))
        except HostError as err:
            raised, code = err, err.code
        except BaseException as exc:
            raised = exc
        finally:
            self._capture = None
            tap.mem = None  # the engine's view of guest memory is valid for this call only
        ms = (time.perf_counter() - t0) * 1000
        if self.truncated_at is None:
            # Only what would be gone later is taken now (the call's results, notes, the halt); turning it
            # into an Entry (addresses, secrets scrubbed) waits for `entries`, off the run's hot path.
            results = [(h, run._results[h]) for h in range(capture.handle, run._next_handle) if h in run._results]
            raw = _Raw(fn, args, tap, results, code, raised if isinstance(raised, HostError) else None,
                       type(raised).__name__ if raised is not None and not isinstance(raised, HostError) else None,
                       ms, run.logs[capture.logs:], run.denials[capture.denials:],
                       run.upstream_failures[capture.upstream:], run.halted if run.halted != capture.halted else None,
                       capture.stdout)
            cost = raw.size()
            if self.size + cost > self.limit or len(self._raw) >= MAX_CALLS:
                self.truncated_at = len(self._raw) + 1
                self.dropped += 1
            else:
                self.size += cost
                self._raw.append(raw)
                self._entries = None
        else:
            self.dropped += 1
        if raised is not None:
            raise raised
        return code

    @property
    def entries(self) -> list[Entry]:
        """The recorded calls as entries (built on first use after the last call)."""
        if self._entries is None:
            self._entries = [self._entry(raw) for raw in self._raw]
        return self._entries

    def _entry(self, raw: "_Raw") -> Entry:
        scrub = self.scrub
        fn, tap = raw.fn, raw.tap
        key = (fn.module, fn.name)
        values = convert_args(fn.params, raw.args)
        ptr_args = [(i, v) for i, (k, v) in enumerate(zip(fn.params, values)) if k == "ptr"]
        reads: list[tuple[list[Any], bytes, int]] = []
        for k, (addr, data) in enumerate(tap.reads):
            reads.append((locate(addr, ptr_args, tap.reads[:k]), scrub.bytes(data) if scrub else data, len(data)))
        results = [data for _, data in raw.results]
        handles = {handle: j for j, (handle, _) in enumerate(raw.results)}
        writes: list[tuple[list[Any], Any]] = []
        for addr, data in tap.writes:
            ref = locate(addr, ptr_args, tap.reads)
            if len(data) == 8:
                handle, length = struct.unpack("<II", data)
                j = handles.get(handle)
                if j is not None and len(results[j]) == length:
                    writes.append((ref, ("res", j)))
                    continue
            writes.append((ref, scrub.bytes(data) if scrub else data))
        entry = Entry(
            fn=qualified(fn), args=[None if k == "ptr" else v for k, v in zip(fn.params, values)], reads=reads,
            writes=writes, results=[scrub.bytes(r) for r in results] if scrub else results, code=raw.code,
            raised=raw.error is not None, message=None, ms=raw.ms,
            logs=[(level, scrub.text(msg)) for _, level, msg in raw.logs],
            denials=[scrub.text(d) for d in raw.denials],
            upstream=[scrub.text(u) for u in raw.upstream],
            halted=raw.halted,
            stdout=[scrub.bytes(s) for s in raw.stdout],
        )
        if raw.error is not None:
            entry.message = scrub.text(raw.error.message)
        elif raw.crash is not None:
            entry.code, entry.message = int(Code.INTERNAL), f"host error {raw.crash}"
        if key == ("wasmflow", "config_get"):
            entry.redacted, entry.digests, entry.results, entry.writes = "config", [digest(r) for r in results], [], []
        elif key == ("wasmflow", "secret_get"):
            entry.redacted, entry.results, entry.writes, entry.stdout = "secret", [], [], []
        if entry.halted:
            entry.halted = (entry.halted[0], scrub.text(entry.halted[1]))
        return entry

    def document(self) -> dict[str, Any]:
        """The JSON document of the transcript (the run's result is added by whoever stores it)."""
        run = self.run
        return {
            "format": FORMAT,
            "run_id": run.run_id,
            "attempt": run.attempt,
            "flow": run.flow.name,
            "module": str(getattr(run.flow, "module", "")),
            "event": {"name": run.event.name, "trigger": run.event.trigger},
            "secrets": self.secret_names,  # names only: the values were scrubbed from every byte above
            "started_at": self.started,
            "limit": self.limit,
            "truncated": self.truncated_at is not None,
            "truncated_at": self.truncated_at,
            "dropped": self.dropped,
            "size_estimate": self.size,
            "entries": [e.to_json() for e in self._kept()],
        }

    def _kept(self) -> list[Entry]:
        """The entries to store. A truncated transcript cannot be replayed, so it keeps only what says what
        the run did: its WASI clock and random reads (thousands, for a guest polling the clock) are left
        out, and turning them into entries (a background writer's work) is never paid for."""
        if self.truncated_at is None:
            return self.entries
        return [self._entry(raw) for raw in self._raw if raw.fn.module != WASI]


# -- the capability: WASI clock and random through the host, and the tape of each run ---------------

def clock_time_get(call: Call, clock_id: int, _precision: int, out: int) -> int:
    """WASI's clock, served by the host so that the time a guest sees is recorded and replayable."""
    clock = _CLOCKS.get(clock_id)
    if clock is None:
        return ERRNO_INVAL
    try:
        call.memory.write(out, struct.pack("<Q", clock()))
    except HostError:
        return ERRNO_FAULT
    return ERRNO_SUCCESS


def random_get(call: Call, buf: int, length: int) -> int:
    """WASI's random bytes, served by the host (recorded, replayable)."""
    if not (buf + length <= call.memory.size()):
        return ERRNO_FAULT
    try:
        call.memory.write(buf, os.urandom(length))
    except HostError:
        return ERRNO_FAULT
    return ERRNO_SUCCESS


WASI_FUNCTIONS = (
    HostFunction(WASI, "clock_time_get", "u32 i64 ptr", ("i32",), clock_time_get),
    HostFunction(WASI, "random_get", "ptr len", ("i32",), random_get),
)


class TranscriptCapability(Capability):
    """Gives each run its tape: a recorder (flows with `limits.transcript` > 0), or the replay tape
    (transcript_replay.ReplayTape) a caller registered for that run id with `expect`. Finished recordings wait for `take`."""

    name = "transcript"

    def __init__(self) -> None:
        self._expected: dict[str, Any] = {}  # run id -> transcript_replay.ReplayTape
        self._finished: "collections.OrderedDict[str, Recorder]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._closers: list[Any] = []

    def functions(self) -> list[HostFunction]:
        return list(WASI_FUNCTIONS)

    def on_close(self, callback: Any) -> None:
        """Run `callback()` when the host closes (the platform's writer flushes what it holds)."""
        with self._lock:
            self._closers.append(callback)

    def close(self) -> None:
        with self._lock:
            closers, self._closers = self._closers, []
        for callback in closers:
            try:
                callback()
            except Exception:  # one closer failing must not skip the others
                logging.getLogger("wasmflow.transcript").exception("closing the transcript capability")

    def expect(self, run_id: str, tape: Any) -> None:
        """The run with this id is a replay: answer its calls from `tape`."""
        with self._lock:
            self._expected[run_id] = tape

    def forget(self, run_id: str) -> None:
        """Drop an `expect` the run never used (it stopped before it opened, e.g. over its memory cap)."""
        with self._lock:
            self._expected.pop(run_id, None)

    def take(self, run_id: str) -> Optional[Recorder]:
        """The finished recording of a run (once), or None."""
        with self._lock:
            return self._finished.pop(run_id, None)

    def open_run(self, run: RunContext) -> None:
        with self._lock:
            tape = self._expected.pop(run.run_id, None)
        if tape is not None:
            tape.bind(run)
            run.tape = tape
            return
        limit = int(getattr(getattr(run.flow, "limits", None), "transcript", 0) or 0)
        if limit > 0:
            run.tape = Recorder(run, limit)

    def close_run(self, run: RunContext) -> None:
        tape = run.tape
        # The tape points at the run; the run lets go of it, so the two are not a reference cycle that
        # only the cyclic collector frees (hundreds of objects per run, and its pauses at scale).
        run.tape = None
        if isinstance(tape, Recorder):
            if tape._host_stdout is not None:
                run.stdout = tape._host_stdout
            with self._lock:
                self._finished[run.run_id] = tape
                while len(self._finished) > KEEP_FINISHED:
                    self._finished.popitem(last=False)
