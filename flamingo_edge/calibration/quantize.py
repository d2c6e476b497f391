"""FP16 and INT8 (explicit Q/DQ) graphs from an fp32 export, written as a complete export.

- fp16: `onnxruntime.transformers.float16.convert_float_to_float16`, inputs and outputs kept float32 (the graph
  contract does not change), with the ops that overflow or lose too much in fp16 kept in float32 (`FP16_KEEP_FP32`).
- int8: `onnxruntime.quantization.quantize_static` in QDQ format: per-channel symmetric int8 weights, per-tensor
  symmetric int8 activations (what TensorRT's explicit quantization expects), calibrated on the feeds
  `flamingo-edge calibrate` recorded for that very export. Only the matrix products are quantized
  (`INT8_OP_TYPES`); normalisation, softmax, gates and residual adds stay in float.
- int4, int8-weights: weight-only, block-wise, for the language model (decoder and xattn_kv): weights.py says how,
  with round-to-nearest or GPTQ (calibrated), encoded for ONNX Runtime (MatMulNBits) or TensorRT 10+
  (block-quantized DequantizeLinear, opset 21).

The output folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import replace
from pathlib import Path

from flamingo_edge.precision import QUANTIZED_PRECISIONS, WEIGHT_BITS, WEIGHT_ONLY_PRECISIONS, Precision
from flamingo_edge.artifacts import atomic_folder, atomic_write, check_new_folder, read_export_record, sha256_of
from flamingo_edge.errors import CalibrationError, FeatureUnavailableError, UsageError
from flamingo_edge.config import FlamingoConfig
from flamingo_edge.extras import require
from flamingo_edge.graphs import GRAPH_NAMES

PRECISIONS = tuple(p.value for p in QUANTIZED_PRECISIONS)  # the CLI choices
METHODS = ("minmax", "entropy", "percentile")  # int8 activation ranges
WEIGHT_METHODS = ("rtn", "gptq")  # int4 / int8-weights (weights.py)
WEIGHT_TARGETS = ("onnxruntime", "tensorrt")  # which encoding weight-only graphs get (weights.encoding_for)
WEIGHT_DEFAULT_GRAPHS = ("xattn_kv", "decoder")  # the language model's matrix products
# 128 for both: TensorRT-LLM's and ModelOpt's int4 default and GPTQ's usual group; on this CPU an int4 decode step
# with blocks of 128 ran in 4.1-4.5 ms against 5.4-6.2 ms with 32 (100m preset), for 15 % fewer bytes. Blocks of 32
# (--block-size 32) err less.
DEFAULT_BLOCK_SIZE = {Precision.INT4: 128, Precision.INT8_WEIGHTS: 128}
# Kept in float32 in fp16 graphs: LayerNorm and RMSNorm (mean of squares overflows fp16), softmax, and the exp/sqrt
# behind them.
FP16_KEEP_FP32 = ("LayerNormalization", "SimplifiedLayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt",
                  "Exp")
INT8_OP_TYPES = ("MatMul", "Gemm", "Conv")
INT8_DEFAULT_GRAPHS = ("vision", "resampler", "xattn_kv")

logger = logging.getLogger(__name__)


def _fp16(source: Path, target: Path, keep_fp32: tuple[str, ...]) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True, op_block_list=list(keep_fp32))
    atomic_write(target, model.SerializeToString())


class _QuietQuantizationTools(logging.Filter):
    """Drops onnxruntime.quantization's advice on the root logger ("Please consider pre-processing before
    quantization", once per graph): it is about models we build ourselves, and says nothing the user can act on.
    Its errors still pass, and everything does with verbose logging (flamingo-edge -v)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_tools = f"onnxruntime{os.sep}quantization{os.sep}" in record.pathname
        return not from_tools or record.levelno >= logging.ERROR or logger.isEnabledFor(logging.INFO)


@contextmanager
def _quiet_quantization_tools() -> Iterator[None]:
    """onnxruntime.quantization's warnings (root logger) and prints (its entropy and percentile calibrators print
    their progress on stdout) kept off the terminal; the prints go to this module's log at INFO (-v). Stdout is
    redirected for the whole process while it runs."""
    quiet, printed = _QuietQuantizationTools(), io.StringIO()
    logging.getLogger().addFilter(quiet)  # onnxruntime.quantization calls logging.warning(): the root logger
    try:
        with redirect_stdout(printed):
            yield
    finally:
        logging.getLogger().removeFilter(quiet)
        for line in printed.getvalue().splitlines():
            logger.info("onnxruntime.quantization: %s", line)


