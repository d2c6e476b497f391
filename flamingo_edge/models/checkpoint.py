"""Loading a checkpoint folder into our modules: config, tensors, weight mapping, checks.

A checkpoint is a `save_pretrained` folder: `config.json`, weights as `*.safetensors` (one file, or shards listed in
`model.safetensors.index.json`), tokenizer and processor files. Three kinds are read: an IDEFICS folder
(transformers' names, mapped by `importers/idefics.py`), a Llama 3.2 Vision folder (`MllamaForConditionalGeneration`,
`importers/mllama.py`) and a folder written by a converter (`flamingo-edge convert`,
`models/convert.py`): config.json with "model_type": "flamingo_edge" holding our FlamingoConfig, weights in our own
names. Pickled weights (`pytorch_model*.bin`) are read only
when no safetensors exist, and only with `torch.load(weights_only=True)`, which refuses to run code.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

# The word "demo" and its folder are torch-free in artifacts (the runtime resolves them on the base install);
# re-exported here for the loaders and their callers.
from flamingo_edge.artifacts import (DEMO, DEMO_CHECKPOINT, DEMO_OVERRIDE, EXPORT_RECORD, MANIFEST,  # noqa: F401
                                     read_json, resolve_checkpoint)
from flamingo_edge.errors import CheckpointError
from flamingo_edge.config import FlamingoConfig
from flamingo_edge.config_files import OWN_MODEL_TYPE, read_config_json  # noqa: F401  (OWN_MODEL_TYPE: for the converters)
from flamingo_edge.models.flamingo import FlamingoModel
from flamingo_edge.models.importers import idefics, mllama

logger = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"


def _check_folder(path: str | Path) -> Path:
    folder = resolve_checkpoint(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such checkpoint folder; pass the folder written by save_pretrained")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: is a file, not a checkpoint folder; pass the folder that contains it")
    if not (folder / "config.json").is_file():
        _refuse_other_folder(folder)
    return folder


def _refuse_other_folder(folder: Path) -> None:
    """A folder flamingo-edge wrote that is not a checkpoint (an export, engines): say what to pass instead."""
    if (folder / EXPORT_RECORD).is_file():
        try:
            source = read_json(folder / EXPORT_RECORD).get("checkpoint")
        except CheckpointError:
            source = None
        origin = f" ({source})" if isinstance(source, str) else ""
        raise CheckpointError(f"{folder} is an export, not a checkpoint; pass the checkpoint it was exported "
                              f"from{origin}")
    if (folder / MANIFEST).is_file():
        raise CheckpointError(f"{folder} is an engines folder (flamingo-edge build), not a checkpoint; pass the "
                              "checkpoint its export was made from")


def is_own_format(folder: Path) -> bool:
    """True for a folder written by a flamingo-edge converter."""
    return read_json(folder / "config.json").get("model_type") == OWN_MODEL_TYPE


def load_config(path: str | Path) -> FlamingoConfig:
    """Read a checkpoint folder's config.json into our FlamingoConfig (no weights are read).

    Raises:
        CheckpointError: the folder or its config.json is missing, invalid, or neither an IDEFICS nor an mllama
            config nor one written by `flamingo-edge convert`.
    """
    return read_config_json(_check_folder(path) / "config.json")


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint, safetensors first."""
    index = folder / _INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no 'weight_map'; restore it from the original checkpoint")
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(
            f"{folder}: no weights (*.safetensors or pytorch_model*.bin); save the model with save_pretrained"
        )
    return files


