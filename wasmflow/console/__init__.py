"""The web console: pages and a JSON API over the control plane's store, served by `wasmflow up`.

It sits below `wasmflow.platform` in the layers: the platform mounts it on its aiohttp app and hands it
what it may do (`ConsoleServices`: replay, cancel, the per-run transcript), so the console reads the
store itself and acts only through those callables. See docs/console.md.
"""

from __future__ import annotations

from wasmflow.console.auth import ConsoleAuth, authenticated, check_csrf, csrf_token
from wasmflow.console.rendering import register_templates, render

__all__ = ["ConsoleAuth", "authenticated", "check_csrf", "csrf_token", "register_templates", "render"]
