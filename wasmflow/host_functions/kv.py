"""Key-value storage scoped to the flow, persisted in the store's `kv` table.

A flow must declare `allow.kv: true`; keys are private to the flow (the flow name is part of the
primary key), so two flows never see each other's data.

Besides get/set, two atomic operations, because concurrent runs of one flow doing get-then-set lose
updates: `kv_increment` (a counter kept as decimal text) and `kv_cas` (compare-and-set on the value's
bytes). Each is a single SQL statement, so SQLite's write lock or PostgreSQL's row lock serialises it.
"""

from __future__ import annotations

import json
import re
import struct
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from wasmflow.fields import Section
from wasmflow.storage.driver import DriverStatement, driver_autocommit, driver_transaction
from wasmflow.storage.migrations import migrate
from wasmflow.storage.schema import metadata
from wasmflow.storage.sqlite_writes import take_write_turn

from .spec import Call, Capability, Code, HostError, HostFunction, Setup, check_range, read_str, write_result


class KvAllow(Section):
    """The capability's part of a flow's `allow:` (flows/model.py's `Allow` is made of such parts)."""

    kv: bool = False  # the flow may read and write its own keys


# The capability's own table, registered into the shared schema: opening a database creates it.
kv_table = sa.Table(
    "kv",
    metadata,
    sa.Column("flow", sa.String(128), primary_key=True),
    sa.Column("key", sa.String(512), primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

MAX_KEY = 512
MAX_VALUE = 1024 * 1024
MAX_KEYS_LISTED = 1000
ABSENT = 0xFFFFFFFF  # kv_cas: an expected length of u32::MAX means "the key must be absent"
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
_INTEGER = re.compile(rb"0|-?[1-9][0-9]{0,18}")  # what kv_increment reads: canonical decimal, as it writes

# One UPSERT per increment. An existing value is added to only if it is a canonical decimal integer
# and the sum fits in 64 bits (the WHERE of DO UPDATE); otherwise no row comes back and nothing changes.
_INCREMENT_SQL = {
    "sqlite": """
        INSERT INTO kv (flow, key, value, updated_at) VALUES (:p_flow, :p_key, :p_initial, :p_now)
        ON CONFLICT (flow, key) DO UPDATE
        SET value = CAST(CAST(CAST(CAST(kv.value AS TEXT) AS INTEGER) + :p_delta AS TEXT) AS BLOB),
            updated_at = excluded.updated_at
        WHERE CAST(CAST(CAST(kv.value AS TEXT) AS INTEGER) AS TEXT) = CAST(kv.value AS TEXT)
          AND CASE WHEN :p_delta >= 0 THEN CAST(CAST(kv.value AS TEXT) AS INTEGER) <= 9223372036854775807 - :p_delta
                   ELSE CAST(CAST(kv.value AS TEXT) AS INTEGER) >= (-9223372036854775807 - 1) - :p_delta END
        RETURNING value""",
    "postgresql": """
        INSERT INTO kv (flow, key, value, updated_at) VALUES (:p_flow, :p_key, :p_initial, :p_now)
        ON CONFLICT (flow, key) DO UPDATE
        SET value = convert_to((encode(kv.value, 'escape')::numeric + :p_delta)::text, 'UTF8'),
            updated_at = excluded.updated_at
        WHERE CASE WHEN encode(kv.value, 'escape') ~ '^(0|-?[1-9][0-9]{0,18})$'
                   THEN encode(kv.value, 'escape')::numeric + :p_delta
                        BETWEEN -9223372036854775808 AND 9223372036854775807
                   ELSE false END
        RETURNING value""",
}


class KvValueError(ValueError):
    """An atomic operation that cannot apply to the stored value (not an integer, or it would overflow)."""


class KeyValueStore:
    """Plain Python access to the kv table, used by the capability and by tests and the CLI.

    Statements are built once with bind parameters: building SQLAlchemy expressions per call cost more
    than the database work itself on a run's hot path. get, set and delete (what most guests call) run
    on the driver's cursor (`DriverStatement`), compiled when the store is made: through SQLAlchemy's
    execution each took about as long as the database's work, and a process's first run compiled each
    statement it met (a new process's first get took a millisecond).
    """

    _flow, _key, _value, _now = (sa.bindparam(n) for n in ("p_flow", "p_key", "p_value", "p_now"))
    _where = sa.and_(kv_table.c.flow == _flow, kv_table.c.key == _key)
    _get = sa.select(kv_table.c.value).where(_where)
    _delete = kv_table.delete().where(_where)
    _swap = (kv_table.update().where(_where, kv_table.c.value == sa.bindparam("p_expected", type_=sa.LargeBinary))
             .values(value=_value, updated_at=_now).returning(kv_table.c.key))

    def __init__(self, db: sa.Engine) -> None:
        self.db = db
        # The database may have been opened before this module registered `kv`: create it now (idempotent).
        migrate(db)
        # One statement per write (INSERT ... ON CONFLICT DO UPDATE, which SQLite and PostgreSQL share):
        # a single round trip, and concurrent writers cannot race between an UPDATE and an INSERT.
        dialect = {"postgresql": postgresql, "sqlite": sqlite}[db.dialect.name]
        insert = dialect.insert(kv_table).values(flow=self._flow, key=self._key, value=self._value, updated_at=self._now)
        self._upsert = insert.on_conflict_do_update(
            index_elements=[kv_table.c.flow, kv_table.c.key],
            set_={"value": insert.excluded.value, "updated_at": insert.excluded.updated_at},
        )
        # RETURNING, not rowcount: drivers disagree on rowcount for ON CONFLICT DO NOTHING.
        self._create = insert.on_conflict_do_nothing(index_elements=[kv_table.c.flow, kv_table.c.key]).returning(
            kv_table.c.key
        )
        # The counting guests' hot path, on the driver's cursor (`DriverStatement`): through SQLAlchemy's
        # execution it took a PostgreSQL worker more interpreter time than the rest of the run.
        self._increment = DriverStatement(sa.text(_INCREMENT_SQL[db.dialect.name]), db.dialect)
        self._driver_get = DriverStatement(self._get, db.dialect)
        self._driver_set = DriverStatement(self._upsert, db.dialect)
        self._driver_delete = DriverStatement(self._delete, db.dialect)

    def _on_driver(self, statement: DriverStatement, params: dict[str, Any], writes: bool) -> Any:
        """Run one statement on the driver's cursor and return its first row (None if it has none). On
        SQLite in a transaction, with the write turn when it `writes`; on PostgreSQL committing itself
        (autocommit: one round trip, no BEGIN and COMMIT around it, for a read as for a write)."""
        on_sqlite = self.db.dialect.name == "sqlite"
        with driver_transaction(self.db) if on_sqlite else driver_autocommit(self.db) as raw:
            if on_sqlite and writes:
                take_write_turn(raw)
            cursor = raw.cursor()
            try:
                statement.execute(cursor, params)
                return cursor.fetchone() if cursor.description is not None else None
            finally:
                cursor.close()

    def get(self, flow: str, key: str) -> bytes | None:
        row = self._on_driver(self._driver_get, {"p_flow": flow, "p_key": key}, writes=False)
        return None if row is None else bytes(row[0])

    def _one_statement(self) -> Any:
        """A transaction for one writing statement. On PostgreSQL the statement commits itself
        (autocommit): one round trip instead of the statement's and the COMMIT's."""
        if self.db.dialect.name == "postgresql":
            return self.db.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self.db.begin()

    def set(self, flow: str, key: str, value: bytes) -> None:
        self._on_driver(self._driver_set, {"p_flow": flow, "p_key": key, "p_value": value, "p_now": time.time()},
                        writes=True)

    def delete(self, flow: str, key: str) -> None:
        self._on_driver(self._driver_delete, {"p_flow": flow, "p_key": key}, writes=True)

    def increment(self, flow: str, key: str, delta: int) -> int:
        """Add `delta` to the integer stored as decimal text under `key` (absent: 0) and return the sum.

        Atomic: concurrent increments of one key never lose one. KvValueError if the stored value is
        not a canonical decimal integer (`-?[1-9][0-9]*` or `0`) or the sum leaves the i64 range.
        """
        if not I64_MIN <= delta <= I64_MAX:
            raise KvValueError(f"the increment {delta} is outside the 64-bit range")
        params = {"p_flow": flow, "p_key": key, "p_initial": str(delta).encode(), "p_delta": delta, "p_now": time.time()}
        row = self._on_driver(self._increment, params, writes=True)
        if row is not None:
            return int(bytes(row[0]))
        current = self.get(flow, key) or b""
        if _INTEGER.fullmatch(current) and I64_MIN <= int(current) <= I64_MAX:
            raise KvValueError(f"adding {delta} to the value of {key!r} ({current.decode()}) would overflow 64 bits")
        raise KvValueError(f"the value of {key!r} is not a decimal integer (kv_increment reads values like 42 or -7)")

    def compare_and_set(self, flow: str, key: str, expected: bytes | None, value: bytes) -> bool:
        """Set `key` to `value` only if its value is exactly `expected` (None: only if it is absent).

        Atomic; returns whether the value was set. Comparing bytes, not a version, keeps the table as it
        is and lets a guest swap from a value it read with kv_get.
        """
        params = {"p_flow": flow, "p_key": key, "p_value": value, "p_now": time.time()}
        with self._one_statement() as conn:
            if expected is None:
                row = conn.execute(self._create, params).first()
            else:
                row = conn.execute(self._swap, {**params, "p_expected": expected}).first()
        return row is not None

    def keys(self, flow: str, prefix: str = "", limit: int = MAX_KEYS_LISTED) -> list[str]:
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self.db.connect() as conn:
            rows = conn.execute(
                sa.select(kv_table.c.key)
                .where(kv_table.c.flow == flow, kv_table.c.key.like(escaped + "%", escape="\\"))
                .order_by(kv_table.c.key)
                .limit(limit)
            ).all()
        return [r[0] for r in rows]


class KeyValueCapability(Capability):
    name = "kv"

    @classmethod
    def build(cls, setup: Setup) -> "KeyValueCapability":
        return cls(KeyValueStore(setup.db))

    def __init__(self, store: KeyValueStore) -> None:
        self.store = store

    def functions(self) -> list[HostFunction]:
        return [
            HostFunction("wasmflow", "kv_get", "ptr len ptr", ("i32",), self.kv_get),
            HostFunction("wasmflow", "kv_set", "ptr len ptr len", ("i32",), self.kv_set),
            HostFunction("wasmflow", "kv_delete", "ptr len", ("i32",), self.kv_delete),
            HostFunction("wasmflow", "kv_keys", "ptr len ptr", ("i32",), self.kv_keys),
            HostFunction("wasmflow", "kv_increment", "ptr len i64 ptr", ("i32",), self.kv_increment),
            HostFunction("wasmflow", "kv_cas", "ptr len ptr len ptr len ptr", ("i32",), self.kv_cas),
        ]

    def _key(self, call: Call, ptr: int, length: int) -> str:
        if not call.run.flow.allow.kv:
            raise call.run.deny("key-value storage is not allowed (set allow.kv: true)")
        if length > MAX_KEY:
            raise HostError(Code.TOO_LARGE, f"key over {MAX_KEY} bytes")
        key = read_str(call.memory, ptr, length)
        if "\0" in key:  # PostgreSQL cannot store it in text; refused on SQLite too, so both agree
            raise HostError(Code.INVALID, "keys may not contain NUL characters")
        return key

    def _value(self, call: Call, ptr: int, length: int) -> bytes:
        if length > MAX_VALUE:
            raise HostError(Code.TOO_LARGE, f"value over {MAX_VALUE} bytes")
        return call.memory.read(ptr, length)

    def kv_get(self, call: Call, key_ptr: int, key_len: int, out: int) -> int:
        key = self._key(call, key_ptr, key_len)
        value = self.store.get(call.run.flow.name, key)
        if value is None:
            raise HostError(Code.NOT_FOUND, f"no key {key!r}")
        return write_result(call, out, value)

    def kv_set(self, call: Call, key_ptr: int, key_len: int, val_ptr: int, val_len: int) -> int:
        key = self._key(call, key_ptr, key_len)
        self.store.set(call.run.flow.name, key, self._value(call, val_ptr, val_len))
        return Code.OK

    def kv_delete(self, call: Call, key_ptr: int, key_len: int) -> int:
        self.store.delete(call.run.flow.name, self._key(call, key_ptr, key_len))
        return Code.OK

    def kv_keys(self, call: Call, prefix_ptr: int, prefix_len: int, out: int) -> int:
        prefix = self._key(call, prefix_ptr, prefix_len)
        return write_result(call, out, json.dumps(self.store.keys(call.run.flow.name, prefix)).encode())

    def kv_increment(self, call: Call, key_ptr: int, key_len: int, delta: int, out: int) -> int:
        """Add `delta` (i64) to the counter under the key; the new value is written at out as an i64."""
        key = self._key(call, key_ptr, key_len)
        check_range(call.memory.size(), out, 8)  # before the write to the database, not after
        try:
            value = self.store.increment(call.run.flow.name, key, delta)
        except KvValueError as exc:
            call.run.note(f"kv_increment: {exc}")
            raise HostError(Code.INVALID, str(exc)) from None
        call.memory.write(out, struct.pack("<q", value))
        return Code.OK

    def kv_cas(self, call: Call, key_ptr: int, key_len: int, exp_ptr: int, exp_len: int,
               val_ptr: int, val_len: int, out: int) -> int:
        """Set the key to the value if it holds exactly the expected bytes (length u32::MAX: if absent);
        writes a u32 at out: 1 if it was set, 0 if not."""
        key = self._key(call, key_ptr, key_len)
        expected = None if exp_len == ABSENT else self._value(call, exp_ptr, exp_len)
        value = self._value(call, val_ptr, val_len)
        check_range(call.memory.size(), out, 4)
        swapped = self.store.compare_and_set(call.run.flow.name, key, expected, value)
        call.memory.write(out, struct.pack("<I", int(swapped)))
        return Code.OK
