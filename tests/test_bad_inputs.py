"""Bad inputs a new user gives, across the CLI and the public API: each is a typed error with a one-line message that
says what was wrong and how to fix it (exit 2 from the CLI), no traceback, and nothing written.

The CLI cases run in-process through `flamingo_edge.cli.main.main` (a few through a real subprocess, to see that
no traceback and no third-party log line reaches the terminal); the API cases call `Pipeline`, `load_checkpoint`,
`Processor`, the stream API and the writers directly. Every case runs in its own folder, and that folder must hold
nothing new afterwards: no output, no temporary sibling.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from flamingo_edge.artifacts import atomic_write, read_export_record
from flamingo_edge.cli.main import main
from flamingo_edge.demo.evaluate import evaluate
from flamingo_edge.errors import CheckpointError, ExportError, FlamingoEdgeError, PromptError, UsageError
from flamingo_edge.export.export import export_all
from flamingo_edge.models.checkpoint import DEMO_CHECKPOINT, load_checkpoint, load_config
from flamingo_edge.models.importers.idefics import config_from_hf
from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.runtime.processor import Processor

ROOT = Path(__file__).resolve().parents[1]


# -- the folders the cases need ------------------------------------------------------------------------------------


@dataclass
class Place:
    """What a case may use: the demo checkpoint and its export (read-only, shared), and its own folder `tmp`."""

    tmp: Path
    export: Path
    checkpoint: Path
    converted: Path  # a converted OpenFlamingo checkpoint (shared, read-only)

    def idefics_config(self, name: str, change: Callable[[dict], None]) -> Path:
        """A checkpoint folder holding the demo checkpoint's config.json with `change` applied (no weights: every
        command reads the config first)."""
        config = json.loads((self.checkpoint / "config.json").read_text())
        change(config)
        return self._folder(name, {"config.json": json.dumps(config)})

    def own_config(self, name: str, change: Callable[[dict], None]) -> Path:
        """A folder in flamingo-edge's converted format ("model_type": "flamingo_edge") with a changed config."""
        record = {"model_type": "flamingo_edge", "config": load_config(self.checkpoint).to_dict()}
        change(record)
        return self._folder(name, {"config.json": json.dumps(record)})

    def record(self, name: str, change: Callable[[dict], object]) -> Path:
        """An export folder whose export.json is the demo export's with `change` applied (a return value other
        than None replaces the whole record)."""
        data = json.loads((self.export / "export.json").read_text())
        replaced = change(data)
        return self._folder(name, {"export.json": json.dumps(data if replaced is None else replaced)})

    def _folder(self, name: str, files: dict[str, str]) -> Path:
        folder = self.tmp / name
        folder.mkdir()
        for file, text in files.items():
            (folder / file).write_text(text)
        return folder


def _tmpfs(folder: Path, options: str) -> bool:
    """Mount a tmpfs at `folder` (root with CAP_SYS_ADMIN only); False where this machine does not allow it."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@contextlib.contextmanager
def read_only_folder(tmp: Path):
    """A folder nobody can write to. Non-root: chmod 555. Root ignores modes: a read-only tmpfs, or where mounting
    is not allowed, /proc (writes there fail too, with another errno)."""
    folder = tmp / "read-only"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
    elif _tmpfs(folder, "ro,size=64k"):
        try:
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.rmdir()
        yield Path("/proc/flamingo-edge-test")


@contextlib.contextmanager
def full_disk(tmp: Path, monkeypatch):
    """A folder on a disk with 1 MiB free (a tiny tmpfs), or, where mounting is not allowed, a folder where the
    export's graph writes fail with ENOSPC (simulated at `onnx.save_model` only)."""
    folder = tmp / "full"
    if _tmpfs(folder, "size=1m"):
        try:
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    import flamingo_edge.export.export as export_module

    def no_space(model, path, **options):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(export_module.onnx, "save_model", no_space)
    yield folder


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    from conftest import convert_openflamingo_fixture

    return convert_openflamingo_fixture("llama", tmp_path_factory.mktemp("converted") / "checkpoint")


