# The two commands of the quick start: `make demo` (the main job) and `make test`.
.PHONY: setup demo test bench clean

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python -m wasmflow.devtools.demo

test: setup
	.venv/bin/pytest -q -ra

bench: setup
	.venv/bin/python bench/run_overhead.py

clean:
	rm -rf .wasmflow guest-examples/target
