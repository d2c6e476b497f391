"""`flamingo-edge triton-repo`: a model repository for Triton Inference Server, written from an export (and its
engines). Plain Python: neither PyTriton nor protobuf is needed to write one.

    REPO/
      vision/      config.pbtxt  1/model.onnx (+ its .onnx.data)   backend onnxruntime
      resampler/   ...                                             --engines: 1/model.plan, platform tensorrt_plan
      xattn_kv/    ...                                             --python-only: + 1/model.py, backend python
      decoder/     ...                                                            (ONNX Runtime inside the model)
      flamingo/    config.pbtxt  1/model.py  1/flamingo.json  1/<tokenizer files>    backend python

`flamingo` is the generation loop: a Python-backend model that runs our Pipeline and Scheduler over the four graph
models, calling them through BLS (Business Logic Scripting); the self-attention and cross-attention caches stay in
its process. The graph models take whole batches from it (max_batch_size 0: Triton never batches them itself).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import MISSING, asdict, dataclass, fields
from importlib import resources
from pathlib import Path

from flamingo_edge.artifacts import ExportRecord, atomic_folder, atomic_write, read_export_record
from flamingo_edge.config import FlamingoConfig
from flamingo_edge.errors import UsageError
from flamingo_edge.graphs import GRAPH_NAMES, CONTRACT_VERSION, GraphSpec, TensorSpec, build_graphs
from flamingo_edge.manifest import Manifest, read_manifest
from flamingo_edge.trt_compat import version_tuple

FLAMINGO_MODEL = "flamingo"  # the generation model's name; the graph models are named after their graphs
SETTINGS_FILE = "flamingo.json"  # REPO/flamingo/1/flamingo.json
SETTINGS_VERSION = 1
DEFAULT_MAX_BATCH = 8  # requests the flamingo model decodes together (Scheduler max_batch)
MAX_IMAGES = 16  # images per prompt without engines (Pipeline.open's default)
TEMPLATES = "flamingo_edge.serving.triton_models"  # the model.py of the Python-backend models
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                 "bool": "TYPE_BOOL", "bytes": "TYPE_STRING"}


# ------------------------------------------------------------------------------------------------ text protobuf


class Symbol(str):
    """An enum value in a text protobuf, written bare: TYPE_FP32, KIND_GPU."""


def _escape(ch: str) -> str:
    """One character of a quoted string: C escapes for quote, backslash and control characters; UTF-8 as is."""
    if ch in '"\\':
        return "\\" + ch
    if ch == "\n":
        return "\\n"
    return f"\\{ord(ch):03o}" if ord(ch) < 32 else ch


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Symbol):
        return str(value)
    if isinstance(value, str):
        return '"' + "".join(_escape(ch) for ch in value) + '"'
    if isinstance(value, (int, float)):
        return repr(value)
    raise TypeError(f"no text protobuf form for {type(value).__name__} {value!r}")


def format_pbtxt(message: dict, indent: int = 0) -> str:
    """A message as protobuf text format (what config.pbtxt holds).

    A dict is a message, a list of dicts a repeated message field, a list of scalars a repeated scalar field; str is
    a quoted string (escaped), `Symbol` an enum value, bool, int and float are literals. Keys are written in order.
    """
    pad, lines = "  " * indent, []
    for key, value in message.items():
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", format_pbtxt(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            lines.append(f"{pad}{key} [")
            for index, item in enumerate(value):
                comma = "," if index < len(value) - 1 else ""
                lines += [f"{pad}  {{", format_pbtxt(item, indent + 2), f"{pad}  }}{comma}"]
            lines.append(f"{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(item) for item in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


# ---------------------------------------------------------------------------------------------------- configs


def triton_tensor(tensor: TensorSpec, dtype: str | None = None) -> dict:
    """One input or output of a model config: the contract's name, dtype (or `dtype`), dims (-1 where dynamic)."""
    dtype = dtype or tensor.dtype
    if dtype not in TRITON_DTYPES:
        raise UsageError(f"{tensor.name}: dtype {dtype} has no Triton data type here (known: {list(TRITON_DTYPES)})")
    return {"name": tensor.name, "data_type": Symbol(TRITON_DTYPES[dtype]),
            "dims": [dim if isinstance(dim, int) else -1 for dim in tensor.dims]}