def _int8(source: Path, target: Path, samples, method: str, op_types: tuple[str, ...]) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from flamingo_edge.calibration.record import onnxruntime_method, onnxruntime_reader

    _written_by(target, lambda out: quantize_static(
        str(source), str(out), onnxruntime_reader(samples), quant_format=QuantFormat.QDQ, per_channel=True,
        weight_type=QuantType.QInt8, activation_type=QuantType.QInt8, calibrate_method=onnxruntime_method(method),
        op_types_to_quantize=list(op_types), extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}))


def _written_by(target: Path, write: Callable[[Path], None]) -> None:
    """`write` a file (onnxruntime.quantization writes its own files) in a scratch folder, then `target`
    atomically with its bytes."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / target.name
        write(out)
        atomic_write(target, out.read_bytes())


VISION_INT8_GRAPHS = ("vision", "resampler")  # --vision-int8: the image side, dynamic int8 on ONNX Runtime


def _dynamic_int8(source: Path, target: Path) -> None:
    """`source` with int8 per-channel MatMul weights and int8 activations quantized at run time (ONNX Runtime's
    DynamicQuantizeMatMul; VNNI dot products on x86): benchmarks/dynamic_int8.py measured the vision graph 2.4x
    faster on the 100m preset with the demo's task accuracy unchanged."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _written_by(target, lambda out: quantize_dynamic(str(source), str(out), per_channel=True,
                                                     weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]))


def _weight_only(source: Path, folder: Path, file: str, precision: str, block_size: int, method: str,
                 encoding: str, accuracy_level: int, lm_head: bool, embeddings: bool, calibration,
                 name: str, keep_fp32: tuple[str, ...] | None, max_positions: int | None,
                 on_step: Callable[[str], None] | None = None) -> dict:
    """Write the weight-only quantized `source` as `folder/file` (external data when large), its float parts in
    fp16 when `keep_fp32` names the ops to keep in fp32; its summary, with the GraphFile fields under "files"."""
    import onnx

    from flamingo_edge.calibration.weights import quantize_graph
    from flamingo_edge.export.export import EXTERNAL_DATA_THRESHOLD

    samples = None
    if method == "gptq":
        from flamingo_edge.calibration.record import iter_samples

        def samples():
            return iter_samples(calibration, name)
    model, summary = quantize_graph(source, bits=WEIGHT_BITS[Precision(precision)], block_size=block_size,
                                    method=method, encoding=encoding, lm_head=lm_head, embeddings=embeddings,
                                    accuracy_level=accuracy_level, samples=samples, max_positions=max_positions,
                                    in_place_attention=keep_fp32 is None,
                                    on_weight=on_step and (lambda done, total: on_step(f"{name} {done}/{total}")),
                                    on_pass=on_step and (lambda number, total: on_step(
                                        f"{name}: calibration inputs, pass {number}/{total}")))
    if keep_fp32 is not None:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_fp32))
    external = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    data_file = f"{file}.data" if external else None
    path = folder / file
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file, size_threshold=0)
    else:
        atomic_write(path, model.SerializeToString())
    summary["files"] = dict(sha256=sha256_of(path), data_file=data_file,
                            data_sha256=sha256_of(folder / data_file) if external else None)
    return summary


