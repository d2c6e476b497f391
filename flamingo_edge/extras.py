"""What the base install leaves out, and the typed error that says which extra brings it.

`pip install flamingo-edge` runs an export on a device: numpy, onnxruntime, OpenCV (headless), tokenizers, tqdm.
The extras add the rest (pyproject.toml):

    export    torch, safetensors, onnx: export, quantize, convert, compare, `demo`, `info CHECKPOINT`, the
              PyTorch reference (`eval CHECKPOINT --backend pytorch`, `bench --reference`)
    tensorrt  cuda-python for `--backend tensorrt`, onnx for `build`'s operator check (a Jetson needs no torch);
              one extra per CUDA major, tensorrt-cu12 (JetPack 6; what `tensorrt` installs) and tensorrt-cu13
              (JetPack 7, drivers >= 580), since cuda-python must not be newer than the driver's CUDA
    rtx       tensorrt-rtx for RTX builds (rtx-cu12 / rtx-cu13 name its CUDA build)
    test      [export], transformers and the rest of what the tests compare against and build with
    serve     PyTriton (tritonserver) and tritonclient for `flamingo-edge serve`; PyTriton needs numpy<2, so in a
              venv of its own (docs/serving.md)

Every entry point that needs one of them calls `require` before its lazy import, so a missing package is a
`FeatureUnavailableError` (exit 2 from the CLI) naming the command that installs it, never a bare ImportError.
"""

from __future__ import annotations

from importlib.util import find_spec

from flamingo_edge.errors import FeatureUnavailableError


def require(module: str, extra: str, purpose: str) -> None:
    """Check that `module` can be imported, without importing it.

    Args:
        module: a top-level module name, e.g. "torch".
        extra: the flamingo-edge extra that installs it, e.g. "export".
        purpose: what needs it, for the message, e.g. "flamingo-edge export".

    Raises:
        FeatureUnavailableError: `module` is not installed; the message gives the pip command for `extra`.
    """
    if find_spec(module) is None:
        raise FeatureUnavailableError(f"{purpose} needs {module}, which this install of flamingo-edge does not "
                                      f"have; install it with: pip install 'flamingo-edge[{extra}]'")