def graph_config(spec: GraphSpec, kind: str, *, input_dtypes: dict[str, str] | None = None,
                 profiles: int = 1) -> dict:
    """The config.pbtxt of one graph model.

    Args:
        spec: the graph's contract.
        kind: "onnxruntime", "tensorrt_plan" or "python".
        input_dtypes: inputs the model takes in another dtype than the contract's (TensorRT < 10: int32).
        profiles: (tensorrt_plan) the engine's optimization profiles; with more than one, every instance may pick
            any of them (Triton's default is profile 0 only).
    """
    input_dtypes = input_dtypes or {}
    config: dict = {"name": spec.name}
    config.update({"onnxruntime": {"backend": "onnxruntime"}, "tensorrt_plan": {"platform": "tensorrt_plan"},
                   "python": {"backend": "python"}}[kind])
    config["max_batch_size"] = 0  # dims include the batch: the flamingo model sends whole batches
    config["input"] = [triton_tensor(tensor, input_dtypes.get(tensor.name)) for tensor in spec.inputs]
    config["output"] = [triton_tensor(tensor) for tensor in spec.outputs]
    if kind == "python":
        config["instance_group"] = [{"kind": Symbol("KIND_CPU"), "count": 1}]
    elif kind == "tensorrt_plan" and profiles > 1:
        config["instance_group"] = [{"kind": Symbol("KIND_GPU"), "count": 1,
                                     "profile": [str(index) for index in range(profiles)]}]
    return config


def flamingo_config() -> dict:
    """The config.pbtxt of the generation model: one request = one prompt (`<image>` marks each image), answered
    with its text and generated ids. One instance: every request joins the same in-flight batch."""
    def tensor(name, dtype, dims, optional=False):
        return {"name": name, "data_type": Symbol(dtype), "dims": dims, **({"optional": True} if optional else {})}

    return {"name": FLAMINGO_MODEL, "backend": "python", "max_batch_size": 0,
            "input": [tensor("prompt", "TYPE_STRING", [1]), tensor("image", "TYPE_STRING", [-1], True),
                      tensor("max_new_tokens", "TYPE_INT32", [1], True),
                      tensor("temperature", "TYPE_FP32", [1], True), tensor("seed", "TYPE_INT64", [1], True)],
            "output": [tensor("text", "TYPE_STRING", [1]), tensor("token_ids", "TYPE_INT64", [-1])],
            "instance_group": [{"kind": Symbol("KIND_CPU"), "count": 1}]}


# -------------------------------------------------------------------------------------------- flamingo.json


@dataclass(frozen=True)
class ModelSettings:
    """REPO/flamingo/1/flamingo.json: what the flamingo model builds its Pipeline from (with the tokenizer files
    beside it). Unknown keys are refused."""

    version: int
    contract_version: int
    config: dict  # FlamingoConfig.to_dict()
    models: dict  # graph -> the Triton model that serves it
    input_dtypes: dict  # graph -> {input: dtype} its model takes instead of the contract's (TensorRT < 10)
    max_context: int  # prompt + generated tokens per request
    max_images: int  # images per prompt
    max_prompt: int | None  # (engines) tokens in one prefill
    max_batch: int  # requests decoded together (at most what engines were built for)
    export: str  # where it was written from
    engines: str | None = None
    # The image side and the decode batch take turns (Scheduler): the graph models run on the CPU (--python-only)
    one_graph_at_a_time: bool = False
    image_cache_size: int = 64  # images whose cross-attention K/V are kept
    prefix_cache_bytes: int = 64 << 20  # memory for reused prompt prefixes' self-attention K/V

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def read_settings(folder: str | Path) -> ModelSettings:
    """The flamingo model's settings from its version folder.

    Raises:
        UsageError: the file is missing or malformed, or from another version: re-run flamingo-edge triton-repo.
    """
    path = Path(folder) / SETTINGS_FILE
    redo = "re-run flamingo-edge triton-repo with this flamingo-edge version"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: cannot be read ({error}); {redo}") from None
    names = {f.name for f in fields(ModelSettings)}
    required = {f.name for f in fields(ModelSettings) if f.default is MISSING}
    if not isinstance(data, dict) or set(data) - names or required - set(data):
        raise UsageError(f"{path}: expected an object with the keys {sorted(names)}; {redo}")
    settings = ModelSettings(**data)
    if settings.version != SETTINGS_VERSION or settings.contract_version != CONTRACT_VERSION:
        raise UsageError(f"{path}: settings v{settings.version} for graph contract v{settings.contract_version}; "
                         f"this flamingo-edge reads v{SETTINGS_VERSION}, contract v{CONTRACT_VERSION}; {redo}")
    return settings


