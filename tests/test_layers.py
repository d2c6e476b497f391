"""The package's layers (DESIGN.md "a foundation layer"; docs/layers.md): every import runs down.

Read from the source (every `import`/`from` naming flamingo_edge, lazy imports inside functions included), so a
leak cannot hide behind a function-level import. A module may import its own package and anything below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flamingo_edge"

# Bottom to top. The foundation is plain Python (+ numpy): errors, the config dataclasses, tolerances, the records
# (export.json, manifest), the graph contract, the TensorRT version module (imported lazily), extras.
LAYERS = (
    {"__init__", "errors", "precision", "config", "config_checks", "tolerances", "extras", "artifacts", "graphs",
     "trt_compat", "manifest", "config_reader", "idefics_config", "mllama_config", "config_files"},
    {"runtime"},  # torch-free: what runs on a device (sessions.py, the factory, sits on the backends it opens)
    {"models"},  # the PyTorch reference, checkpoints, converters (write files the runtime reads)
    {"export"},
    {"demo"},  # the demo checkpoint, its scenes, its cached export
    {"calibration"},
    {"engines"},
    {"tools"},  # compare, bench
    {"serving"},  # Triton: serve (PyTriton), triton-repo
    {"cli"},
)


def layer_of(unit: str) -> int:
    for index, units in enumerate(LAYERS):
        if unit in units:
            return index
    raise AssertionError(f"flamingo_edge.{unit} is in no layer of tests/test_layers.py: place it")


def unit_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_units(path: Path) -> set[str]:
    units = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "flamingo_edge" and len(parts) > 1:
                units.add(parts[1])
    return units


def test_every_import_runs_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(path)
        for target in imported_units(path) - {unit}:
            if (PACKAGE / target).is_dir() or (PACKAGE / f"{target}.py").is_file():
                if layer_of(target) > layer_of(unit):
                    upward.append(f"{path.relative_to(PACKAGE.parent)} imports flamingo_edge.{target}")
    assert not upward, "imports that run up a layer:\n" + "\n".join(upward)


def test_the_runtime_needs_neither_torch_nor_the_builder():
    """What an edge device installs: the runtime reads no torch, no onnx, no engines builder."""
    for path in sorted((PACKAGE / "runtime").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        heavy = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                             if isinstance(node, ast.ImportFrom) and node.module}
        assert not heavy & {"torch", "onnx", "transformers", "safetensors"}, path
