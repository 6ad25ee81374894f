#!/usr/bin/env bash
# Download (on a machine with network) the wheels benchmarks/gpu_check.sh needs on the GPU
# machine: CPython 3.12, x86-64 manylinux, torch 2.11 + triton already there, no network.
#
#   benchmarks/gpu_wheels.sh [--dry-run] [DEST]        # DEST defaults to .whl (git-ignored)
#
# The list is what the check's path imports beyond torch and torch's own dependencies (filelock,
# sympy, networkx, jinja2, fsspec, setuptools, typing-extensions), found by running
# `gpu_check.sh --dry-run` with nothing else importable. Versions are this repo's .venv's.
# About 24 MB in all (numpy 16.6 MB of it); gpu_check.sh installs only those the GPU image lacks.
# Not here: wandb (logger.wandb.mode=disabled), matplotlib (logger.plot=false), transformers /
# tokenizers / datasets (the check writes its dataset without a tokenizer), deepspeed, and
# flash-attn (no binary wheel for torch 2.11 / CUDA 13 on PyPI; the registry then picks SDPA).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
DEST="${1:-$ROOT/.whl}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

BINARY=(
  numpy==2.4.6                # megatron-core, the data loader (the image may have it: then not installed)
  pyyaml==6.0.4               # omegaconf
  omegaconf==2.3.1            # configs
  hydra-core==1.3.8           # the CLI / config tree
  packaging==26.4             # hydra, megatron-core, pytest
  megatron-core==0.16.1       # indexed datasets (.bin/.idx); cp312 wheel with its C++ helpers
  safetensors==0.8.0          # sbtrain.models.weights (imported on the training path)
  einops==0.8.2               # fla-core
  fla-core==0.6.0             # the `fla` package: chunk_gla, fused_recurrent_gla
  pytest==9.2.0               # tests/operators -k cuda
  pluggy==1.7.0
  iniconfig==2.3.1
  pygments==2.21.0
)
# omegaconf 2.3 needs exactly antlr4 4.9.*, published as an sdist only: built into a pure wheel here.
SDIST=(antlr4-python3-runtime==4.9.3)
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

if ((DRY)); then
  report=$(mktemp)
  "$PYTHON" -m pip install --dry-run --ignore-installed --quiet --report "$report" --no-deps --only-binary=:all: \
    "${PLATFORM[@]}" --target "$(mktemp -d)" "${BINARY[@]}"
  "$PYTHON" -c 'import json, sys; [print(i["download_info"]["url"].rsplit("/", 1)[1])
                 for i in json.load(open(sys.argv[1]))["install"]]' "$report"
  echo "plus, built from the sdist: ${SDIST[*]} (py3-none-any)"
  rm -f "$report"
  exit 0
fi

mkdir -p "$DEST"
for spec in "${BINARY[@]}"; do
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$DEST" "$spec"
done
for spec in "${SDIST[@]}"; do
  "$PYTHON" -m pip wheel --quiet --no-deps -w "$DEST" "$spec"
done
ls -l "$DEST"/*.whl
du -ch "$DEST"/*.whl | tail -1