# ------------------------------------------------------------------------------------------------ the writer


def _link(source: Path, target: Path) -> None:
    """Hard-link `source` as `target` (exports are never modified in place), or copy it across file systems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(source, target)


def _write_config(folder: Path, config: dict) -> None:
    atomic_write(folder / "config.pbtxt", (format_pbtxt(config) + "\n").encode())


def _template(name: str) -> bytes:
    return (resources.files(TEMPLATES) / f"{name}.py").read_bytes()


def _check_export(record: ExportRecord, export_dir: Path, engines: Path | None) -> None:
    """Refuse exports whose graphs Triton could not serve as the contract says."""
    quantization = record.quantization or {}
    if engines is None and quantization.get("encoding") == "TRT_INT4DequantizeLinear":
        raise UsageError(f"{export_dir}: its int4 graphs use TensorRT's own TRT_INT4DequantizeLinear, which ONNX "
                         "Runtime cannot run: build engines from it and pass them with --engines")
    if (quantization.get("weights") or {}).get("decoder", {}).get("fused_attention"):  # graphs.in_place_decoder
        raise UsageError(f"{export_dir}: its decoder writes the KV cache in place (ONNX Runtime's fused "
                         f"{record.precision} attention), which a Triton model cannot share with the flamingo model: "
                         "quantize the fp32 export with --no-fusions, or serve the fp32/int8 export")


def _engine_input_dtypes(spec: GraphSpec, manifest: Manifest) -> dict[str, str]:
    """Inputs the engine takes as int32: TensorRT before 10 has no int64 tensors and imports int64 inputs as int32
    (runtime/tensorrt_backend.py reads the same from the engine itself)."""
    if version_tuple(manifest.tensorrt["version"]) >= (10,):
        return {}
    return {tensor.name: "int32" for tensor in spec.inputs if tensor.dtype == "int64"}


def _check_engines(manifest: Manifest, engines: Path, specs: dict[str, GraphSpec]) -> None:
    if manifest.tensorrt["flavour"] != "tensorrt":
        raise UsageError(f"{engines} holds {manifest.tensorrt['flavour']} engines (target {manifest.target}); "
                         "Triton's tensorrt_plan backend loads TensorRT engines only: build them with --target "
                         "datacenter (or your Jetson's target) on a machine with the TensorRT of your Triton release")
    for name in GRAPH_NAMES:
        if name not in manifest.engines:
            raise UsageError(f"{engines} has no {name} engine; run flamingo-edge build again")
        for profile in manifest.profiles.get(name, []):
            if set(profile) != set(specs[name].input_names):
                raise UsageError(f"{engines}: the {name} engine's profiles name {sorted(profile)}, the contract "
                                 f"{sorted(specs[name].input_names)}; rebuild the engines from this export")


def _write_graph(folder: Path, spec: GraphSpec, record: ExportRecord, export_dir: Path, *, python_only: bool) -> None:
    graph = record.graphs[spec.name]
    _link(export_dir / graph.file, folder / "1" / "model.onnx")
    if graph.data_file is not None:  # the .onnx names its data file: it must sit next to it, under that name
        _link(export_dir / graph.data_file, folder / "1" / graph.data_file)
    if python_only:
        atomic_write(folder / "1" / "model.py", _template("onnx_graph"))
    _write_config(folder, graph_config(spec, "python" if python_only else "onnxruntime"))


def _limits(config: FlamingoConfig, manifest: Manifest | None, max_batch: int) -> dict:
    positions = config.decoder.max_positions
    if manifest is None:
        return {"max_context": positions, "max_images": MAX_IMAGES, "max_prompt": None, "max_batch": max_batch}
    limits = manifest.limits
    return {"max_context": min(positions, limits["max_context"]), "max_images": min(MAX_IMAGES, limits["max_images"]),
            "max_prompt": limits["max_prompt"], "max_batch": min(max_batch, limits["max_batch"])}


def check_options(*, engines, python_only: bool, max_batch: int) -> None:
    """Refuse `write_repository` options that cannot go together, before any file is read.

    Raises:
        UsageError: engines with python_only, or max_batch < 1.
    """
    if engines is not None and python_only:
        raise UsageError("--engines and --python-only exclude each other: the Python backend runs the ONNX graphs, "
                         "tensorrt_plan models need Triton's TensorRT backend; pick one")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise UsageError(f"max_batch must be an integer >= 1; got {max_batch!r}")


def write_repository(export_dir: str | Path, output: str | Path, *, engines: str | Path | None = None,
                     python_only: bool = False, max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, str]:
    """Write a Triton model repository that serves an export: its four graphs and the `flamingo` generation model.

    Args:
        export_dir: a folder written by `flamingo-edge export` (or quantize).
        output: the repository folder to write (must not exist).
        engines: a folder written by `flamingo-edge build` from this export: the graphs become tensorrt_plan models.
        python_only: every model uses the Python backend (the graphs run ONNX Runtime inside it): what the
            tritonserver bundled with PyTriton on PyPI runs, since it has no other backend.
        max_batch: requests the flamingo model decodes together (with engines, at most what they were built for).

    Returns:
        model name -> how it is served ("onnxruntime", "tensorrt_plan" or "python").

    Raises:
        UsageError: `output` exists, engines with python_only, RTX or other-contract engines, an export Triton cannot
            serve, or max_batch < 1.
        ExportError: the export is incomplete or modified.
        EngineBuildError, EngineMismatchError: the engines are incomplete, modified or built from other graphs.
    """
    check_options(engines=engines, python_only=python_only, max_batch=max_batch)
    export_dir, output = Path(export_dir), Path(output)
    record = read_export_record(export_dir)
    engines = None if engines is None else Path(engines)
    _check_export(record, export_dir, engines)
    config = FlamingoConfig.from_dict(record.config)
    specs = build_graphs(config)
    manifest = None
    if engines is not None:
        manifest = read_manifest(engines, export_dir)
        _check_engines(manifest, engines, specs)
    kinds, input_dtypes = {}, {}
    with atomic_folder(output) as partial:
        for name in GRAPH_NAMES:
            folder = partial / name
            if manifest is None:
                _write_graph(folder, specs[name], record, export_dir, python_only=python_only)
                kinds[name] = "python" if python_only else "onnxruntime"
                continue
            _link(engines / manifest.engines[name]["file"], folder / "1" / "model.plan")
            input_dtypes[name] = _engine_input_dtypes(specs[name], manifest)
            _write_config(folder, graph_config(specs[name], "tensorrt_plan", input_dtypes=input_dtypes[name],
                                               profiles=len(manifest.profiles.get(name, [])) or 1))
            kinds[name] = "tensorrt_plan"
        version = partial / FLAMINGO_MODEL / "1"
        for file in record.tokenizer_files:
            _link(export_dir / file, version / file)
        settings = ModelSettings(SETTINGS_VERSION, CONTRACT_VERSION, record.config, {n: n for n in GRAPH_NAMES},
                                 {n: d for n, d in input_dtypes.items() if d}, **_limits(config, manifest, max_batch),
                                 export=str(export_dir.resolve()),
                                 engines=None if engines is None else str(engines.resolve()),
                                 one_graph_at_a_time=python_only)
        atomic_write(version / SETTINGS_FILE, settings.to_json().encode())
        atomic_write(version / "model.py", _template("flamingo"))
        _write_config(partial / FLAMINGO_MODEL, flamingo_config())
        kinds[FLAMINGO_MODEL] = "python"
    return kinds
