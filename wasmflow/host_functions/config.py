"""Configuration values and declared secrets.

Secrets are read from the host's environment at call time and only for names the flow lists under
`secrets:`; a flow cannot probe for others. Both also form the guest's WASI environment (`wasi_env`).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Mapping

from .spec import Call, Capability, Code, HostError, HostFunction, read_str, write_result


def config_value_text(value: Any) -> str:
    """A config value as the guest reads it: strings as written, dates as ISO text, the rest as JSON.

    Never raises: flows.yaml gives JSON types only, but a Flow built in code may hold anything, and a
    value the host cannot encode must not turn a guest's config_get into INTERNAL.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return json.dumps(value, default=str)


def wasi_env(flow: Any, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The only environment a guest sees: the flow's config values and its declared, set secrets."""
    environ = os.environ if environ is None else environ
    env = {str(k): config_value_text(v) for k, v in flow.config.items()}
    env.update({name: environ[name] for name in flow.secrets if name in environ})
    return env


class ConfigCapability(Capability):
    name = "config"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ

    def functions(self) -> list[HostFunction]:
        return [
            HostFunction("wasmflow", "config_get", "ptr len ptr", ("i32",), self.config_get),
            HostFunction("wasmflow", "secret_get", "ptr len ptr", ("i32",), self.secret_get),
        ]

    def config_get(self, call: Call, key_ptr: int, key_len: int, out: int) -> int:
        key = read_str(call.memory, key_ptr, key_len)
        if key not in call.run.flow.config:
            raise HostError(Code.NOT_FOUND, f"no config value {key!r}")
        return write_result(call, out, config_value_text(call.run.flow.config[key]).encode())

    def secret_get(self, call: Call, name_ptr: int, name_len: int, out: int) -> int:
        name = read_str(call.memory, name_ptr, name_len)
        if name not in call.run.flow.secrets:
            raise call.run.deny(f"secret {name!r} is not declared in the flow's secrets")
        if name not in self.environ:
            raise HostError(Code.NOT_FOUND, f"secret {name!r} is declared but not set in the environment")
        return write_result(call, out, self.environ[name].encode())
