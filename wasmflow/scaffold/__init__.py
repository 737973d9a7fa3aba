"""`wasmflow new`: a Rust agent project, or one more agent in a project, from a template.

`templates/<name>/` holds each template's crate source, its flows.yaml entry, its fixture event and the
models it needs; `project.py` writes them out; `sdk.py` finds the SDK crate the generated crates use.
"""
