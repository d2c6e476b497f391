"""`convert_openflamingo`: an OpenFlamingo release (checkpoint + its LM folder + its open_clip tower) -> one
self-contained flamingo-edge checkpoint folder that every command taking a checkpoint accepts.

The folder holds `config.json` ({"model_type": "flamingo_edge", "config": FlamingoConfig, "converted_from": ...}),
`model.safetensors` in our own parameter names, the tokenizer with OpenFlamingo's added tokens, and
`processor_config.json` (open_clip's preprocessing and OpenFlamingo's prompt format). It is written atomically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flamingo_edge import __version__
from flamingo_edge.artifacts import atomic_folder, read_json, sha256_of
from flamingo_edge.errors import CheckpointError, UsageError
from flamingo_edge.config import FlamingoConfig
from flamingo_edge.models.checkpoint import (OWN_MODEL_TYPE, is_state_dict, load_weights, read_tensors,
                                            read_tensors_file)
from flamingo_edge.models.flamingo import FlamingoModel
from flamingo_edge.models.importers import open_flamingo as of
from flamingo_edge.models.importers.language_models import is_unused, language_model
from flamingo_edge.models.importers.openflamingo_processor import write_processor_files

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Converted:
    """What `convert_openflamingo` wrote."""

    folder: Path
    config: FlamingoConfig
    tensors: int
    parameters: int


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an OpenFlamingo checkpoint: safetensors, or a pickle read with `weights_only=True` (a released
    `checkpoint.pt`, or a training checkpoint whose "model_state_dict" holds them); a DDP `module.` prefix is
    dropped (the first upload of OpenFlamingo-3B had one, open_flamingo issue #210).

    Raises:
        CheckpointError: missing, unreadable, not plain tensors, or code in the pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; pass the checkpoint.pt of an OpenFlamingo release")
    data = load_weights(path, resave="load it in open_flamingo and save model.state_dict() with safetensors")
    if isinstance(data, dict) and isinstance(data.get("model_state_dict"), dict):
        data = data["model_state_dict"]
    if not is_state_dict(data):
        raise CheckpointError(f"{path}: holds no state dict of tensors; pass an OpenFlamingo checkpoint.pt")
    return {name.removeprefix("module."): tensor for name, tensor in data.items()}


def read_vision_config(vision: str) -> dict[str, Any]:
    """An open_clip model config: one of `OPEN_CLIP_MODELS` by name, or a JSON file."""
    if vision in of.OPEN_CLIP_MODELS:
        return of.OPEN_CLIP_MODELS[vision]
    path = Path(vision)
    if not path.is_file():
        raise UsageError(f"--vision {vision!r} is neither a known open_clip model ({', '.join(of.OPEN_CLIP_MODELS)}) "
                         "nor a file; pass a name or an open_clip model config JSON")
    return read_json(path)


def _vision_tensors(vision_weights: str | Path | None, parts: of.Parts, checkpoint: Path) -> tuple[dict, str]:
    if vision_weights is not None:
        path = Path(vision_weights)
        return of.open_clip_visual(read_tensors_file(path), str(path)), str(path)
    if not parts.vision:
        raise UsageError(f"{checkpoint} holds no vision_encoder.* tensors (released checkpoints do not); pass the "
                         "open_clip weights with --vision-weights FILE")
    return parts.vision, str(checkpoint)


def assemble(checkpoint: str | Path, *, lm_dir: str | Path, vision: str, open_clip: Mapping[str, Any],
             vision_weights: str | Path | None, every: int, vocab_size: int,
             special_tokens: Mapping[str, int | None]):
    """Read every input, map it, check it: (config, our state dict). Nothing is written.

    `vision` is what the user named (for messages), `open_clip` its model config (`read_vision_config`)."""
    checkpoint, lm_dir = Path(checkpoint), Path(lm_dir)
    lm_config_path = lm_dir / "config.json"
    lm_hf = read_json(lm_config_path)
    lm = language_model(lm_hf, str(lm_config_path))
    parts = of.split_checkpoint(read_state_dict(checkpoint), lm, str(checkpoint))
    vision_tensors, vision_source = _vision_tensors(vision_weights, parts, checkpoint)
    lm_tensors, _ = read_tensors(lm_dir)
    known = set(lm_tensors) | {lm.embedding, lm.head}  # save_pretrained leaves a tied head out of LM_DIR
    foreign = sorted(n for n in parts.lm if n not in known and not n.startswith("gated_cross_attn_layers.")
                     and not is_unused(lm, n))
    if foreign:
        raise CheckpointError(f"{checkpoint}: lang_encoder.{foreign[0]} is not a tensor of the language model in "
                              f"{lm_dir} ({lm_hf.get('model_type')}; {len(foreign)} such tensors); the checkpoint was "
                              "trained with another language model: pass that one with --lm")
    parts = of.Parts(vision_tensors, parts.perceiver, {**lm_tensors, **parts.lm})  # the checkpoint's tensors win
    depth, latents = of.perceiver_shape(parts.perceiver, str(checkpoint))
    config = of.flamingo_config(vision=of.vision_config(open_clip, vision), lm=lm, lm_config=lm_hf,
                                lm_source=str(lm_config_path), every=every, vocab_size=vocab_size,
                                perceiver_depth=depth, latents=latents, special_tokens=special_tokens)
    with torch.device("meta"):
        expected = {name: p.shape for name, p in FlamingoModel(config=config).state_dict().items()}
    sources = {"vision": vision_source, "perceiver": str(checkpoint), "lm": f"{checkpoint} + {lm_dir}"}
    return config, of.convert(parts, config, lm, sources, expected, tied=lm.tied(lm_hf))


def convert_openflamingo(checkpoint: str | Path, *, lm_dir: str | Path, vision: str,
                         cross_attn_every_n_layers: int, out_dir: str | Path,
                         vision_weights: str | Path | None = None) -> Converted:
    """Convert an OpenFlamingo model into a flamingo-edge checkpoint folder.

    Args:
        checkpoint: open_flamingo's `checkpoint.pt` (or a safetensors state dict): the whole model, or only what
            OpenFlamingo trains (perceiver, gated cross-attention, embeddings) on top of `lm_dir` and the vision
            weights. Either alias of the shared modules is accepted.
        lm_dir: the Hugging Face folder of its language model (LLaMA, MPT / MosaicGPT or GPT-NeoX): config, weights,
            tokenizer.json.
        vision: an open_clip model name (`OPEN_CLIP_MODELS`) or model config JSON.
        cross_attn_every_n_layers: N as the release was trained with (docs/models.md lists them).
        out_dir: the folder to write; it must not exist.
        vision_weights: open_clip (or HF CLIP) weights of the vision tower, when the checkpoint has none.

    Raises:
        CheckpointError: an input is missing, unreadable or inconsistent; the message names file and tensor.
        UsageError: out_dir exists, or a flag is wrong.
    """
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as staging:  # refuses an existing out_dir before any work
        open_clip = read_vision_config(vision)
        size = of.vision_config(open_clip, vision).image_size  # checked before anything is written
        tokens = write_processor_files(lm_dir, staging, image_size=size)  # OpenAI CLIP's mean/std
        config, state = assemble(checkpoint, lm_dir=lm_dir, vision=vision, open_clip=open_clip,
                                 vision_weights=vision_weights, every=cross_attn_every_n_layers,
                                 vocab_size=tokens["vocab_size"], special_tokens=tokens)
        save_file(state, str(staging / WEIGHTS), metadata={"format": "pt", "flamingo_edge": __version__})
        record = {"model_type": OWN_MODEL_TYPE, "flamingo_edge_version": __version__, "config": config.to_dict(),
                  "converted_from": {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_of(checkpoint),
                                     "lm_dir": str(lm_dir), "vision": vision,
                                     "vision_weights": None if vision_weights is None else str(vision_weights),
                                     "cross_attn_every_n_layers": cross_attn_every_n_layers}}
        (staging / "config.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    parameters = sum(t.numel() for t in state.values())
    logger.info("converted %s: %d tensors, %.1fM parameters", out_dir, len(state), parameters / 1e6)
    return Converted(out_dir, config, len(state), parameters)
