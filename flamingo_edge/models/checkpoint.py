"""Loading a checkpoint folder into our modules: config, tensors, weight mapping, checks.

A checkpoint is a `save_pretrained` folder: `config.json`, weights as `*.safetensors` (one file, or shards listed in
`model.safetensors.index.json`), tokenizer and processor files. Pickled weights (`pytorch_model*.bin`) are read only
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


def load_config(path: str | Path) -> FlamingoConfig:
    """Read a checkpoint folder's config.json into our FlamingoConfig (no weights are read).

    Raises:
        CheckpointError: the folder or its config.json is missing, invalid, or not an IDEFICS config.
    """
    folder = _check_folder(path)
    config_path = folder / "config.json"
    return idefics.config_from_hf(read_json(config_path), source=str(config_path))


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


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: listed in {_INDEX} but missing; copy the complete checkpoint")
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
        for name, tensor in _read_file(path).items():
            tensors[name], files[name] = tensor, str(path)
    return tensors, files


def load_checkpoint(path: str | Path) -> FlamingoModel:
    """Load an IDEFICS `save_pretrained` folder into our FlamingoModel (fp32, eval mode).

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
    state = idefics.convert(tensors, files, config, expected)
    model = FlamingoModel(config=config)
    model.load_state_dict(state, strict=True)
    logger.info("loaded %s: %d tensors from %d file(s)", folder, len(state), len(set(files.values())))
    return model.eval()
