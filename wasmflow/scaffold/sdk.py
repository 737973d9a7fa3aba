"""Where the Rust SDK crate is: inside an installed wasmflow, or in the checkout it runs from.

A wheel carries the crate as package data (`wasmflow/scaffold/sdk`, copied there by setup.py's build
step); an editable install runs from a checkout, whose crate is `guest-examples/sdk`. Generated projects
depend on the crate by this path, so `wasmflow new` writes it into their Cargo.toml files.
"""

from __future__ import annotations

from pathlib import Path

PACKAGED = Path(__file__).resolve().parent / "sdk"
CHECKOUT = Path(__file__).resolve().parents[2] / "guest-examples" / "sdk"


class SdkNotFound(Exception):
    """Neither the packaged crate nor a checkout's: the installation is broken."""


def sdk_dir() -> Path:
    """The SDK crate's directory (holding Cargo.toml and src/lib.rs). Raises SdkNotFound."""
    for candidate in (PACKAGED, CHECKOUT):
        if (candidate / "Cargo.toml").is_file() and (candidate / "src" / "lib.rs").is_file():
            return candidate
    raise SdkNotFound(f"the wasmflow Rust SDK is missing (looked in {PACKAGED} and {CHECKOUT}): "
                      "reinstall wasmflow (`pip install --force-reinstall wasmflow`)")
