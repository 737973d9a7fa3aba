"""Key-value storage scoped to the flow, persisted in the store's `kv` table.

A flow must declare `allow.kv: true`; keys are private to the flow (the flow name is part of the
primary key), so two flows never see each other's data.
"""

from __future__ import annotations

import json
import time

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from wasmflow.platform.db import kv_table

from .spec import Call, Capability, Code, HostError, HostFunction, i32s, read_str, write_result

MAX_KEY = 512
MAX_VALUE = 1024 * 1024
MAX_KEYS_LISTED = 1000


class KeyValueStore:
    """Plain Python access to the kv table, used by the capability and by tests and the CLI.

    Statements are built once with bind parameters: building SQLAlchemy expressions per call cost more
    than the database work itself on a run's hot path.
    """

    _flow, _key, _value, _now = (sa.bindparam(n) for n in ("p_flow", "p_key", "p_value", "p_now"))
    _where = sa.and_(kv_table.c.flow == _flow, kv_table.c.key == _key)
    _get = sa.select(kv_table.c.value).where(_where)
    _delete = kv_table.delete().where(_where)

    def __init__(self, db: sa.Engine) -> None:
        self.db = db
        # One statement per write (INSERT ... ON CONFLICT DO UPDATE, which SQLite and PostgreSQL share):
        # a single round trip, and concurrent writers cannot race between an UPDATE and an INSERT.
        dialect = {"postgresql": postgresql, "sqlite": sqlite}[db.dialect.name]
        insert = dialect.insert(kv_table).values(flow=self._flow, key=self._key, value=self._value, updated_at=self._now)
        self._upsert = insert.on_conflict_do_update(
            index_elements=[kv_table.c.flow, kv_table.c.key],
            set_={"value": insert.excluded.value, "updated_at": insert.excluded.updated_at},
        )

    def get(self, flow: str, key: str) -> bytes | None:
        with self.db.connect() as conn:
            row = conn.execute(self._get, {"p_flow": flow, "p_key": key}).first()
        return None if row is None else bytes(row[0])

    def set(self, flow: str, key: str, value: bytes) -> None:
        with self.db.begin() as conn:
            conn.execute(self._upsert, {"p_flow": flow, "p_key": key, "p_value": value, "p_now": time.time()})

    def delete(self, flow: str, key: str) -> None:
        with self.db.begin() as conn:
            conn.execute(self._delete, {"p_flow": flow, "p_key": key})

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

    def __init__(self, store: KeyValueStore) -> None:
        self.store = store

    def functions(self) -> list[HostFunction]:
        return [
            HostFunction("wasmflow", "kv_get", i32s(3), ("i32",), self.kv_get),
            HostFunction("wasmflow", "kv_set", i32s(4), ("i32",), self.kv_set),
            HostFunction("wasmflow", "kv_delete", i32s(2), ("i32",), self.kv_delete),
            HostFunction("wasmflow", "kv_keys", i32s(3), ("i32",), self.kv_keys),
        ]

    def _key(self, call: Call, ptr: int, length: int) -> str:
        if not call.run.flow.allow.kv:
            raise call.run.deny("key-value storage is not allowed (set allow.kv: true)")
        if (length & 0xFFFFFFFF) > MAX_KEY:
            raise HostError(Code.TOO_LARGE, f"key over {MAX_KEY} bytes")
        return read_str(call.memory, ptr, length)

    def kv_get(self, call: Call, key_ptr: int, key_len: int, out: int) -> int:
        key = self._key(call, key_ptr, key_len)
        value = self.store.get(call.run.flow.name, key)
        if value is None:
            raise HostError(Code.NOT_FOUND, f"no key {key!r}")
        return write_result(call, out, value)

    def kv_set(self, call: Call, key_ptr: int, key_len: int, val_ptr: int, val_len: int) -> int:
        key = self._key(call, key_ptr, key_len)
        if (val_len & 0xFFFFFFFF) > MAX_VALUE:
            raise HostError(Code.TOO_LARGE, f"value over {MAX_VALUE} bytes")
        self.store.set(call.run.flow.name, key, call.memory.read(val_ptr, val_len))
        return Code.OK

    def kv_delete(self, call: Call, key_ptr: int, key_len: int) -> int:
        self.store.delete(call.run.flow.name, self._key(call, key_ptr, key_len))
        return Code.OK

    def kv_keys(self, call: Call, prefix_ptr: int, prefix_len: int, out: int) -> int:
        prefix = self._key(call, prefix_ptr, prefix_len)
        return write_result(call, out, json.dumps(self.store.keys(call.run.flow.name, prefix)).encode())
