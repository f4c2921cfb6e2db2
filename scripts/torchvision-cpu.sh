# Sourced by the env scripts after torch 2.13.0+cpu: install torchvision 0.28.0 (transformers'
# Gemma 4 image/video processors need it) and make it import beside a CPU torch.
# PyPI's torchvision 0.28.0 ships a CUDA-linked _C.so. Its Python transforms work on CPU, but its
# _meta_registrations.py registers fake kernels for torchvision::nms/qnms unconditionally and the
# import dies ("operator torchvision::nms does not exist"). We guard those two registrations with
# torchvision's own `_has_ops()` check (the same workaround as scripts/env.sh). Usage:
#   torchvision_cpu PYTHON
torchvision_cpu() {
  local py="$1" meta
  "$py" -m pip install --disable-pip-version-check -q --no-deps "torchvision==0.28.0"
  meta="$("$py" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("torchvision").origin).parent / "_meta_registrations.py")')"
  sed -i 's|^@torch.library.register_fake("\(torchvision::[a-z_]*\)")$|@(torch.library.register_fake("\1") if torchvision.extension._has_ops() else (lambda fn: fn))|' "$meta"
}