def quantize_export(export_dir: str | Path, out_dir: str | Path, precision: str, *,
                    calibration: str | Path | None = None, method: str | None = None,
                    graphs: list[str] | None = None, exclude_ops: list[str] | None = None,
                    on_graph: Callable[[str], None] | None = None, tensorrt_version: str = "10.3",
                    block_size: int | None = None, target: str = "onnxruntime", accuracy_level: int = 4,
                    lm_head: bool = True, embeddings: bool = False, float16: bool = False,
                    vision_int8: bool = False, on_step: Callable[[str], None] | None = None,
                    fusions: bool = True) -> Path:
    """Write `out_dir`: the export with `graphs` in `precision`, the rest copied; export.json says how.

    Args:
        export_dir: an fp32 export.
        out_dir: the folder to write; must not exist.
        precision: "fp16", "int8", "int4" or "int8-weights".
        calibration: a `flamingo-edge calibrate` folder of this export (int8, and the gptq method).
        method: int8 activation calibration: "minmax" (default), "entropy" or "percentile"; int4 and int8-weights:
            "rtn" (default, no data) or "gptq" (needs `calibration`).
        graphs: the graphs to convert (default: all four for fp16; vision, resampler, xattn_kv for int8; xattn_kv
            and decoder for int4 and int8-weights).
        exclude_ops: op types to keep in float besides the defaults.
        on_graph: called with each graph's name before it is converted (progress).
        on_step: int4 / int8-weights: called with "<graph> <done>/<total> weights" (or the Hessian pass) as a
            graph's weights are quantized (progress within a graph: GPTQ on a large model takes minutes).
        tensorrt_version: int8: the header of the TensorRT calibration caches written next to the graphs
            (`<graph>.int8-calib.cache`, for implicit INT8 of the fp32 graphs on TensorRT <= 10; trt_cache.py);
            int4 for target "tensorrt": the TensorRT that will build (before 10.16: TRT_INT4DequantizeLinear).
        block_size: int4 / int8-weights: weights per scale (default 128).
        target: int4 / int8-weights: "onnxruntime" (MatMulNBits) or "tensorrt" (DequantizeLinear, opset 21).
        accuracy_level: MatMulNBits' compute type: 4 (int8 activations per block, VNNI on x86) or 0 (float32).
        lm_head: int4 / int8-weights: quantize the LM head too.
        embeddings: int4 / int8-weights: quantize the token embedding tables too (memory only: a step reads one
            row per token).
        float16: int4 / int8-weights: what stays float (activations, scales, the other graphs, embeddings unless
            quantized) becomes fp16, norms and softmax excepted (FP16_KEEP_FP32): the form TensorRT's weight-only
            kernels run on a GPU, and half the memory of the vision tower.
        vision_int8: int4 / int8-weights for ONNX Runtime: the vision and resampler graphs with int8 weights and
            dynamic int8 activations.
        fusions: int4 / int8-weights for ONNX Runtime: fuse the decoder's rotary embeddings into RotaryEmbedding
            and, with fp32 float parts, its attention over the cache into GroupQueryAttention writing the cache in
            place and its cross-attention into MultiHeadAttention (calibration/ort_fusions.py).

    Raises:
        UsageError: an unknown precision, method or graph, an existing `out_dir`, int8 without calibration, or an
            export that is not fp32.
        CalibrationError: a calibration folder that is incomplete or was recorded on another export.
    """
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    weight_only = precision in WEIGHT_ONLY_PRECISIONS
    methods = WEIGHT_METHODS if weight_only else METHODS
    method = method or methods[0]
    if method not in methods:
        raise UsageError(f"unknown method {method!r} for {precision}; choose one of {', '.join(methods)}")
    if weight_only:
        from flamingo_edge.calibration.weights import BLOCK_SIZES

        block_size = block_size or DEFAULT_BLOCK_SIZE[Precision(precision)]
        if block_size not in BLOCK_SIZES:
            raise UsageError(f"--block-size {block_size}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
        if target not in WEIGHT_TARGETS:
            raise UsageError(f"unknown target {target!r}; choose one of {', '.join(WEIGHT_TARGETS)}")
        from flamingo_edge.calibration.weights import encoding_for

        encoding = encoding_for(target, WEIGHT_BITS[Precision(precision)], tensorrt_version)
        if vision_int8 and (target != "onnxruntime" or float16):
            raise UsageError("--vision-int8 is ONNX Runtime's dynamic int8 on fp32 graphs: use it with --target "
                             "onnxruntime and --float fp32 (for TensorRT, quantize the image side with --precision "
                             "int8 instead)")
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise UsageError(f"--accuracy-level {accuracy_level}: MatMulNBits takes 0 to 4")
    defaults = {Precision.FP16: GRAPH_NAMES, Precision.INT8: INT8_DEFAULT_GRAPHS}
    graphs = list(graphs or defaults.get(precision, WEIGHT_DEFAULT_GRAPHS))
    unknown = [g for g in graphs if g not in GRAPH_NAMES]
    if unknown:
        raise UsageError(f"unknown graph(s) {unknown}; the graphs are {', '.join(GRAPH_NAMES)}")
    check_new_folder(out_dir)
    record = read_export_record(export_dir)
    if record.precision != Precision.FP32:
        raise UsageError(f"{export_dir} is already {record.precision}; quantize the fp32 export it came from")
    calibration_record = None
    if precision == Precision.INT8 or method == "gptq":
        if precision == Precision.INT8:
            from flamingo_edge.calibration.trt_cache import header

            header(tensorrt_version)  # a bad version fails now, not after the work
        if calibration is None:
            needs = precision if precision == Precision.INT8 else f"{precision} with {method}"
            raise UsageError(f"{needs} needs --calibration CALIB (from flamingo-edge calibrate on this export)")
        from flamingo_edge.calibration.record import read_calibration

        calibration_record = read_calibration(calibration)
        if calibration_record.export_graphs_sha256 != {n: g.sha256 for n, g in record.graphs.items()}:
            raise CalibrationError(f"{calibration} was recorded on another export ({calibration_record.export}); "
                                   f"run flamingo-edge calibrate {export_dir} again")
    require("onnx", "export", "quantize (onnxruntime's quantization tools read and write ONNX with it)")
    try:
        import onnxruntime.quantization  # noqa: F401
    except ImportError as error:
        raise FeatureUnavailableError(f"quantize needs onnxruntime's quantization tools ({error})") from None

    keep = tuple(dict.fromkeys([*FP16_KEEP_FP32, *(exclude_ops or [])]))
    positions = FlamingoConfig.from_dict(record.config).decoder.max_positions if fusions else None
    op_types = tuple(op for op in INT8_OP_TYPES if op not in (exclude_ops or []))
    with atomic_folder(out_dir) as partial:
        for name in record.tokenizer_files:
            shutil.copy2(export_dir / name, partial / name)
        files, caches, summaries = {}, {}, {}
        for name, entry in record.graphs.items():
            source, out_file = export_dir / entry.file, partial / entry.file
            if name not in graphs and weight_only and (float16 or vision_int8 and name in VISION_INT8_GRAPHS):
                if on_graph:
                    on_graph(name)
                if float16:
                    _fp16(source, out_file, keep)
                else:
                    with _quiet_quantization_tools():
                        _dynamic_int8(source, out_file)
                files[name] = replace(entry, sha256=sha256_of(out_file), data_file=None, data_sha256=None)
                continue
            if name not in graphs:
                shutil.copy2(source, out_file)
                if entry.data_file:
                    shutil.copy2(export_dir / entry.data_file, partial / entry.data_file)
                files[name] = entry
                continue
            if on_graph:
                on_graph(name)
            if weight_only:
                summaries[name] = _weight_only(source, partial, entry.file, precision, block_size, method,
                                               encoding, accuracy_level, lm_head, embeddings, calibration, name,
                                               keep if float16 else None, positions, on_step)
                files[name] = replace(entry, **summaries[name].pop("files"))
                continue
            if precision == Precision.FP16:
                _fp16(source, out_file, keep)
            else:
                from flamingo_edge.calibration.record import iter_samples

                from flamingo_edge.calibration.trt_cache import activation_amax, write_cache

                with _quiet_quantization_tools():
                    _int8(source, out_file, iter_samples(calibration, name), method, op_types)
                    amax = activation_amax(source, iter_samples(calibration, name), method)
                caches[name] = f"{name}.int8-calib.cache"
                atomic_write(partial / caches[name], write_cache(amax, tensorrt_version))
            files[name] = replace(entry, sha256=sha256_of(out_file), data_file=None, data_sha256=None)
        provenance = {"source_export": str(export_dir.resolve()), "graphs": graphs,
                      "kept_in_float": list(keep) if precision == Precision.FP16 else
                      f"every op except {', '.join(op_types)}"}
        if weight_only:
            provenance.update(kept_in_float="everything but the MatMul weights" +
                              ("" if lm_head else " and the LM head") +
                              (", embeddings quantized" if embeddings else "") +
                              (f"; float parts in fp16 except {', '.join(keep)}" if float16 else ""),
                              method=method, bits=WEIGHT_BITS[Precision(precision)], block_size=block_size,
                              symmetric=True, target=target, encoding=encoding, lm_head=lm_head,
                              embeddings=embeddings, float="fp16" if float16 else "fp32", fusions=fusions,
                              vision_int8="dynamic" if vision_int8 else None,
                              weights={name: summary for name, summary in summaries.items()})
            if encoding == "MatMulNBits":
                provenance["accuracy_level"] = accuracy_level
            else:
                provenance["tensorrt_version"] = tensorrt_version
            if calibration_record is not None:
                provenance.update(calibration=str(Path(calibration).resolve()),
                                  calibration_source=calibration_record.source,
                                  calibration_images=calibration_record.n_images,
                                  calibration_seed=calibration_record.seed)
        elif calibration_record is not None:
            provenance.update(method=method, calibration=str(Path(calibration).resolve()),
                              calibration_source=calibration_record.source,
                              calibration_images=calibration_record.n_images, calibration_seed=calibration_record.seed,
                              tensorrt_calibration_caches=caches, tensorrt_cache_version=tensorrt_version)
        new = replace(record, graphs=files, precision=precision, quantization=provenance)
        atomic_write(partial / "export.json", new.to_json().encode())
    return out_dir