def load_weights(path: Path, *, resave: str) -> object:
    """What a weights file holds: safetensors, or a pickle read with `weights_only=True` (never runs its code).

    Args:
        path: the file.
        resave: how to re-save the file when it is not plain tensors (the end of that message).

    Raises:
        CheckpointError: missing, corrupt or truncated, or a pickle holding objects that are not plain tensors.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file; check the path")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as error:
        raise CheckpointError(
            f"{path}: cannot read weights ({type(error).__name__}: {plain_reason(error)}); the file is corrupt or "
            "truncated, download or copy it again"
        ) from None
    except Exception as error:  # torch.load raises UnpicklingError & co. for anything that is not plain tensors
        raise CheckpointError(
            f"{path}: not a plain tensor file ({type(error).__name__}: {plain_reason(error)}); {resave}"
        ) from None


def is_state_dict(data: object) -> bool:
    """A name -> tensor mapping."""
    return isinstance(data, dict) and all(isinstance(t, torch.Tensor) for t in data.values())


def read_tensors_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weights file: safetensors, or a pickle read with `weights_only=True`.

    Raises:
        CheckpointError: missing, corrupt, or not plain tensors.
    """
    resave = "re-save the checkpoint with save_pretrained(safe_serialization=True)"
    tensors = load_weights(path, resave=resave)
    if not is_state_dict(tensors):
        raise CheckpointError(f"{path}: holds a {type(tensors).__name__} that is not a name -> tensor mapping; "
                              f"{resave}")
    return tensors


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colours, which torch puts in its pickle refusal


def plain_reason(error: BaseException) -> str:
    """A library's exception text as one plain line: colours removed and, for torch's refusal of a pickle, only what
    it refused (e.g. "Unsupported global: GLOBAL fractions.Fraction was not an allowed global by default"), not its
    advice to load the file with weights_only=False, which runs the file's code."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    refusal = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    if refusal:
        return refusal[0].removeprefix("WeightsUnpickler error:").strip().split(". ")[0]
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a checkpoint, and the file each came from."""
    tensors, files = {}, {}
    for path in weight_files(folder):
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {_INDEX} but missing; copy the complete checkpoint")
        for name, tensor in read_tensors_file(path).items():
            tensors[name], files[name] = tensor, str(path)
    return tensors, files


def _own_state(tensors: dict[str, torch.Tensor], files: dict[str, str], expected: dict[str, torch.Size],
               folder: Path) -> dict[str, torch.Tensor]:
    """A converted checkpoint's tensors, already in our names: every one expected, present and of its shape."""
    for name in sorted(set(expected) | set(tensors)):
        if name not in tensors:
            raise CheckpointError(f"{folder}: missing tensor {name!r}; the folder is incomplete: convert again")
        if name not in expected:
            raise CheckpointError(f"{files[name]}: unexpected tensor {name!r}; config.json and the weights disagree: "
                                  "convert again")
        if tuple(tensors[name].shape) != tuple(expected[name]):
            raise CheckpointError(f"{files[name]}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected "
                                  f"{tuple(expected[name])} from config.json; convert again")
    return {name: tensor.to(torch.float32) for name, tensor in tensors.items()}


def load_checkpoint(path: str | Path) -> FlamingoModel:
    """Load an IDEFICS or Llama 3.2 Vision (mllama) `save_pretrained` folder, or a folder written by
    `flamingo-edge convert`, into our FlamingoModel (fp32, eval mode).

    Args:
        path: the checkpoint folder.

    Returns:
        The model; `model.config` is its FlamingoConfig.

    Raises:
        CheckpointError: the folder is not an IDEFICS checkpoint, a file is corrupt, or a tensor is missing,
            unexpected or of the wrong shape. The message names the file and the tensor.
    """
    config = load_config(path)
    folder = resolve_checkpoint(path)
    tensors, files = read_tensors(folder)
    with torch.device("meta"):
        expected = {name: p.shape for name, p in FlamingoModel(config=config).state_dict().items()}
    if is_own_format(folder):
        state = _own_state(tensors, files, expected, folder)
    elif config.family == mllama.MODEL_TYPE:
        state = mllama.convert(tensors, files, config, expected)
    else:
        state = idefics.convert(tensors, files, config, expected)
    model = FlamingoModel(config=config)
    model.load_state_dict(state, strict=True)
    logger.info("loaded %s: %d tensors from %d file(s)", folder, len(state), len(set(files.values())))
    return model.eval()
