"""Files of checkpoints and of our own records: JSON reading, atomic writes, hashes, the export record. Torch-free."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from flamingo_edge.config_checks import config_from_record, describe
from flamingo_edge.precision import EXPORT_PRECISIONS
from flamingo_edge.errors import CheckpointError, ExportError, UsageError
from flamingo_edge.graphs import CONTRACT_VERSION, GRAPH_NAMES

EXPORT_RECORD = "export.json"
MANIFEST = "manifest.json"  # an engines folder's record (manifest.py reads and writes it)


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
    """`path`, which must not exist yet and must be creatable: outputs never overwrite anything, and an output that
    cannot be written is refused before the work, not after it. Nothing is left behind.

    Raises:
        UsageError: it exists, or cannot be created (read-only, a file in the way).
    """
    path = Path(path)
    if path.exists():
        raise UsageError(f"{path} already exists; remove it or pick another output folder")
    _probe(path, lambda: os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=path.parent)))
    return path


def _probe(path: Path, make_and_remove: Callable[[], None]) -> None:
    """Make `path`'s missing parents, run `make_and_remove` (creates and deletes a probe beside `path`), then remove
    the parents it made: whether `path` can be written, leaving nothing behind.

    Raises:
        UsageError: it cannot (read-only, a file in the way, a full disk).
    """
    created = [p for p in reversed(path.parents) if not p.exists()]  # what _make_parent makes, outermost first
    try:
        _make_parent(path)
        make_and_remove()
    except OSError as error:
        raise output_error(path, error) from None
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()


_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-[^/]+$")  # the temporary name atomic_folder writes under


def _shown(path: str | Path) -> Path:
    """`path` as the user named it: a file inside an atomic folder's temporary name is shown in the final folder."""
    parts = [match.group("name") if (match := _PARTIAL.match(part)) else part for part in Path(path).parts]
    return Path(*parts)


def output_error(path: str | Path, error: OSError) -> UsageError:
    """The typed error for an OSError met while writing `path`: what happened and what to do."""
    path, reason = _shown(path), error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return UsageError(f"cannot write {path}: the disk is full ({reason}); nothing was kept; free some space or "
                          "write to another disk")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UsageError(f"cannot write {path}: {reason}; pick an output path in a folder you can write to")
    if error.errno == errno.ENOTDIR:
        return UsageError(f"cannot write {path}: a part of that path is a file, not a folder; pick another path")
    if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
        return UsageError(f"{path} appeared while it was being written; remove it or pick another output folder")
    return UsageError(f"cannot write {path}: {reason}; pick another output path")


def _is_write_error(error: OSError, path: Path) -> bool:
    """Whether an OSError met while writing the folder `path` is about that (not, say, an input that cannot be read):
    a full or read-only disk, or a file at `path` or under its temporary names (`.NAME.partial-*`, `.NAME.old-*`)."""
    ours = (str(path), str(path.parent / f".{path.name}."))
    names = [str(name) for name in (error.filename, error.filename2) if name is not None]
    return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or any(name.startswith(ours) for name in names)


