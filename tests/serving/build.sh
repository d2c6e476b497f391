#!/usr/bin/env bash
# Build (or reuse) the serving venv at <repo>/.venv-serve: flamingo-edge[serve] (PyTriton with its bundled
# tritonserver, and tritonclient) for `flamingo-edge serve` and tests/serving/.  Idempotent; run from anywhere:
#     bash tests/serving/build.sh
# PYTHON picks the interpreter for a new venv (default python3, 3.11).
#
# Why a venv of its own: nvidia-pytriton 0.7 requires numpy<2, while the main venv has numpy 2 (torch, onnx, and
# opencv-python-headless >= 4.11, which requires numpy >= 2).  Serving needs no torch: this venv has the base install
# (numpy, onnxruntime, OpenCV, tokenizers) and the [serve] extra, pinned below to versions checked together.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$ROOT/.venv-serve"
VPY="$VENV/bin/python"

export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONWARNINGS=ignore

# Exact pins: nvidia-pytriton 0.7.0 (tritonserver 2.51, Python backend) needs numpy<2 and tritonclient ~=2.50;
# opencv-python-headless 4.10 is the last release that accepts numpy 1.26 (a later one upgrades numpy to 2 and breaks
# PyTriton); onnxruntime, tokenizers and tqdm as in the main venv; protobuf < 7 for tritonclient[grpc].
PINS=(
  "nvidia-pytriton==0.7.0" "numpy==1.26.4" "opencv-python-headless==4.10.0.84"
  "tritonclient==2.73.0" "grpcio==1.85.3" "protobuf==6.33.6"
  "onnxruntime==1.32.0" "tokenizers==0.23.3" "tqdm==4.70.1"
)

pip_q() {
  # pip -q still prints one warning per local index folder that lacks a package; drop those lines only
  "$VPY" -m pip install -q "$@" 2>&1 | { grep -v "' is ignored: it is neither a file nor a directory" || true; }
}

# Fails (non-zero) unless the venv has exactly the pinned versions, flamingo_edge imported from this checkout, and
# PyTriton's bundled tritonserver with a Python-backend stub for this interpreter.
check_venv() {
  "$VPY" - "$ROOT" "${PINS[@]}" <<'EOF'
import pathlib, sys
from importlib.metadata import version
root, pins = pathlib.Path(sys.argv[1]), sys.argv[2:]
for pin in pins:
    name, want = pin.split("==")
    have = version(name)
    assert have == want, f"{name} {have} installed, {want} wanted"
import cv2, onnxruntime, pytriton, tritonclient.grpc, tritonclient.http  # noqa: F401
import flamingo_edge
assert pathlib.Path(flamingo_edge.__file__).resolve().is_relative_to(root), f"flamingo_edge from {flamingo_edge.__file__}"
server = pathlib.Path(pytriton.__file__).parent / "tritonserver"
assert (server / "bin" / "tritonserver").is_file(), f"no tritonserver under {server}"
stub = server / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
assert (stub / "triton_python_backend_stub").is_file(), f"no Python-backend stub for this Python in {stub}"
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
  pip_q -e "$ROOT[serve]" "tritonclient[grpc,http]" "${PINS[@]}"
  check_venv
  echo "built $VENV"
fi