@pytest.fixture
def place(tmp_path, demo_export, converted, monkeypatch) -> Place:
    monkeypatch.setenv("FLAMINGO_EDGE_CACHE", str(tmp_path / "cache"))  # `demo` never touches the user's cache
    monkeypatch.delenv("FLAMINGO_EDGE_DEMO_CHECKPOINT", raising=False)
    work = tmp_path / "case"
    work.mkdir()
    return Place(tmp=work, export=demo_export, checkpoint=DEMO_CHECKPOINT, converted=converted)


# -- the table -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cli:
    """`flamingo-edge ARGV` exits 2 with one error line matching `match`."""

    argv: Callable[[Place], list[str]]
    match: str


@dataclass(frozen=True)
class Api:
    """`prepare(place)` makes what the call needs and returns the call, which raises `error` matching `match`."""

    prepare: Callable[[Place], Callable[[], object]]
    error: type[FlamingoEdgeError]
    match: str


def _non_utf8() -> str:
    """What Python makes of the bytes b"caption \\xff\\xfe" on a command line (surrogateescape)."""
    return os.fsdecode(b"caption \xff\xfe")


def _set(path: str, value):
    """A change to a nested JSON object: _set("vision_config.image_size", None)."""
    def change(data: dict) -> None:
        *parents, key = path.split(".")
        for parent in parents:
            data = data[parent]
        data[key] = value
    return change


def _generate(folder: Path, *extra: str) -> list[str]:
    return ["generate", str(folder), "--prompt", "caption:", *extra]


def _opened(place: Place, method: str, prompt: list, **settings) -> Callable[[], object]:
    """A call of Pipeline.<method> on the demo export."""
    def call():
        with Pipeline.open(place.export) as pipeline:
            return list(getattr(pipeline, method)([prompt], **settings))
    return call


def _stream(place: Place, **settings) -> Callable[[], object]:
    """The stream API on a one-image folder, iterated to the end."""
    import cv2

    from flamingo_edge.runtime.sources import open_source
    from flamingo_edge.runtime.stream import FrameStream

    frames = place.tmp / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "a.png"), np.zeros((32, 32, 3), np.uint8))

    def call():
        with Pipeline.open(place.export) as pipeline, FrameStream(
                pipeline, open_source(str(frames)), prompts=["caption:"], **settings) as stream:
            return list(stream)
    return call


def _pickled_checkpoint(place: Place) -> Path:
    """A checkpoint whose weights are a pickle holding a non-tensor object (torch.load(weights_only=True) refuses)."""
    import fractions

    import torch

    folder = place.tmp / "pickled"
    folder.mkdir()
    shutil.copy(place.checkpoint / "config.json", folder)
    torch.save({"a": torch.zeros(1), "b": fractions.Fraction(1, 3)}, folder / "pytorch_model.bin")
    return folder


def _other_weights(place: Place) -> Path:
    """The demo checkpoint's config with other weights (their bytes differ; compare refuses before reading them)."""
    folder = place.tmp / "other-weights"
    folder.mkdir()
    shutil.copy(place.checkpoint / "config.json", folder)
    (folder / "model.safetensors").write_bytes(b"not the demo weights")
    return folder


def _converted_without_tokenizer(place: Place) -> Path:
    folder = place.tmp / "converted"
    shutil.copytree(place.converted, folder)
    (folder / "tokenizer.json").unlink()
    return folder


def _engines_folder(place: Place) -> Path:
    folder = place.tmp / "engines"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    return folder


