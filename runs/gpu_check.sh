#!/usr/bin/env bash
# The one-GPU check (scripts/gpu_check.py, docs/gpu_check.md): every stage for a few steps, the
# comparisons only a GPU can fail and the speed numbers, in ~8 minutes on one H100; with --cpu the
# same checks at tiny sizes on CPU (a CI test).
#
#   bash runs/gpu_check.sh --data-root .gpu_check_data --out "$OUT"    # on the GPU machine
#   bash runs/gpu_check.sh --cpu --data-root .gpu_check_data           # anywhere
#
# Python: $PYTHON, else .venv's, else python3 (on the GPU machine, the one that holds torch).
# What that machine lacks (fastapi, uvicorn, pydantic, ... for chat_web) travels as wheels in .whl/,
# installed here into /tmp/nanochat-whl when fastapi does not import.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
fi
if ! "$PY" -c "import fastapi, uvicorn" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nanochat-whl .whl/*.whl
    export PYTHONPATH=/tmp/nanochat-whl${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec "$PY" -m scripts.gpu_check "$@"
