#!/usr/bin/env bash
# Build (or reuse) the upstream OpenFlamingo reference venv at <repo>/.venv-openflamingo and write the test fixtures
# under tests/fixtures/openflamingo/ with make_fixtures.py.  Idempotent; run from anywhere:
#     bash tests/reference/openflamingo/build.sh [--out DIR]
# Arguments are passed on to make_fixtures.py.  PYTHON picks the interpreter for a new venv (default python3, 3.11).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
VENV="$ROOT/.venv-openflamingo"
VPY="$VENV/bin/python"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONWARNINGS=ignore

# Exact pins: the fixtures must come out byte-identical on every rebuild.  open-flamingo 2.0.1's metadata pins
# torch==2.0.1 (a 4.6 GB CUDA download) and sentencepiece==0.1.98, so it goes in with --no-deps beside the
# CPU torch; transformers 4.33.3 is the release OpenFlamingo 2.0.1 was used with (it needs tokenizers<0.14);
# open_clip 2.20.0 returns the patch tokens before ln_post (>= 2.23 applies ln_post to them); numpy<2 for the
# torch-2.0-era packages; huggingface-hub<0.20 and timm<1 for transformers 4.33 / open_clip 2.20.
TORCH="torch==2.13.0"
TORCHVISION="torchvision==0.28.0"
PINS=(
  "numpy==1.26.4" "pillow==13.0.0" "safetensors==0.8.0"
  "transformers==4.33.3" "tokenizers==0.13.3" "huggingface-hub==0.19.4"
  "open_clip_torch==2.20.0" "timm==0.9.16" "einops==0.8.2" "einops-exts==0.0.4"
)
OPEN_FLAMINGO="open-flamingo==2.0.1"

pip_q() {
  # pip -q still prints one warning per local index folder that lacks a package; drop those lines only
  "$VPY" -m pip install -q "$@" 2>&1 | { grep -v "' is ignored: it is neither a file nor a directory" || true; }
}

# Fails (non-zero) unless the venv has exactly the pinned versions, a CPU torch, a torchvision whose PIL transforms
# work, and open_clip / open_flamingo importable.
check_venv() {
  "$VPY" - "$TORCH" "$TORCHVISION" "${PINS[@]}" "$OPEN_FLAMINGO" <<'EOF'
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    have = version(name).split("+")[0]
    assert have == want, f"{name} {have} installed, {want} wanted"
import torch
assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
import numpy as np
from PIL import Image
from torchvision import transforms as T
x = T.Compose([T.Resize(7, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(7), T.ToTensor()])(
    Image.fromarray(np.zeros((9, 12, 3), np.uint8)))
assert tuple(x.shape) == (3, 7, 7)
import open_clip, open_flamingo, transformers  # noqa: F401
EOF
}

# torchvision: PyPI's torchvision 0.28.0 (the release paired with torch 2.13) is a CUDA build; its _C.so needs
# libtorch_cuda.so, which the CPU torch lacks.  torchvision.extension already tolerates that (_has_ops() becomes
# False, and ops such as nms raise "Couldn't load custom C++ ops" when called), and every @register_meta in
# _meta_registrations.py is guarded by _has_ops() -- except the two @torch.library.register_fake("torchvision::nms")
# / ("torchvision::qnms") decorators, which raise "operator torchvision::nms does not exist" at `import torchvision`.
# We guard those two decorators the same way.  Everything else is the wheel's own code: torchvision.transforms
# (Resize/CenterCrop/ToTensor/Normalize on PIL images, all Python + PIL + torch) works unchanged, which is all
# open_clip needs.  No CPU build of torchvision can be installed here (only PyPI is reachable).
patch_torchvision() {
  "$VPY" - <<'EOF'
import importlib.util, pathlib
path = pathlib.Path(importlib.util.find_spec("torchvision").submodule_search_locations[0]) / "_meta_registrations.py"
src = path.read_text()
guard = " if torchvision.extension._has_ops() else (lambda fn: fn))"
for op in ("nms", "qnms"):
    plain = f'@torch.library.register_fake("torchvision::{op}")\n'
    patched = f'@(torch.library.register_fake("torchvision::{op}"){guard}\n'
    if patched in src:
        continue
    assert src.count(plain) == 1, f"{path}: expected one line {plain!r}; torchvision changed, revisit the patch"
    src = src.replace(plain, patched)
path.write_text(src)
EOF
}

if [[ -x "$VPY" ]] && check_venv 2>/dev/null; then
  echo "reusing $VENV"
else
  if [[ -e "$VENV" ]] && ! "$VPY" -c "" 2>/dev/null; then
    rm -rf "$VENV"  # not a working venv (e.g. its base interpreter is gone): start again
  fi
  if [[ ! -x "$VPY" ]]; then
    echo "creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  pip_q "$TORCH"  # pinned: an unpinned torch would resolve to a multi-GB CUDA build
  pip_q --no-deps "$TORCHVISION"
  pip_q "$TORCH" "$TORCHVISION" "${PINS[@]}"
  pip_q --no-deps "$OPEN_FLAMINGO"
  patch_torchvision
  check_venv
fi

"$VPY" "$HERE/make_fixtures.py" "$@"
