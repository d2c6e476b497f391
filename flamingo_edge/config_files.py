"""A checkpoint's `config.json` -> our FlamingoConfig, torch-free, whichever wrote it: transformers' IDEFICS
(`idefics_config`) or Llama 3.2 Vision (`mllama_config`), or `flamingo-edge convert` (its FlamingoConfig record). Its
`model_type` picks the reader. What `load_checkpoint`, `info` and `plan` read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from flamingo_edge import idefics_config, mllama_config
from flamingo_edge.artifacts import read_json
from flamingo_edge.config import FlamingoConfig
from flamingo_edge.config_checks import config_from_record, describe
from flamingo_edge.config_reader import ACTIVATION_NAMES
from flamingo_edge.errors import CheckpointError

OWN_MODEL_TYPE = "flamingo_edge"  # config.json "model_type" of a converted checkpoint (models/convert.py)


def converted_config(data: Mapping, source: str) -> FlamingoConfig:
    """The FlamingoConfig recorded in a converted checkpoint's config.json.

    Raises:
        CheckpointError: the record is malformed (a missing or unknown key, a value of the wrong type or out of
            range) or names an activation this version does not implement.
    """
    config, problems = config_from_record(data.get("config"))
    if config is not None:
        vision_act = config.vision.hidden_act if config.tiled else config.vision.act
        activations = (("vision.act", vision_act), ("resampler.act", config.resampler.act),
                       ("decoder.act", config.decoder.act), ("decoder.cross_act", config.decoder.cross_act or "gelu"))
        problems += [f"{name} is {describe(value)}, expected one of {sorted(ACTIVATION_NAMES)}"
                     for name, value in activations if isinstance(value, str) and value not in ACTIVATION_NAMES]
    if problems:
        raise CheckpointError(f"{source}: not a valid flamingo-edge model config ({'; '.join(problems)}); "
                              "fix that value, or convert the model again with this flamingo-edge version")
    return config


def config_from_json(data: Mapping, source: str) -> FlamingoConfig:
    """The FlamingoConfig of a parsed config.json, read by its model_type's reader (IDEFICS when it names none of
    ours, so that its reader names what is wrong).

    Raises:
        CheckpointError: what the reader finds wrong, naming `source` and the key.
    """
    model_type = data.get("model_type")
    if model_type == OWN_MODEL_TYPE:
        return converted_config(data, source)
    if model_type == mllama_config.MODEL_TYPE:
        return mllama_config.config_from_hf(data, source)
    return idefics_config.config_from_hf(data, source)


def read_config_json(path: str | Path) -> FlamingoConfig:
    """`config_from_json` of the file at `path`.

    Raises:
        CheckpointError: the file is missing or not a JSON object, or what its reader finds wrong.
    """
    return config_from_json(read_json(path), str(path))