def _move_into_place(partial: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished `partial` to `path`; with `overwrite`, an existing `path` is moved aside first and removed
    only once the new folder is in place (without it, a folder that appeared meanwhile is an error: ENOTEMPTY)."""
    if not overwrite or not path.exists():
        os.replace(partial, path)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, aside / path.name)
    try:
        os.replace(partial, path)
    except BaseException:
        os.replace(aside / path.name, path)  # put the old folder back
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _make_parent(path: Path) -> None:
    """Create the folders above `path`; a file in the way is named rather than reported as "file exists"."""
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UsageError(f"cannot write {path}: {existing} is a file, not a folder; pick another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(path, error) from None


def _new_partial(path: Path) -> Path:
    _make_parent(path)
    try:
        partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
        os.chmod(partial, 0o777 & ~_umask())  # mkdtemp creates 0700; give the folder the usual permissions
    except OSError as error:
        raise output_error(path, error) from None
    return partial


@contextmanager
def atomic_folder(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path` to fill; on success it is renamed to `path`, on any error (or an
    interrupt) it is removed. Readers see the whole folder or none.

    Args:
        path: the folder to write; it must not exist, unless `overwrite`.
        overwrite: replace an existing folder at `path`, only once the new one is complete (never merged).

    Raises:
        UsageError: `path` exists (and not `overwrite`), or cannot be written (read-only, a file in the way, a full
            disk); nothing is left behind.
    """
    path = Path(path)
    if not overwrite:
        check_new_folder(path)
    elif path.exists() and not path.is_dir():
        raise UsageError(f"{path} is a file, not a folder; remove it or pick another output folder")
    partial = _new_partial(path)
    try:
        yield partial
        _move_into_place(partial, path, overwrite)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        if not _is_write_error(error, path):  # e.g. an input that cannot be read: not about the output
            raise
        raise output_error(path, error) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def check_output_file(path: str | Path) -> Path:
    """Check, before the work, that `path` can be written later (by `atomic_write`): its folder exists or can be
    made, and takes a new file. Nothing is left behind.

    Raises:
        UsageError: `path` is a folder, or cannot be written (read-only, a file in the way, a full disk).
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a file path to write")
    def make_and_remove() -> None:
        handle, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(handle)
        os.unlink(probe)

    _probe(path, make_and_remove)
    return path


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part.

    Raises:
        UsageError: `path` cannot be written (read-only, a folder or a file in the way, a full disk); nothing is
            left behind.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a file path to write")
    _make_parent(path)
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(temporary, path)
    except OSError as error:
        if temporary:
            Path(temporary).unlink(missing_ok=True)
        raise output_error(path, error) from None
    except BaseException:
        if temporary:
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


def checkpoint_digest(weight_files: list[Path]) -> str:
    """One sha256 for a checkpoint's weights: of each weight file's name and sha256, in name order."""
    digest = hashlib.sha256()
    for path in sorted(weight_files, key=lambda p: p.name):
        digest.update(f"{path.name}\t{sha256_of(path)}\n".encode())
    return digest.hexdigest()


LAYER_NORMS = ("onnx", "decomposed")
OPSETS = range(13, 21)  # ONNX opsets our graphs are exported and checked at (torch's TorchScript exporter: <= 20)


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
    precision: str = "fp32"  # a value of EXPORT_PRECISIONS (precision.py): fp32, or what flamingo-edge quantize made
    quantization: dict | None = None  # how quantize made it: source export, graphs, method, calibration
    layer_norm: str = "onnx"  # "onnx" (LayerNormalization nodes) or "decomposed" (primitives, for TensorRT 8.5)
    checkpoint_sha256: str | None = None  # checkpoint_digest of its weights (None: exported before it was recorded)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict, source: str) -> ExportRecord:
        """The record from parsed export.json, every key and value checked.

        Raises:
            ExportError: unknown or missing keys, or a value of the wrong type or one this version cannot read
                (precision, opset, contract version, config); the message lists each problem.
        """
        if not isinstance(data, dict):
            raise ExportError(f"{source}: holds a JSON {type(data).__name__}, not an object; re-run flamingo-edge "
                              "export")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        unknown, missing = set(data) - names, required - set(data)
        if unknown or missing:
            raise ExportError(f"{source}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; it was "
                              "written by another flamingo-edge version: re-run flamingo-edge export")
        problems = _record_problems(data)
        if problems:
            raise ExportError(f"{source}: {'; '.join(problems)}; re-run flamingo-edge export (export.json is "
                              "written by it, not edited by hand)")
        graphs = {name: GraphFile(**entry) for name, entry in data["graphs"].items()}
        return cls(**{**data, "graphs": graphs})


def _is_file_name(value: Any) -> bool:
    """A plain file name inside the export folder (no folders, no way out of it)."""
    return isinstance(value, str) and value not in ("", ".", "..") and Path(value).name == value


def _graph_problems(graphs: Any) -> list[str]:
    if not isinstance(graphs, dict):
        return [f"'graphs' is {describe(graphs)}, expected an object with the graphs {list(GRAPH_NAMES)}"]
    if sorted(graphs) != sorted(GRAPH_NAMES):
        return [f"'graphs' names {sorted(graphs)}, expected {sorted(GRAPH_NAMES)}"]
    keys = {f.name for f in fields(GraphFile)}
    problems = []
    for name, entry in graphs.items():
        if not isinstance(entry, dict) or not {"file", "sha256"} <= set(entry) <= keys:
            problems.append(f"graphs.{name} is {describe(entry)}, expected an object with {sorted(keys)}")
        elif not (_is_file_name(entry["file"]) and isinstance(entry["sha256"], str)):
            problems.append(f"graphs.{name}: file {describe(entry['file'])} or sha256 {describe(entry['sha256'])} "
                            "is not a file name and a hash")
        elif entry.get("data_file") is not None and not _is_file_name(entry["data_file"]):
            problems.append(f"graphs.{name}.data_file is {describe(entry['data_file'])}, expected a file name")
    return problems


def _record_problems(data: dict) -> list[str]:
    """What is wrong with the values of a parsed export.json (its keys already checked)."""
    version, opset = data["contract_version"], data["opset"]
    checks = [
        (type(version) is int and version == CONTRACT_VERSION,
         f"contract_version is {describe(version)}; this flamingo-edge reads graph contract v{CONTRACT_VERSION}"),
        (type(opset) is int and opset in OPSETS,
         f"opset is {describe(opset)}, expected one of {OPSETS.start}..{OPSETS.stop - 1}"),
        (data.get("precision", "fp32") in EXPORT_PRECISIONS,
         f"precision is {describe(data.get('precision'))}, expected one of {[p.value for p in EXPORT_PRECISIONS]}"),
        (data.get("layer_norm", "onnx") in LAYER_NORMS,
         f"layer_norm is {describe(data.get('layer_norm'))}, expected one of {list(LAYER_NORMS)}"),
        (isinstance(data["flamingo_edge_version"], str) and isinstance(data["checkpoint"], str),
         "flamingo_edge_version and checkpoint must be strings"),
        (isinstance(data["tokenizer_files"], list) and all(_is_file_name(f) for f in data["tokenizer_files"]),
         f"tokenizer_files is {describe(data['tokenizer_files'])}, expected a list of file names"),
        (data.get("quantization") is None or isinstance(data["quantization"], dict),
         f"quantization is {describe(data.get('quantization'))}, expected an object or null"),
        (data.get("checkpoint_sha256") is None or isinstance(data["checkpoint_sha256"], str),
         f"checkpoint_sha256 is {describe(data.get('checkpoint_sha256'))}, expected a hash or null"),
    ]
    problems = [message for ok, message in checks if not ok] + _graph_problems(data["graphs"])
    _, config_problems = config_from_record(data["config"])
    return problems + [f"config: {problem}" for problem in config_problems]


def _not_an_export(folder: Path) -> ExportError:
    """What a folder without export.json is, and what to pass instead."""

    if not folder.exists():
        return ExportError(f"{folder}: no such export folder; pass the folder flamingo-edge export wrote (or `demo`, "
                           "the bundled checkpoint's)")
    if not folder.is_dir():
        return ExportError(f"{folder} is a file, not an export folder; pass the folder flamingo-edge export wrote")
    if (folder / "config.json").is_file():
        return ExportError(f"{folder} is a checkpoint, not an export; export it first (flamingo-edge export {folder} "
                           "-o OUT) and pass OUT")
    if (folder / MANIFEST).is_file():
        return ExportError(f"{folder} is an engines folder (flamingo-edge build), not an export; pass the export it "
                           "was built from, with this folder as --engines")
    return ExportError(f"{folder}: no {EXPORT_RECORD}; this is not a complete export: run flamingo-edge export "
                       "CHECKPOINT -o OUT and pass OUT")


def read_export_record(folder: str | Path, *, verify_hashes: bool = True) -> ExportRecord:
    """Read OUT/export.json and check that every file it names is there (and, by default, unchanged).

    Raises:
        ExportError: the folder or record is missing or malformed, a file is missing, or a hash differs.
    """
    folder = Path(folder)
    path = folder / EXPORT_RECORD
    if not path.is_file():
        raise _not_an_export(folder)
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


# The bundled demo checkpoint, here (torch-free) so that the runtime resolves the word `demo` on the base install.
DEMO = "demo"  # wherever a command takes a checkpoint, this word names the bundled demo checkpoint
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo" / "checkpoint"
DEMO_OVERRIDE = "FLAMINGO_EDGE_DEMO_CHECKPOINT"  # names another folder as "demo" (e.g. one you trained)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder a user named: a path, or "demo" for the checkpoint bundled with the package.

    Raises:
        CheckpointError: "demo" was named but the bundled checkpoint is missing from this installation.
    """
    if str(path) != DEMO:
        return Path(path)
    folder = Path(os.environ.get(DEMO_OVERRIDE, DEMO_CHECKPOINT))
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"the demo checkpoint is missing ({folder}); train one with: python "
                              f"samples/train_demo_model.py OUT, then set {DEMO_OVERRIDE}=OUT")
    return folder
