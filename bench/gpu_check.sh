#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (torch, transformers, peft; no Ray, no vLLM, no registry).
#
# Here, once:   bench/gpu_check.sh --fetch-wheels   (the pure-Python packages posttrain's core needs
#               that such a machine lacks, into .gpu_wheels/, which the device run carries)
# There:        bench/gpu_check.sh                  (writes $OUT/gpu_check.json, or ./gpu_check.json)
#
# Runs bench.gpu_check (see its docstring) within 8 minutes; exit status 1 when a check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu_wheels
if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p "$WHEELS"
    python3 -m pip download --no-deps --only-binary=:all: -d "$WHEELS" "omegaconf>=2.4" antlr4-python3-runtime
    exit 0
fi
# Pure-Python wheels import straight from their zip files; packages the machine has win.
EXTRA=""
for wheel in "$WHEELS"/*.whl; do
    [ -e "$wheel" ] || continue
    name=$(basename "$wheel" | cut -d- -f1)
    python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('${name%%_*}') is not None)" \
        && EXTRA="$EXTRA:$PWD/$wheel"
done
export PYTHONPATH="$PWD${EXTRA}${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 480 python3 -m bench.gpu_check --out "${OUT:-.}/gpu_check.json" "$@"
