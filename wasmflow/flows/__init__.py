"""flows.yaml: the schema (`model`), the line-aware loader (`loader`) and the `validate` command."""

from wasmflow.fields import parse_duration, parse_size

from .loader import FlowsError, LoadedFlows, load_flows
from .model import Allow, Flow, FlowsFile, Limits, ModelSpec, Retry, Trigger

__all__ = [
    "Allow",
    "Flow",
    "FlowsError",
    "FlowsFile",
    "Limits",
    "LoadedFlows",
    "ModelSpec",
    "Retry",
    "Trigger",
    "load_flows",
    "parse_duration",
    "parse_size",
]
