"""Playing a transcript back: the tape that answers a replayed run's host calls (docs/replay.md).

The recording side, and what an entry holds, is in transcript.py; this module matches the replayed
guest's calls against the entries, answers them from the transcript without running their bodies, and
keeps the first call that differs.
"""

from __future__ import annotations

import hashlib
import struct
import time
from typing import Any, Optional

from .spec import Call, Code, HostError, HostFunction, RunContext, write_result
from .transcript import (ERRNO_FAULT, ERRNO_SUCCESS, INTERNAL, LIVE, WASI, Entry, Scrubber, digest, resolve,
                         short, Tap, convert_args, qualified, secret_values)


class ReplayTape:
    """Answers a run's host calls from a recorded transcript; notes the first call that differs.

    Calls are matched in order. The first call that is not the next recorded one (another function,
    other arguments or other input bytes) is the divergence; after it, a call is still answered if the
    transcript has an unused identical call, the WASI clock and random values are made up (the last
    recorded time plus a microsecond; deterministic bytes), and any other call fails with DENIED and a
    message saying the recorded run never made it.
    """

    replaying = True

    def __init__(self, entries: list[Entry], secrets: Optional[dict[str, str]] = None) -> None:
        self.entries = entries
        self.used = [False] * len(entries)
        self.pos = 0
        self.count = 0  # external calls the replayed guest made
        self.divergence: Optional[str] = None
        self.diverged_at: Optional[int] = None
        self.unanswered = 0
        self.refused: list[str] = []  # calls the recorded run never made, answered DENIED
        self.notes: list[str] = []  # what the reader of the verdict should know (stand-ins used)
        self._secrets = secrets
        self.scrub = Scrubber({})
        self.run: Optional[RunContext] = None
        self._clock: dict[int, int] = {}
        for e in entries:
            if e.fn == f"{WASI}::clock_time_get" and e.writes and isinstance(e.writes[0][1], bytes) and e.args:
                self._clock[int(e.args[0] or 0)] = int.from_bytes(e.writes[0][1][:8], "little")
        self._random = 0

    def bind(self, run: RunContext) -> None:
        self.run = run
        self.scrub = Scrubber(secret_values(run.flow) if self._secrets is None else self._secrets)

    def _diverge(self, number: int, expected: str, got: str) -> None:
        if self.divergence is None:
            self.diverged_at = number
            self.divergence = f"call {number}: expected {expected}, got {got}"

    def finish(self) -> None:
        """After the run: recorded calls the replay never made are a divergence too."""
        if self.divergence is None and self.pos < len(self.entries):
            self._diverge(self.count + 1, self.entries[self.pos].describe(), "the end of the run")

    def call(self, fn: HostFunction, call: Call, args: "tuple[int, ...] | list[int]") -> int:
        key = (fn.module, fn.name)
        if key in INTERNAL:
            return int(fn.apply(fn.body, call, args))
        self.count += 1
        number = self.count
        name = qualified(fn)
        values = convert_args(fn.params, args)
        plain = [None if k == "ptr" else v for k, v in zip(fn.params, values)]
        if key in LIVE:
            return self._live(fn, call, args, values, plain, number)
        index = self._match(name, plain, values, call, self.pos)
        if index is None:
            candidate = self.entries[self.pos] if self.pos < len(self.entries) else None
            self._diverge(number, candidate.describe() if candidate else "the end of the recorded run",
                          _describe_call(fn, values, call.memory))
            index = next((i for i in range(self.pos + 1, len(self.entries))
                          if not self.used[i] and self._matches(self.entries[i], name, plain, values, call)), None)
        if index is None:
            return self._unanswered(fn, call, values, number)
        self._use(index)
        return self._serve(self.entries[index], call, values)

    def _use(self, index: int) -> None:
        self.used[index] = True
        while self.pos < len(self.entries) and self.used[self.pos]:
            self.pos += 1

    def _match(self, name: str, plain: list[Optional[int]], values: list[int], call: Call, index: int) -> Optional[int]:
        if index < len(self.entries) and not self.used[index] and self._matches(self.entries[index], name, plain, values, call):
            return index
        return None

    def _matches(self, entry: Entry, name: str, plain: list[Optional[int]], values: list[int], call: Call) -> bool:
        if entry.fn != name or entry.args != plain:
            return False
        seen: list[bytes] = []
        for ref, data, length in entry.reads:
            addr = resolve(ref, values, seen)
            if addr is None:
                return False
            try:
                got = call.memory.read(addr, length)
            except HostError:
                return False
            seen.append(got)
            if self.scrub.bytes(got) != data if self.scrub else got != data:
                return False
        return True

    def _serve(self, entry: Entry, call: Call, values: list[int]) -> int:
        run = call.run
        seen: list[bytes] = []
        for ref, _, length in entry.reads:  # the addresses later refs follow
            addr = resolve(ref, values, seen)
            seen.append(call.memory.read(addr, length) if addr is not None else b"")
        handles = [run.put_result(data)[0] for data in entry.results]
        for ref, data in entry.writes:
            addr = resolve(ref, values, seen)
            if addr is None:
                raise HostError(Code.INTERNAL, "offline replay: a recorded write has no place in this build")
            if isinstance(data, tuple):
                j = data[1]
                data = struct.pack("<II", handles[j], len(entry.results[j]))
            call.memory.write(addr, data)
        self._side_effects(entry, run)
        if entry.raised:
            raise HostError(entry.code, entry.message or "")
        return entry.code

    def _side_effects(self, entry: Entry, run: RunContext) -> None:
        now = time.time()
        run.logs.extend((now, level, message) for level, message in entry.logs)
        run.denials.extend(entry.denials)
        run.upstream_failures.extend(entry.upstream)
        for data in entry.stdout:
            if run.stdout is not None:
                run.stdout(data)
        if entry.halted and run.halted is None:
            run.halted = (entry.halted[0], entry.halted[1])

    def _live(self, fn: HostFunction, call: Call, args: Any, values: list[int], plain: list[Optional[int]],
              number: int) -> int:
        """Config and secret reads run for real (current flows.yaml, current environment); the recorded
        call is matched by its inputs and, for config, by the digest of the value."""
        run = call.run
        name = qualified(fn)
        tap = Tap(call.memory)
        handle = run._next_handle
        raised: Optional[HostError] = None
        try:
            code = int(fn.apply(fn.body, Call(tap, run), args))
        except HostError as err:
            raised, code = err, err.code
        new = [run._results[h] for h in range(handle, run._next_handle) if h in run._results]
        entry = self.entries[self.pos] if self.pos < len(self.entries) and not self.used[self.pos] else None
        inputs = [self.scrub.bytes(d) for _, d in tap.reads]
        same = (entry is not None and entry.fn == name and entry.args == plain
                and [d for _, d, _ in entry.reads] == inputs)
        if same and entry is not None:
            self._use(self.pos)
            if entry.redacted == "config" and code == entry.code and [digest(d) for d in new] != entry.digests:
                key = inputs[0].decode("utf-8", "replace") if inputs else "?"
                self._diverge(number, f"{name}({key!r}) = value {', '.join(entry.digests) or '(none)'}",
                              f"value {', '.join(digest(d) for d in new)} (the config differs from the recorded run)")
            elif entry.redacted == "secret" and entry.code == Code.OK and code == Code.NOT_FOUND:
                secret = inputs[0].decode("utf-8", "replace") if inputs else "?"
                raised = None  # not set here now: a stand-in value, so the replay can go on
                self.notes.append(f"secret {secret} is not set here: the guest got the stand-in value "
                                  f"[secret:{secret}], so calls that use it may differ; set it to replay exactly")
                code = write_result(call, values[2], f"[secret:{secret}]".encode())
            elif code != entry.code:
                self._diverge(number, f"{entry.describe()} -> code {entry.code}", f"code {code}")
        else:
            self._diverge(number, entry.describe() if entry else "the end of the recorded run",
                          f"{name}({', '.join(short(d) for d in inputs[:2])})")
        if raised is not None:
            raise raised
        return code

    def _unanswered(self, fn: HostFunction, call: Call, values: list[int], number: int) -> int:
        """A call the recorded run never made: WASI clock/random are made up, anything else is refused."""
        self.unanswered += 1
        if fn.module == WASI and fn.name == "clock_time_get":
            clock = values[0]
            value = self._clock.get(clock, 0) + 1000
            self._clock[clock] = value
            try:
                call.memory.write(values[2], struct.pack("<Q", value))
            except HostError:
                return ERRNO_FAULT
            return ERRNO_SUCCESS
        if fn.module == WASI and fn.name == "random_get":
            out = bytearray()
            while len(out) < values[1]:
                self._random += 1
                out += hashlib.sha256(b"wasmflow-replay-%d" % self._random).digest()
            try:
                call.memory.write(values[0], bytes(out[: values[1]]))
            except HostError:
                return ERRNO_FAULT
            return ERRNO_SUCCESS
        reason = (f"offline replay: the recorded run made no call {_describe_call(fn, values, call.memory)} "
                  f"(call {number}); there is no recorded answer")
        self.refused.append(reason)
        raise call.run.deny(reason)


def _describe_call(fn: HostFunction, values: list[int], memory: Any) -> str:
    """A call as the guest made it: the function and the bytes of its (ptr, len) argument pairs."""
    shown: list[str] = []
    kinds = fn.params
    i = 0
    while i < len(kinds):
        if kinds[i] == "ptr" and i + 1 < len(kinds) and kinds[i + 1] == "len":
            try:
                shown.append(short(memory.read(values[i], min(values[i + 1], 4096))))
            except HostError:
                shown.append("<bad pointer>")
            i += 2
            continue
        if kinds[i] != "ptr":
            shown.append(str(values[i]))
        i += 1
    return f"{qualified(fn)}({', '.join(shown[:3])})"


