"""Build hook: the wheel carries the Rust SDK crate (guest-examples/sdk) as package data.

The crate stays where the example agents and hostile guests find it by path; at build time it is copied
to `wasmflow/scaffold/sdk` inside the wheel, where `wasmflow new` finds it in an installed wasmflow
(`wasmflow.scaffold.sdk.sdk_dir`). Everything else is declared in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SDK = ROOT / "guest-examples" / "sdk"


class build_py_with_sdk(build_py):
    """`build_py`, then the SDK's Cargo.toml and src/ copied into the built package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install finds guest-examples/sdk in the checkout
            return
        target = Path(self.build_lib) / "wasmflow" / "scaffold" / "sdk"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        shutil.copy2(SDK / "Cargo.toml", target / "Cargo.toml")
        shutil.copytree(SDK / "src", target / "src")


setup(cmdclass={"build_py": build_py_with_sdk})
