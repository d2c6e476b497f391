"""Record what each graph really sees when the fp32 pipeline runs on real images and prompts.

    CALIB/
      calibration.json        what was used: export and its graph hashes, source, n, seed, prompts, files
      vision.npz              sample00000/pixel_values, sample00001/pixel_values, ...
      resampler.npz           sample00000/image_features, ...
      xattn_kv.npz            sample00000/visual_tokens, ...
      decoder.npz             prefill and decode-step feeds: sample00000/input_ids, sample00000/past_key.0, ...

Every sample is one feed, exactly as the pipeline passed it to the graph (all of the graph's inputs, by name). The
folder is written under a temporary name and renamed when complete, so an interrupted run leaves nothing that
`read_calibration` accepts.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flamingo_edge.artifacts import atomic_folder, atomic_write, check_new_folder, read_export_record, sha256_of
from flamingo_edge.errors import CalibrationError, UsageError
from flamingo_edge.graphs import GRAPH_NAMES
from flamingo_edge.runtime.backend import RecordingSession
from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.runtime.processor import IMAGE_MARKER, prompt_items, read_prompt_file

RECORD_FILE = "calibration.json"
RECORD_VERSION = 1
DEFAULT_PROMPTS = ("<image>caption:", "<image>question: what colour is the square? answer:")


@dataclass
class CalibrationRecord:
    version: int
    export: str
    export_graphs_sha256: dict[str, str]
    source: str
    n_images: int
    seed: int
    prompts: list[str]
    max_new_tokens: int
    graphs: dict[str, dict]  # name -> {"file", "samples", "sha256"}


def calibration_prompts(prompts_file: str | Path | None) -> list[str]:
    """The prompt templates: one per line with exactly one `<image>`, or the defaults.

    Raises:
        PromptError: an unreadable file or no prompt.
        UsageError: a line without exactly one `<image>`.
    """
    if prompts_file is None:
        return list(DEFAULT_PROMPTS)
    lines = read_prompt_file(prompts_file)
    bad = [number for number, line in enumerate(lines, 1) if line.count(IMAGE_MARKER) != 1]
    if bad:
        raise UsageError(f"{prompts_file}: line(s) {bad} must have exactly one {IMAGE_MARKER} (where the calibration "
                         "image goes)")
    return lines


def record_calibration(export_dir: str | Path, images: list[np.ndarray], prompts: list[str], out_dir: str | Path, *,
                       source: str, seed: int, max_new_tokens: int = 8,
                       on_image: Callable[[], None] | None = None) -> CalibrationRecord:
    """Run the export's fp32 pipeline on every image (with the prompts in turn) and save what each graph saw.

    Raises:
        UsageError: `out_dir` already exists (nothing is overwritten).
        ExportError: `export_dir` is not a complete export.
    """
    export_dir, out_dir = Path(export_dir), check_new_folder(out_dir)
    record = read_export_record(export_dir)
    with Pipeline.open(export_dir, device="cpu", prefix_cache_bytes=0) as pipeline:
        pipeline.sessions = {name: RecordingSession(s) for name, s in pipeline.sessions.items()}
        for index, image in enumerate(images):
            template = prompts[index % len(prompts)]
            pipeline.complete([prompt_items(template, [image])], max_new_tokens=max_new_tokens)  # greedy
            if on_image:
                on_image()
        feeds = {name: pipeline.sessions[name].feeds for name in GRAPH_NAMES}
    with atomic_folder(out_dir) as partial:  # the folder appears complete or not at all
        graphs = {}
        for name, samples in feeds.items():
            file = partial / f"{name}.npz"
            buffer = io.BytesIO()
            np.savez(buffer, **{f"sample{i:05d}/{k}": v for i, feed in enumerate(samples) for k, v in feed.items()})
            atomic_write(file, buffer.getvalue())
            graphs[name] = {"file": file.name, "samples": len(samples), "sha256": sha256_of(file)}
        result = CalibrationRecord(RECORD_VERSION, str(export_dir.resolve()),
                                   {name: g.sha256 for name, g in record.graphs.items()}, source, len(images), seed,
                                   prompts, max_new_tokens, graphs)
        atomic_write(partial / RECORD_FILE, (json.dumps(asdict(result), indent=2) + "\n").encode())
    return result


def read_calibration(folder: str | Path) -> CalibrationRecord:
    """The record of a complete calibration folder, its files checked against their hashes.

    Raises:
        CalibrationError: no record, an unknown version, or a missing or modified file.
    """
    folder = Path(folder)
    try:
        data = json.loads((folder / RECORD_FILE).read_text())
        record = CalibrationRecord(**data)
    except (OSError, ValueError, TypeError) as error:
        raise CalibrationError(f"{folder} is not a complete calibration folder ({error}); run flamingo-edge "
                               "calibrate") from None
    if record.version != RECORD_VERSION:
        raise CalibrationError(f"{folder}: calibration format v{record.version}; this flamingo-edge reads "
                               f"v{RECORD_VERSION}: run flamingo-edge calibrate again")
    for name, entry in record.graphs.items():
        path = folder / entry["file"]
        if not path.is_file() or sha256_of(path) != entry["sha256"]:
            raise CalibrationError(f"{folder}: {entry['file']} is missing or was modified; run flamingo-edge "
                                   "calibrate again")
    return record


def iter_samples(folder: str | Path, graph: str) -> Iterator[dict[str, np.ndarray]]:
    """The recorded feeds of one graph, in recording order, as {input name: array}."""
    record = read_calibration(folder)
    with np.load(Path(folder) / record.graphs[graph]["file"]) as data:
        samples: dict[str, dict[str, np.ndarray]] = {}
        for key in data.files:
            sample, name = key.split("/", 1)
            samples.setdefault(sample, {})[name] = data[key]
    for sample in sorted(samples):
        yield samples[sample]


def onnxruntime_reader(samples: Iterator[Mapping[str, np.ndarray]] | list):
    """The samples as an `onnxruntime.quantization.CalibrationDataReader`.

    One reader for both uses of the recorded feeds: the Q/DQ graphs (`quantize_static`) and the ranges of the
    TensorRT calibration caches (`create_calibrator`).
    """
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter(samples)

        def get_next(self):
            return next(self.samples, None)

    return Reader()


def onnxruntime_method(method: str):
    """"minmax", "entropy" or "percentile" as ONNX Runtime's CalibrationMethod."""
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]