CASES = {
    # config.json of an IDEFICS checkpoint: wrong types, nulls, impossible values
    "idefics hidden_size 'big'": Cli(
        lambda p: ["info", str(p.idefics_config("c", _set("hidden_size", "big")))],
        r"config\.json: hidden_size is 'big', expected a positive integer; fix that value \(or restore"),
    "idefics vision_config.image_size null": Cli(
        lambda p: ["info", str(p.idefics_config("c", _set("vision_config.image_size", None)))],
        r"vision_config\.image_size is null, expected a positive integer; fix that value"),
    "idefics num_hidden_layers -2": Cli(
        lambda p: ["export", str(p.idefics_config("c", _set("num_hidden_layers", -2))), "-o", str(p.tmp / "out")],
        r"num_hidden_layers is -2, expected a positive integer; fix that value"),
    "idefics vision_config a string": Cli(
        lambda p: ["info", str(p.idefics_config("c", _set("vision_config", "clip")))],
        r"vision_config is 'clip', expected a JSON object; fix that value"),
    "idefics hidden_size not a multiple of the heads": Cli(
        lambda p: ["info", str(p.idefics_config("c", _set("num_attention_heads", 3)))],
        r"hidden_size=128 is not a multiple of num_attention_heads=3; .*fix config\.json"),
    "idefics rms_norm_eps a string": Cli(
        lambda p: ["info", str(p.idefics_config("c", _set("rms_norm_eps", "small")))],
        r"rms_norm_eps is 'small', expected a positive number"),
    "idefics config via load_checkpoint": Api(
        lambda p: partial(load_checkpoint, p.idefics_config("c", _set("vocab_size", 40.5))),
        CheckpointError, r"vocab_size is 40\.5, expected a positive integer; fix that value"),
    "idefics config via config_from_hf": Api(
        lambda p: partial(config_from_hf, {**json.loads((p.checkpoint / "config.json").read_text()),
                                           "hidden_size": True}),
        CheckpointError, r"hidden_size is true, expected a positive integer"),
    # config.json in our own converted format
    "converted decoder.width 'big'": Cli(
        lambda p: ["info", str(p.own_config("c", _set("config.decoder.width", "big")))],
        r"not a valid flamingo-edge model config \(decoder\.width is 'big', expected an integer\); fix that value, "
        r"or convert the model again"),
    "converted vision.image_size null": Cli(
        lambda p: ["export", str(p.own_config("c", _set("config.vision.image_size", None))), "-o",
                   str(p.tmp / "out")],
        r"vision\.image_size is null, expected an integer\); fix that value"),
    "converted decoder.layers -2": Cli(
        lambda p: ["info", str(p.own_config("c", _set("config.decoder.layers", -2)))],
        r"decoder\.layers is -2, expected > 0\); fix that value"),
    "converted decoder.norm unknown": Cli(
        lambda p: ["info", str(p.own_config("c", _set("config.decoder.norm", "batch")))],
        r"decoder\.norm is 'batch', expected one of \['rms', 'layer'\]"),
    "converted decoder.act unknown, read by plan": Cli(
        lambda p: ["plan", str(p.own_config("c", _set("config.decoder.act", "swish"))), "--target", "8"],
        r"decoder\.act is 'swish', expected one of \['gelu', 'gelu_tanh', 'quick_gelu', 'relu', 'silu'\]\); fix "
        r"that value, or convert"),
    "converted config missing": Api(
        lambda p: partial(load_config, p.own_config("c", lambda record: record.pop("config"))),
        CheckpointError, r"the config is null, expected a JSON object\); fix that value, or convert"),
    # export.json: wrong types, values this version does not read
    "export.json graphs 'oops'": Cli(
        lambda p: _generate(p.record("e", _set("graphs", "oops"))),
        r"'graphs' is 'oops', expected an object with the graphs .*; re-run flamingo-edge export"),
    "export.json precision int3": Cli(
        lambda p: _generate(p.record("e", _set("precision", "int3"))),
        r"precision is 'int3', expected one of \['fp32', 'fp16', 'int8', 'int4', 'int8-weights'\]; re-run "
        r"flamingo-edge export"),
    "export.json unknown opset": Cli(
        lambda p: ["bench", str(p.record("e", _set("opset", 99)))],
        r"opset is 99, expected one of 13\.\.20; re-run flamingo-edge export"),
    "export.json unknown contract version": Cli(
        lambda p: _generate(p.record("e", _set("contract_version", 7))),
        r"contract_version is 7; this flamingo-edge reads graph contract v2; re-run flamingo-edge export"),
    "export.json of the previous contract (v1: present_* outputs)": Cli(
        lambda p: _generate(p.record("e", _set("contract_version", 1))),
        r"contract_version is 1; this flamingo-edge reads graph contract v2; re-run flamingo-edge export"),
    "export.json config decoder.width 'big'": Cli(
        lambda p: ["eval", str(p.record("e", _set("config.decoder.width", "big")))],
        r"config: decoder\.width is 'big', expected an integer; re-run flamingo-edge export"),
    "export.json is a list": Api(
        lambda p: partial(read_export_record, p.record("e", lambda d: [])),
        ExportError, r"holds a JSON list, not an object; re-run flamingo-edge export"),
    "export.json via Pipeline.open": Api(
        lambda p: partial(Pipeline.open, p.record("e", _set("config.vision.image_size", None))),
        ExportError, r"config: vision\.image_size is null, expected an integer; re-run flamingo-edge export"),
    # text that is not text
    "prompt with bytes that are not UTF-8": Cli(
        lambda p: ["generate", str(p.export), "--prompt", _non_utf8()],
        r"argument --prompt: the value is not valid text: character 8 is the byte 0xff, which is not UTF-8; pass "
        r"UTF-8 text"),
    "stop string with bytes that are not UTF-8": Cli(
        lambda p: _generate(p.export, "--stop", os.fsdecode(b"\xff")),
        r"argument --stop: .*byte 0xff, which is not UTF-8; pass UTF-8 text"),
    "lone surrogate in a prompt (API)": Api(
        lambda p: _opened(p, "complete", ["a\ud800b"]), PromptError,
        r"prompt 0, item 0 is not valid text: character 1 is a lone surrogate U\+D800; pass UTF-8 text"),
    "lone surrogate in Processor (API)": Api(
        lambda p: partial(Processor.from_pretrained(p.export), [["ok", "\udcff"]]), PromptError,
        r"prompt 0, item 1 is not valid text: .*byte 0xff"),
    # counts
    "eval --n 0": Cli(lambda p: ["eval", str(p.export), "--n", "0"],
                      r"argument --n: expected an integer >= 1, got 0"),
    "eval --n -3": Cli(lambda p: ["eval", "demo", "--n", "-3"], r"argument --n: expected an integer >= 1, got -3"),
    "demo --n 0": Cli(lambda p: ["demo", "--n", "0"], r"argument --n: expected an integer >= 1, got 0"),
    "demo --n -2": Cli(lambda p: ["demo", "--n", "-2"], r"argument --n: expected an integer >= 1, got -2"),
    "generate --max-new-tokens -1": Cli(lambda p: _generate(p.export, "--max-new-tokens", "-1"),
                                        r"argument --max-new-tokens: expected an integer >= 1, got -1"),
    "generate --max-new-tokens 1.5": Cli(lambda p: _generate(p.export, "--max-new-tokens", "1.5"),
                                         r"argument --max-new-tokens: expected an integer >= 1, got '1\.5'"),
    "generate --seed -1": Cli(lambda p: _generate(p.export, "--seed", "-1"),
                              r"argument --seed: expected an integer >= 0, got -1"),
    "bench --runs -1": Cli(lambda p: ["bench", str(p.export), "--runs", "-1"],
                           r"argument --runs: expected an integer >= 1, got -1"),
    "calibrate --n 0": Cli(lambda p: ["calibrate", str(p.export), "--images", "demo", "--n", "0", "-o",
                                      str(p.tmp / "calib")], r"argument --n: expected an integer >= 1, got 0"),
    "build --max-context 0": Cli(lambda p: ["build", str(p.export), "-o", str(p.tmp / "e"), "--target", "rtx-sm86",
                                            "--max-context", "0"],
                                 r"argument --max-context: expected an integer >= 1, got 0"),
    "complete(max_new_tokens=0)": Api(lambda p: _opened(p, "complete", ["caption:"], max_new_tokens=0), UsageError,
                                      r"max_new_tokens must be an integer >= 1; got 0"),
    "generate(max_new_tokens='8')": Api(lambda p: _opened(p, "generate", ["caption:"], max_new_tokens="8"), UsageError,
                                        r"max_new_tokens must be an integer >= 1; got '8'"),
    "generate(seed=-1)": Api(lambda p: _opened(p, "generate", ["caption:"], seed=-1), UsageError,
                             r"seed must be an integer >= 0, or None for a fresh seed; got -1"),
    "generate(stop_strings='###')": Api(lambda p: _opened(p, "generate", ["caption:"], stop_strings="###"),
                                        UsageError,
                                        r"stop_strings must be a list of strings, e\.g\. \['###'\]"),
    "Pipeline.open(max_context=0)": Api(lambda p: partial(Pipeline.open, p.export, max_context=0), UsageError,
                                        r"max_context must be an integer >= 1, or None for the model's own limit"),
    "Pipeline.open(image_cache_size=-1)": Api(lambda p: partial(Pipeline.open, p.export, image_cache_size=-1),
                                              UsageError,
                                              r"image_cache_size must be an integer >= 0; got -1"),
    "stream max_new_tokens=0": Api(lambda p: _stream(p, max_new_tokens=0), UsageError,
                                   r"max_new_tokens must be an integer >= 1; got 0"),
    "evaluate(n=0)": Api(lambda p: partial(evaluate, lambda prompts: [], n=0), UsageError,
                         r"n must be an integer >= 1; got 0"),
    # an export from another checkpoint
    "compare: export of another model": Cli(
        lambda p: ["compare", str(p.idefics_config("c", _set("max_position_embeddings", 128))), str(p.export)],
        r"was exported from .*checkpoint, a model unlike .* \(decoder\.max_positions 128 vs 64\); pass that "
        r"checkpoint, or export this one"),
    "compare: export of other weights": Cli(
        lambda p: ["compare", str(_other_weights(p)), str(p.export), "--task-n", "0"],
        r"was exported from .*checkpoint \(weights sha256 [0-9a-f]{16}\), not from the weights of .*other-weights; "
        r"pass that checkpoint"),
    # the wrong kind of folder
    "generate: a missing export": Cli(lambda p: _generate(p.tmp / "nothing"),
                                      r"no such export folder; pass the folder flamingo-edge export wrote"),
    "generate: a checkpoint for an export": Cli(
        lambda p: _generate(p.checkpoint),
        r"is a checkpoint, not an export; export it first \(flamingo-edge export .* -o OUT\) and pass OUT"),
    "generate: an engines folder for an export": Cli(
        lambda p: _generate(_engines_folder(p)),
        r"is an engines folder \(flamingo-edge build\), not an export; pass the export it was built from"),
    "export: an export for a checkpoint": Cli(
        lambda p: ["export", str(p.export), "-o", str(p.tmp / "out")],
        r"is an export, not a checkpoint; pass the checkpoint it was exported from \(.*\)"),
    "info: a missing checkpoint": Cli(lambda p: ["info", str(p.tmp / "nothing")], r"no such checkpoint folder; pass"),
    "export: converted folder without tokenizer.json": Cli(
        lambda p: ["export", str(_converted_without_tokenizer(p)), "-o", str(p.tmp / "out")],
        r"no tokenizer\.json; the runtime needs the fast-tokenizer file: .*convert it again"),
    "export: pickled weights with a Python object": Cli(
        lambda p: ["export", str(_pickled_checkpoint(p)), "-o", str(p.tmp / "out")],
        r"pytorch_model\.bin: not a plain tensor file \(UnpicklingError: Unsupported global: GLOBAL "
        r"fractions\.Fraction was not an allowed global by default\); re-save the checkpoint"),
    "generate: an image that is a folder": Cli(
        lambda p: ["generate", str(p.export), "--prompt", "<image>caption:", "--image", str(p.tmp)],
        r"cannot read image file .*: Is a directory; check the path"),
    # outputs: existing, the checkpoint itself, a file in the way, read-only, full disk
    "export -o an existing folder": Cli(
        lambda p: ["export", "demo", "-o", str(p.tmp)],
        r"already exists; pick another output folder, or replace that export with --overwrite"),
    "export --overwrite a folder that is not an export": Cli(
        lambda p: ["export", "demo", "-o", str(p.idefics_config("c", lambda c: None).parent), "--overwrite"],
        r"is not an export \(no export\.json\) and not empty; --overwrite replaces only an earlier export"),
    "export --overwrite the checkpoint's own folder": Cli(
        lambda p: ["export", "demo", "-o", str(p.checkpoint), "--overwrite"],
        r"is the checkpoint's own folder; an export needs a folder of its own"),
    "export -o a folder that holds the checkpoint": Cli(
        lambda p: ["export", "demo", "-o", str(p.checkpoint.parent), "--overwrite"],
        r"is a folder that holds the checkpoint .*; an export needs a folder of its own"),
    "export -o an existing file": Cli(
        lambda p: ["export", "demo", "-o", str(_file(p, "a-file"))],
        r"a-file is a file, not an export folder; remove it or pick another output folder"),
    "export --overwrite an existing file": Cli(
        lambda p: ["export", "demo", "-o", str(_file(p, "a-file")), "--overwrite"],
        r"a-file is a file, not an export folder; remove it or pick another output folder"),
    "calibrate --images a missing folder": Cli(
        lambda p: ["calibrate", str(p.export), "--images", str(p.tmp / "nothing"), "-o", str(p.tmp / "calib")],
        r"calibration source .*nothing does not exist; pass a folder of images, a video file or `demo`"),
    "convert: a missing language model folder": Cli(
        lambda p: ["convert", "openflamingo", str(p.tmp / "checkpoint.pt"), "--lm", str(p.tmp / "lm"), "--vision",
                   "ViT-L-14", "--cross-attn-every-n-layers", "1", "-o", str(p.tmp / "out")],
        r"the language model folder .*lm does not exist; pass the Hugging Face folder"),
    "generate: a marker without an image": Cli(
        lambda p: ["generate", str(p.export), "--prompt", "<image>caption:"],
        r"the prompt has 1 '<image>' markers but 0 --image were given; put one '<image>' where each image goes"),
    "export -o under an existing file": Cli(
        lambda p: ["export", "demo", "-o", str(_file(p, "a-file") / "out")],
        r"cannot write .*a-file/out: .*a-file is a file, not a folder; pick another path"),
    "export -o a path that is not UTF-8": Cli(
        lambda p: ["export", "demo", "-o", os.fsdecode(os.fsencode(p.tmp) + b"/\xff")],
        r"has bytes that are not UTF-8, and torch's ONNX exporter cannot write to such a path; pick an output folder"),
    "eval: a missing export": Cli(lambda p: ["eval", str(p.tmp / "nothing"), "--n", "1"],
                                  r"no such export folder; pass the folder flamingo-edge export wrote"),
    "export --opset 5": Cli(lambda p: ["export", "demo", "-o", str(p.tmp / "out"), "--opset", "5"],
                            r"opset 5 is not supported; choose 13 to 20"),
    "calibrate -o an existing folder": Cli(
        lambda p: ["calibrate", str(p.export), "--images", "demo", "-o", str(p.tmp)],
        r"already exists; remove it or pick another output folder"),
    "bench --json a folder": Cli(lambda p: ["bench", str(p.export), "--json", str(p.tmp)],
                                 r"is a folder; give a file path to write"),
    "atomic_write into a folder (API)": Api(lambda p: partial(atomic_write, p.tmp, b"x"), UsageError,
        r"is a folder; give a file path to write"),
    "export_all into an existing folder (API)": Api(lambda p: partial(export_all, "demo", p.tmp), UsageError,
        r"already exists; pick another output folder, or replace that export with --overwrite \(overwrite=True\)"),
}


