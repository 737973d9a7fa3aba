"""Storage, the ground floor: the database engine, the shared schema and its migrations.

Both the capabilities (`wasmflow.host_functions.kv`) and the control plane (`wasmflow.platform`) build on
it; it imports neither.
"""

from .engine import default_url, open_database
from .migrations import SCHEMA_VERSION, migrate
from .schema import metadata

__all__ = ["SCHEMA_VERSION", "default_url", "metadata", "migrate", "open_database"]
