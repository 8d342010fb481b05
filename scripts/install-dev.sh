#!/usr/bin/env bash
# Set up a development environment in .venv: the core with its test extras, every in-tree
# backend plugin and the fake vendor, all editable. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first, pinned to the CPU build this machine keeps on disk: asking pip for a range with no
# torch installed would download a multi-GB CUDA build. On a GPU machine, install your CUDA or
# ROCm build of torch before running this script; pip then keeps it.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${PIP[@]}" "torch==${LMPORT_TORCH_VERSION:-2.13.0}"
fi
# Plugins build with setuptools and no build isolation (GPU build machines work that way too).
"${PIP[@]}" "setuptools>=64" wheel
"${PIP[@]}" --no-build-isolation -e ".[test,gguf]" -e plugins/cuda -e plugins/rocm -e tests/fake_vendor
# optimum-habana and optimum-neuron pin transformers 4.55 / 4.57 and need vendor runtimes that are
# not on PyPI (habana_frameworks, torch-neuronx): these two plugins install without dependencies,
# which is enough to test their detection and flags on fake machines.
"${PIP[@]}" --no-build-isolation --no-deps -e plugins/gaudi -e plugins/neuron
# The CUDA backend's Triton kernels are tested on the CPU through Triton's interpreter
# (TRITON_INTERPRET=1); triton has no dependencies, so this never pulls a CUDA torch.
"${PIP[@]}" "triton==3.6.*"
# TGI's Python client (server tests) pins huggingface_hub<1.0, which transformers 5 outgrew; it
# works with the newer hub, so it installs without dependencies (aiohttp comes with the test extra).
"${PIP[@]}" --no-deps "text-generation>=0.7"
echo "installed into .venv: $(.venv/bin/python -c 'import lmport, torch; print("lmport", lmport.__version__, "torch", torch.__version__)')"
