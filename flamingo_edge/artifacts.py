"""Files of checkpoints and of our own records: JSON reading, atomic writes, hashes, the export record. Torch-free."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from flamingo_edge.errors import CheckpointError, ExportError, UsageError

EXPORT_RECORD = "export.json"


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file.

    Raises:
        CheckpointError: the file is missing, unreadable, not JSON, or not an object; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path.parent}: no {path.name}; a checkpoint is a save_pretrained folder with config.json and weights"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}); restore the file from the original checkpoint "
                              "or re-save it with save_pretrained") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object; "
                              "re-save the checkpoint with save_pretrained")
    return data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_new_folder(path: str | Path) -> Path:
    """`path`, which must not exist yet: outputs never overwrite anything.

    Raises:
        UsageError: it exists.
    """
    path = Path(path)
    if path.exists():
        raise UsageError(f"{path} already exists; remove it or pick another output folder")
    return path


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `path` to fill; on success it is renamed to `path`, on any error (or an
    interrupt) it is removed. Readers see the whole folder or none. `path` must not exist.

    Raises:
        UsageError: `path` exists.
    """
    path = check_new_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        os.chmod(partial, 0o777 & ~_umask())  # mkdtemp creates 0700; give the folder the usual permissions
        yield partial
        os.replace(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class GraphFile:
    """One exported graph: its file, its external-data file (or None) and their hashes."""

    file: str
    sha256: str
    data_file: str | None = None
    data_sha256: str | None = None


@dataclass(frozen=True)
class ExportRecord:
    """export.json: what an export folder holds and how it was made. Unknown keys are refused."""

    contract_version: int
    opset: int
    flamingo_edge_version: str
    checkpoint: str  # the folder it was exported from
    config: dict  # FlamingoConfig.to_dict()
    graphs: dict[str, GraphFile]
    tokenizer_files: list[str]
    precision: str = "fp32"  # "fp32", "fp16" or "int8" (flamingo-edge quantize)
    quantization: dict | None = None  # how quantize made it: source export, graphs, method, calibration
    layer_norm: str = "onnx"  # "onnx" (LayerNormalization nodes) or "decomposed" (primitives, for TensorRT 8.5)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict, source: str) -> ExportRecord:
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        unknown, missing = set(data) - names, required - set(data)
        if unknown or missing:
            raise ExportError(f"{source}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; it was "
                              "written by another flamingo-edge version: re-run flamingo-edge export")
        try:
            graphs = {name: GraphFile(**entry) for name, entry in data["graphs"].items()}
        except TypeError as error:
            raise ExportError(f"{source}: malformed 'graphs' entry ({error}); re-run flamingo-edge export") from None
        return cls(**{**data, "graphs": graphs})


def read_export_record(folder: str | Path, *, verify_hashes: bool = True) -> ExportRecord:
    """Read OUT/export.json and check that every file it names is there (and, by default, unchanged).

    Raises:
        ExportError: the folder or record is missing or malformed, a file is missing, or a hash differs.
    """
    folder = Path(folder)
    path = folder / EXPORT_RECORD
    if not path.is_file():
        raise ExportError(f"{folder}: no {EXPORT_RECORD}; this is not a complete export: run "
                          f"flamingo-edge export CHECKPOINT -o {folder}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{path}: not valid JSON ({error}); re-run flamingo-edge export") from None
    record = ExportRecord.from_dict(data, str(path))
    for name, graph in record.graphs.items():
        for file, expected in ((graph.file, graph.sha256), (graph.data_file, graph.data_sha256)):
            if file is None:
                continue
            if not (folder / file).is_file():
                raise ExportError(f"{folder}: {file} ({name} graph) is missing; the export is incomplete: re-run "
                                  "flamingo-edge export")
            if verify_hashes and sha256_of(folder / file) != expected:
                raise ExportError(f"{folder / file}: sha256 differs from {EXPORT_RECORD}; the graph was modified or "
                                  "is from another export: re-run flamingo-edge export")
    for file in record.tokenizer_files:
        if not (folder / file).is_file():
            raise ExportError(f"{folder}: {file} is missing; the export is incomplete: re-run flamingo-edge export")
    return record
