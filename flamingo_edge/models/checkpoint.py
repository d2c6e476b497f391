"""Loading a checkpoint folder into our modules: config, tensors, weight mapping, checks.

A checkpoint is a `save_pretrained` folder: `config.json`, weights as `*.safetensors` (one file, or shards listed in
`model.safetensors.index.json`), tokenizer and processor files. Two kinds are read: an IDEFICS folder
(transformers' names, mapped by `importers/idefics.py`) and a folder written by a converter (`flamingo-edge convert`,
`models/convert.py`): config.json with "model_type": "flamingo_edge" holding our FlamingoConfig, weights in our own
names. Pickled weights (`pytorch_model*.bin`) are read only
when no safetensors exist, and only with `torch.load(weights_only=True)`, which refuses to run code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from flamingo_edge.artifacts import read_json
from flamingo_edge.errors import CheckpointError
from flamingo_edge.models.config import FlamingoConfig
from flamingo_edge.models.flamingo import FlamingoModel
from flamingo_edge.models.importers import idefics

logger = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"


DEMO = "demo"  # wherever a command takes a checkpoint, this word names the bundled demo checkpoint
DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "demo" / "checkpoint"
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


def _check_folder(path: str | Path) -> Path:
    folder = resolve_checkpoint(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such checkpoint folder; pass the folder written by save_pretrained")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: is a file, not a checkpoint folder; pass the folder that contains it")
    return folder


OWN_MODEL_TYPE = "flamingo_edge"  # config.json "model_type" of a converted checkpoint (models/convert.py)
_CHOICES = {"norm": ("rms", "layer"), "positions": ("rope", "alibi"), "mlp": ("swiglu", "mlp"),
            "cross_norm": ("rms", "layer"), "cross_mlp": ("swiglu", "mlp")}


def own_config(data: dict, source: str) -> FlamingoConfig:
    """The FlamingoConfig recorded in a converted checkpoint's config.json.

    Raises:
        CheckpointError: the record is malformed or names a variant this version does not implement.
    """
    try:
        config = FlamingoConfig.from_dict(data["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: not a valid flamingo-edge model config ({type(error).__name__}: {error}); "
                              "it was written by another flamingo-edge version: convert the model again") from None
    for field, allowed in _CHOICES.items():
        if getattr(config.decoder, field) not in allowed:
            raise CheckpointError(f"{source}: decoder.{field}={getattr(config.decoder, field)!r}, expected one of "
                                  f"{allowed}; convert the model again with this flamingo-edge version")
    return config


def is_own_format(folder: Path) -> bool:
    """True for a folder written by a flamingo-edge converter."""
    return read_json(folder / "config.json").get("model_type") == OWN_MODEL_TYPE


def load_config(path: str | Path) -> FlamingoConfig:
    """Read a checkpoint folder's config.json into our FlamingoConfig (no weights are read).

    Raises:
        CheckpointError: the folder or its config.json is missing, invalid, or neither an IDEFICS config nor one
            written by `flamingo-edge convert`.
    """
    folder = _check_folder(path)
    config_path = folder / "config.json"
    data = read_json(config_path)
    if data.get("model_type") == OWN_MODEL_TYPE:
        return own_config(data, str(config_path))
    return idefics.config_from_hf(data, source=str(config_path))


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


def read_tensors_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weights file: safetensors, or a pickle read with `weights_only=True`.

    Raises:
        CheckpointError: missing, corrupt, or not plain tensors.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file; check the path")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(
            f"{path}: cannot read weights ({type(error).__name__}: {error}); the file is corrupt or truncated, "
            "download or copy it again"
        ) from None
    except Exception as error:  # torch.load raises UnpicklingError & co. for anything that is not plain tensors
        raise CheckpointError(
            f"{path}: not a plain tensor file ({type(error).__name__}: {error}); re-save the checkpoint with "
            "save_pretrained(safe_serialization=True)"
        ) from None


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
    """Load an IDEFICS `save_pretrained` folder, or a folder written by `flamingo-edge convert`, into our
    FlamingoModel (fp32, eval mode).

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
    else:
        state = idefics.convert(tensors, files, config, expected)
    model = FlamingoModel(config=config)
    model.load_state_dict(state, strict=True)
    logger.info("loaded %s: %d tensors from %d file(s)", folder, len(state), len(set(files.values())))
    return model.eval()