def _file(place: Place, name: str) -> Path:
    (place.tmp / name).write_text("not a folder")
    return place.tmp / name


def _check_cli(argv: list[str], match: str, capsys) -> str:
    """Run the CLI in-process: exit 2, no traceback, the last line of stderr the one error line."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses a flag's value itself (also exit 2)
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith(f"flamingo-edge {argv[0]}: error: "), err
    assert re.search(match, lines[-1]), lines[-1]
    return lines[-1]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, place, capsys):
    case = CASES[name]
    if isinstance(case, Cli):
        argv = case.argv(place)
        before = _listing(place.tmp)
        _check_cli(argv, case.match, capsys)
    else:
        call = case.prepare(place)
        before = _listing(place.tmp)
        with pytest.raises(case.error, match=case.match) as raised:
            call()
        assert "\n" not in str(raised.value)
    assert _listing(place.tmp) == before  # nothing written: no output, no temporary sibling


def test_the_table_is_long_enough():
    assert len(CASES) >= 40
    assert sum(isinstance(case, Cli) for case in CASES.values()) >= 30


# -- outputs that cannot be written ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["export", "quantize", "calibrate"])
def test_read_only_output(command, place, capsys):
    with read_only_folder(place.tmp) as folder:
        out = folder / "out"
        argv = {"export": ["export", "demo", "-o", str(out)],
                "quantize": ["quantize", str(place.export), "--precision", "fp16", "-o", str(out)],
                "calibrate": ["calibrate", str(place.export), "--images", "demo", "--n", "2", "-o", str(out)]}[command]
        _check_cli(argv, r"cannot write .*out: .*; pick an(other)? output path", capsys)
        assert not out.exists()


def test_full_disk_leaves_nothing(place, monkeypatch, capsys):
    with full_disk(place.tmp, monkeypatch) as folder:
        _check_cli(["export", "demo", "-o", str(folder / "out"), "--seed", "0"],
                   r"cannot write .*out: the disk is full \(.*\); nothing was kept; free some space", capsys)
        assert list(folder.iterdir()) == []


# -- third-party noise ----------------------------------------------------------------------------------------------


def test_quantize_keeps_onnxruntime_advice_off_the_terminal(place, capsys, caplog):
    calibration, out = place.tmp / "calib", place.tmp / "int8"
    assert main(["calibrate", str(place.export), "--images", "demo", "--n", "4", "-o", str(calibration)]) == 0
    assert main(["quantize", str(place.export), "--precision", "int8", "--calibration", str(calibration),
                 "--method", "entropy", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    for text in (captured.out, captured.err, warnings):
        assert "pre-processing" not in text and "histogram" not in text


def _run(argv: list[bytes | str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flamingo_edge.cli.main", *argv], capture_output=True, env=env,
                          timeout=600, cwd=ROOT)


def test_real_processes_print_one_line_and_no_traceback(place):
    """Through a real process: bytes on the command line, OpenCV and FFmpeg on a truncated image and video, an
    export of another model; stderr is the one error line."""
    import cv2

    env = {**os.environ, "FLAMINGO_EDGE_CACHE": str(place.tmp.parent / "cache")}
    env.pop("OPENCV_LOG_LEVEL", None), env.pop("OPENCV_FFMPEG_LOGLEVEL", None)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    media = place.tmp.parent / "media"
    media.mkdir()
    cv2.imwrite(str(media / "full.png"), image)
    data = (media / "full.png").read_bytes()
    (media / "cut.png").write_bytes(data[: len(data) // 2])
    writer = cv2.VideoWriter(str(media / "full.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 64))
    for _ in range(20):
        writer.write(image)
    writer.release()
    data = (media / "full.mp4").read_bytes()
    (media / "cut.mp4").write_bytes(data[: len(data) // 2])
    other = place.idefics_config("other", _set("max_position_embeddings", 128))
    cases = [
        ([b"generate", os.fsencode(place.export), b"--prompt", b"caption \xff"], r"not valid text"),
        (["generate", place.export, "--prompt", "<image>caption:", "--image", media / "cut.png"],
         r"is not an image OpenCV can decode"),
        (["calibrate", place.export, "--images", media / "cut.mp4", "--n", "2", "-o", place.tmp / "calib"],
         r"OpenCV cannot open .*cut\.mp4 as a video"),
        (["compare", other, place.export], r"a model unlike"),
        (["export", "demo", "-o", place.tmp], r"already exists"),
    ]
    for argv, match in cases:
        done = _run([a if isinstance(a, bytes) else str(a) for a in argv], env)
        err = done.stderr.decode(errors="replace")
        lines = [line for line in err.splitlines() if line.strip()]
        assert done.returncode == 2, err
        assert "Traceback" not in err and "WARN" not in err and "moov" not in err, err
        assert len(lines) == 1 and re.search(match, lines[0]), err
    assert not (place.tmp / "calib").exists()


# -- exports written before the checkpoint hash was recorded --------------------------------------------------------


def test_an_export_without_a_checkpoint_hash_is_read_and_compared_by_its_config(place):
    from flamingo_edge.tools.compare import check_exported_from

    old = place.tmp / "old-export"
    shutil.copytree(place.export, old)
    data = json.loads((old / "export.json").read_text())
    assert data.pop("checkpoint_sha256")
    (old / "export.json").write_text(json.dumps(data))
    record = read_export_record(old)
    assert record.checkpoint_sha256 is None
    check_exported_from(place.checkpoint, old, record)
    check_exported_from(_other_weights(place), old, record)  # without the hash, only the model config can differ
    with pytest.raises(CheckpointError, match=r"a model unlike .*decoder\.max_positions 128 vs 64"):
        check_exported_from(place.idefics_config("c", _set("max_position_embeddings", 128)), old, record)
