"""The key-value store on both databases: upsert, scoping, prefixes with LIKE's special characters."""

from __future__ import annotations

import threading

import pytest

from wasmflow.host_functions.kv import KeyValueStore
from wasmflow.storage import open_database


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):  # type: ignore[no-untyped-def]
    """A fresh store: SQLite in tmp_path, or PostgreSQL in a schema of its own (`pg_url`)."""
    url = f"sqlite:///{tmp_path / 'kv.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    db = open_database(url)
    yield KeyValueStore(db), "flow"
    db.dispose()


def test_set_overwrites_and_flows_are_separate(store):
    kv, flow = store
    assert kv.get(flow, "k") is None
    kv.set(flow, "k", b"one")
    kv.set(flow, "k", b"two")
    kv.set(flow + "-other", "k", b"theirs")
    assert kv.get(flow, "k") == b"two" and kv.get(flow + "-other", "k") == b"theirs"
    kv.delete(flow, "k")
    kv.delete(flow, "k")  # absent: still fine
    assert kv.get(flow, "k") is None and kv.get(flow + "-other", "k") == b"theirs"


def test_keys_by_prefix_treat_like_wildcards_literally(store):
    kv, flow = store
    for key in ("issue:1", "issue:2", "issue_x", "issueZ", "other"):
        kv.set(flow, key, b"v")
    assert kv.keys(flow, "issue:") == ["issue:1", "issue:2"]
    assert kv.keys(flow, "issue_") == ["issue_x"]  # `_` is not "any character"
    assert kv.keys(flow, "") == ["issue:1", "issue:2", "issueZ", "issue_x", "other"]


def test_concurrent_writers_to_one_key_never_fail(store):
    kv, flow = store
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(20):
                kv.set(flow, "hot", f"{n}:{i}".encode())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert kv.get(flow, "hot").endswith(b":19")


def test_kv_owns_its_table_even_when_the_database_was_opened_before_kv_was_imported(tmp_path):
    """Storage knows no capability: `kv` registers its table, and creates it when a store opens on a database
    opened before the capability was imported (a fresh interpreter, so nothing is imported yet)."""
    import subprocess
    import sys

    script = (
        "import sys, sqlalchemy as sa\n"
        "from wasmflow.storage import open_database\n"
        "db = open_database(sys.argv[1])\n"
        "assert 'wasmflow.host_functions.kv' not in sys.modules\n"
        "print(sa.inspect(db).has_table('kv'))\n"
        "from wasmflow.host_functions.kv import KeyValueStore\n"
        "kv = KeyValueStore(db)\n"
        "kv.set('f', 'k', b'v')\n"
        "print(sa.inspect(db).has_table('kv'), kv.get('f', 'k'))\n"
    )
    url = f"sqlite:///{tmp_path / 'late.db'}"
    proc = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["False", "True b'v'"]
