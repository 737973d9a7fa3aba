"""kv's atomic operations: `kv_increment` and `kv_cas`, on SQLite and PostgreSQL, through both engines.

Before these, a counter was `get` then `set`, and concurrent runs lost increments (1,000 runs of
`hello` counted 461). Each operation is one statement, so the database serialises it; these tests race
threads against one key and require the exact total.
"""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from hostile_support import engine_name, run_flow  # noqa: F401
from wasmflow.engine import Status
from wasmflow.flows.model import FlowsFile
from wasmflow.host_functions.kv import KeyValueStore, KvValueError
from wasmflow.host_functions.spec import Event
from wasmflow.storage import open_database
from wasmflow.runtime import Runtime

I64_MAX = 2**63 - 1


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = f"sqlite:///{tmp_path / 'kv.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    db = open_database(url)
    yield KeyValueStore(db)
    db.dispose()


def race(threads: int, body: Callable[[], None]) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            body()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []


def test_increment_creates_adds_and_stores_decimal_text(store: KeyValueStore) -> None:
    assert store.increment("f", "n", 5) == 5
    assert store.increment("f", "n", -7) == -2
    assert store.get("f", "n") == b"-2"  # readable by kv_get and by a guest that parses text
    store.set("f", "m", b"41")
    assert store.increment("f", "m", 1) == 42
    assert store.increment("other", "m", 1) == 1  # flows stay separate


@pytest.mark.parametrize("value", [b"abc", b"", b"1.5", b" 7", b"007", b"-0", b"\xff", b"99999999999999999999"])
def test_increment_of_a_non_integer_value_is_refused_and_leaves_it(store: KeyValueStore, value: bytes) -> None:
    store.set("f", "k", value)
    with pytest.raises(KvValueError, match="not a decimal integer"):
        store.increment("f", "k", 1)
    assert store.get("f", "k") == value


def test_increment_past_64_bits_is_refused(store: KeyValueStore) -> None:
    store.set("f", "k", str(I64_MAX - 1).encode())
    assert store.increment("f", "k", 1) == I64_MAX
    with pytest.raises(KvValueError, match="overflow"):
        store.increment("f", "k", 1)
    store.set("f", "low", str(-I64_MAX).encode())
    assert store.increment("f", "low", -1) == -I64_MAX - 1
    with pytest.raises(KvValueError, match="overflow"):
        store.increment("f", "low", -1)
    assert store.get("f", "low") == str(-I64_MAX - 1).encode()


def test_compare_and_set(store: KeyValueStore) -> None:
    assert store.compare_and_set("f", "k", None, b"first") is True  # absent -> created
    assert store.compare_and_set("f", "k", None, b"again") is False  # no longer absent
    assert store.compare_and_set("f", "k", b"wrong", b"x") is False
    assert store.get("f", "k") == b"first"
    assert store.compare_and_set("f", "k", b"first", b"second") is True
    assert store.get("f", "k") == b"second"
    assert store.compare_and_set("f", "absent", b"", b"x") is False  # empty is a value, not absence
    assert store.compare_and_set("g", "k", b"second", b"x") is False  # other flow: absent there


def test_concurrent_increments_are_exact(store: KeyValueStore) -> None:
    race(8, lambda: [store.increment("f", "hot", 1) for _ in range(50)])
    assert store.get("f", "hot") == b"400"


def test_concurrent_compare_and_set_loops_are_exact(store: KeyValueStore) -> None:
    def bump() -> None:
        for _ in range(25):
            while True:
                old = store.get("f", "cas")
                new = str(int(old or b"0") + 1).encode()
                if store.compare_and_set("f", "cas", old, new):
                    break

    race(4, bump)
    assert store.get("f", "cas") == b"100"


# -- the ABI, through a real guest on each engine --------------------------------------------------

ABI_GUEST = """(module
  (import "wasmflow" "kv_increment" (func $inc (param i32 i32 i64 i32) (result i32)))
  (import "wasmflow" "kv_cas" (func $cas (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "count")
  (data (i32.const 16) "lock")
  (data (i32.const 32) "mine")
  (data (i32.const 48) "theirs")
  (func (export "_start")
    ;; out[100..]: code, i64 value, code, i64 value, code, swapped, code, swapped, code, swapped
    (i32.store (i32.const 100) (call $inc (i32.const 0) (i32.const 5) (i64.const 5000000000) (i32.const 104)))
    (i32.store (i32.const 112) (call $inc (i32.const 0) (i32.const 5) (i64.const -1) (i32.const 116)))
    (i32.store (i32.const 124) (call $cas (i32.const 16) (i32.const 4) (i32.const 0) (i32.const -1)
                                          (i32.const 32) (i32.const 4) (i32.const 128)))
    (i32.store (i32.const 132) (call $cas (i32.const 16) (i32.const 4) (i32.const 0) (i32.const -1)
                                          (i32.const 48) (i32.const 6) (i32.const 136)))
    (i32.store (i32.const 140) (call $cas (i32.const 16) (i32.const 4) (i32.const 32) (i32.const 4)
                                          (i32.const 48) (i32.const 6) (i32.const 144)))
    (drop (call $out (i32.const 100) (i32.const 48)))))"""


def test_the_abi_on_both_engines(engine_name: str, tmp_path: Path) -> None:
    result = run_flow(engine_name, tmp_path, ABI_GUEST, allow={"kv": True})
    assert result.status is Status.OK, result.error
    fields = struct.unpack("<iqiqiIiIiI", result.output)
    assert fields == (0, 5_000_000_000, 0, 4_999_999_999, 0, 1, 0, 0, 0, 1)
    db = open_database(f"sqlite:///{tmp_path / 'state' / 'wasmflow.db'}")
    try:
        kv = KeyValueStore(db)
        assert kv.get("hostile", "count") == b"4999999999" and kv.get("hostile", "lock") == b"theirs"
    finally:
        db.dispose()


def test_increment_without_allow_kv_is_denied(engine_name: str, tmp_path: Path) -> None:
    result = run_flow(engine_name, tmp_path, ABI_GUEST)
    assert result.status is Status.OK, result.error
    assert struct.unpack("<i", result.output[:4]) == (2,)  # DENIED
    assert result.denials


def test_concurrent_hello_runs_count_exactly(engine_name: str, guest_wasm: dict[str, Path], tmp_path: Path) -> None:
    flows = FlowsFile.model_validate({
        "state_dir": str(tmp_path / "state"),
        "flows": [{"name": "hello", "module": str(guest_wasm["hello"]), "allow": {"kv": True}}],
    })
    runtime = Runtime(flows, base_dir=tmp_path, engine_override=engine_name)
    counts: list[int] = []
    lock = threading.Lock()

    def runs() -> None:
        for _ in range(15):
            result = runtime.run("hello", Event("manual", b'{"name": "race"}'))
            assert result.status is Status.OK, result.error
            with lock:
                counts.append(json.loads(result.output)["count"])

    try:
        race(4, runs)
    finally:
        runtime.close()
    assert sorted(counts) == list(range(1, 61)), "lost or repeated increments"
