# The two commands of the quick start: `make demo` (the main job) and `make test`.
.PHONY: setup demo test bench clean

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python -m wasmflow.devtools.demo

# PostgreSQL (started by scripts/start-postgres.sh unless WASMFLOW_TEST_POSTGRES_URL is set) and WasmEdge
# (/opt/wasmedge/lib or ~/.wasmedge/lib) are used where present; see scripts/run-tests.sh.
test: setup
	bash scripts/run-tests.sh $(PYTEST_ARGS)

bench: setup
	.venv/bin/python bench/run_overhead.py

clean:
	rm -rf .wasmflow guest-examples/target
