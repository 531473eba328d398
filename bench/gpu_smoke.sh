#!/usr/bin/env bash
# The GPU path in one call (<= 8 minutes on one H100), one JSON line on stdout: see bench/gpu_smoke.py.
#   bash bench/gpu_smoke.sh [--wheels DIR] [--cpu] [--steps N]
# Nothing is fetched from the network. flash-attn, liger-kernel and any missing dependency of xlt (trl, datasets,
# peft, ...) come as wheels in DIR (default: .whl/ beside the repository, as the device tool carries them); they are
# installed with --no-index into a private target folder, so the machine's own packages are left as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=".whl"
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  SITE="${TMPDIR:-/tmp}/xlt-gpu-smoke-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl >&2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$SITE/bin:$PATH"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$PY" bench/gpu_smoke.py --json "${ARGS[@]}"
