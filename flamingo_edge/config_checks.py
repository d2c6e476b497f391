"""Checks of a FlamingoConfig's values: types, ranges and the constraints between fields. Plain Python (no torch).

A config reaches us from files a user may have edited: a converted checkpoint's config.json and an export's
export.json. The dataclasses in `config.py` take any value; these checks turn a wrong type, a null or an impossible
size into one message per problem, before any of it becomes a tensor shape. Callers raise their own typed error
(CheckpointError for a checkpoint, ExportError for an export) with these messages and the fix.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from flamingo_edge.config import DecoderConfig, FlamingoConfig, TiledVisionConfig, VisionConfig

# The choices of the decoder's structural switches (docs/models.md).
DECODER_CHOICES = {"norm": ("rms", "layer"), "positions": ("rope", "alibi"), "mlp": ("swiglu", "mlp"),
                   "cross_norm": ("rms", "layer"), "cross_mlp": ("swiglu", "mlp"), "rope_type": ("default", "llama3"),
                   "cross_placement": ("before", "replace"), "cross_empty_rows": ("zero", "attend_all")}
# Fields that may be 0 (0 means "the default" or "none"); every other int or float field must be > 0.
_ZERO_ALLOWED = {"additional_vocab_size", "rotary_dim", "cross_mlp_width", "cross_norm_eps", "max_frames", "kv_heads",
                 "cross_kv_heads", "input_only_vocab"}
# A projector in the resampler's place (mllama) has no perceiver: these are 0.
_PERCEIVER_SIZES = {"latents", "depth", "heads", "head_dim", "mlp_width"}
RESAMPLER_KINDS = ("perceiver", "projector")
_TOKEN_IDS = {"bos_token_id", "eos_token_id", "pad_token_id"}


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON true is not a size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def describe(value: Any) -> str:
    """A value as the user wrote it in JSON (null, true, "big"), shortened."""
    text = {None: "null", True: "true", False: "false"}[value] if value is None or isinstance(value, bool) \
        else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_problem(name: str, value: Any, annotation: str) -> str | None:
    """What is wrong with the type of `value` for a field annotated `annotation` (our dataclasses' spelling)."""
    if annotation == "int":
        ok, expected = is_int(value), "an integer"
    elif annotation == "float":
        ok, expected = is_number(value), "a number"
    elif annotation == "bool":
        ok, expected = isinstance(value, bool), "true or false"
    elif annotation == "str":
        ok, expected = isinstance(value, str), "a string"
    elif annotation == "int | None":
        ok, expected = value is None or is_int(value), "an integer or null"
    elif annotation == "tuple[int, ...]":
        ok, expected = isinstance(value, tuple) and all(is_int(v) for v in value), "a list of integers"
    elif annotation == "tuple[tuple[int, int], ...]":
        ok = isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2 and all(is_int(x) and x > 0
                                                                                         for x in v) for v in value)
        expected = "a list of [rows, columns] pairs"
    else:  # a field type this checker does not know: keep the check honest rather than silently pass
        raise TypeError(f"config_checks: no type check for {annotation!r} ({name})")
    return None if ok else f"{name} is {describe(value)}, expected {expected}"


def _field_problems(section: str, part: Any, zero_allowed: frozenset[str] = frozenset()) -> list[str]:
    problems = []
    zero_allowed = _ZERO_ALLOWED | zero_allowed
    for field in fields(part):
        name, value = f"{section}.{field.name}", getattr(part, field.name)
        problem = _type_problem(name, value, field.type)
        if problem:
            problems.append(problem)
        elif field.name in _TOKEN_IDS:
            if value is not None and value < 0:
                problems.append(f"{name} is {value}, expected a token id >= 0 or null")
        elif field.type in ("int", "float"):
            minimum_ok = value >= 0 if field.name in zero_allowed else value > 0
            if not minimum_ok:
                bound = ">= 0" if field.name in zero_allowed else "> 0"
                problems.append(f"{name} is {describe(value)}, expected {bound}")
    return problems


def _decoder_problems(decoder: DecoderConfig) -> list[str]:
    problems = [f"decoder.{name} is {describe(getattr(decoder, name))}, expected one of {list(allowed)}"
                for name, allowed in DECODER_CHOICES.items() if getattr(decoder, name) not in allowed]
    if decoder.width % decoder.heads:
        problems.append(f"decoder.width {decoder.width} is not a multiple of decoder.heads {decoder.heads}")
    layers = list(decoder.cross_layers)
    if layers != sorted(set(layers)) or any(not 0 <= i < decoder.layers for i in layers):
        problems.append(f"decoder.cross_layers {layers} must be increasing indices of decoder layers "
                        f"(0 to {decoder.layers - 1})")
    if decoder.cross_heads % decoder.cross_kv_head_count:
        problems.append(f"decoder.cross_kv_heads {decoder.cross_kv_heads} does not divide decoder.cross_heads "
                        f"{decoder.cross_heads}")
    if decoder.heads % decoder.kv_head_count:
        problems.append(f"decoder.kv_heads {decoder.kv_heads} does not divide decoder.heads {decoder.heads}")
    if decoder.rope_type == "llama3" and decoder.rope_high_freq_factor <= decoder.rope_low_freq_factor:
        problems.append(f"decoder.rope_high_freq_factor {decoder.rope_high_freq_factor} must be larger than "
                        f"decoder.rope_low_freq_factor {decoder.rope_low_freq_factor}")
    if decoder.rotary_dim > decoder.head_dim:
        problems.append(f"decoder.rotary_dim {decoder.rotary_dim} is larger than the head size {decoder.head_dim}")
    return problems


def config_problems(config: FlamingoConfig) -> list[str]:
    """Every problem of `config`, one short sentence each (empty when the config can be built and run).

    Types come first: when a field has the wrong type, the constraints between fields are not checked.
    """
    if not isinstance(config.family, str):
        return [f"family is {describe(config.family)}, expected a string"]
    projector = getattr(config.resampler, "kind", None) == "projector"
    problems = _field_problems("vision", config.vision)
    problems += _field_problems("resampler", config.resampler, frozenset(_PERCEIVER_SIZES if projector else ()))
    problems += _field_problems("decoder", config.decoder)
    if problems:
        return problems
    if config.resampler.kind not in RESAMPLER_KINDS:
        return [f"resampler.kind is {describe(config.resampler.kind)}, expected one of {list(RESAMPLER_KINDS)}"]
    if projector != config.tiled:
        return ["resampler.kind 'projector' goes with a tiled vision tower (mllama) and only with it"]
    vision = config.vision
    problems = _tiled_problems(vision, config.decoder) if config.tiled else _vision_problems(vision)
    return problems + _decoder_problems(config.decoder)


def _vision_problems(vision: VisionConfig) -> list[str]:
    problems = []
    if vision.width % vision.heads:
        problems.append(f"vision.width {vision.width} is not a multiple of vision.heads {vision.heads}")
    if vision.patch_size > vision.image_size:
        problems.append(f"vision.patch_size {vision.patch_size} is larger than vision.image_size "
                        f"{vision.image_size}")
    return problems


def _tiled_problems(vision: TiledVisionConfig, decoder: DecoderConfig) -> list[str]:
    problems = []
    if vision.image_size % vision.patch_size:
        problems.append(f"vision.image_size {vision.image_size} is not a multiple of vision.patch_size "
                        f"{vision.patch_size}")
    if vision.hidden_size % vision.attention_heads:
        problems.append(f"vision.hidden_size {vision.hidden_size} is not a multiple of vision.attention_heads "
                        f"{vision.attention_heads}")
    layers = vision.num_hidden_layers
    if not all(-layers <= i < layers for i in vision.intermediate_layers_indices):
        problems.append(f"vision.intermediate_layers_indices {list(vision.intermediate_layers_indices)} must lie "
                        f"in [-{layers}, {layers}) for {layers} local layers")
    expected = vision.hidden_size * (1 + len(vision.intermediate_layers_indices))
    if vision.vision_output_dim != expected:
        problems.append(f"vision.vision_output_dim is {vision.vision_output_dim}; hidden_size * (1 + "
                        f"len(intermediate_layers_indices)) = {expected}")
    if any(rows * cols > vision.max_num_tiles for rows, cols in vision.supported_aspect_ratios):
        problems.append(f"vision.supported_aspect_ratios {[list(r) for r in vision.supported_aspect_ratios]} has "
                        f"a ratio of more than max_num_tiles {vision.max_num_tiles} tiles")
    if vision.text_hidden_size != decoder.width:
        problems.append(f"vision.text_hidden_size {vision.text_hidden_size} is not decoder.width {decoder.width}")
    return problems


def config_from_record(data: Any) -> tuple[FlamingoConfig | None, list[str]]:
    """A FlamingoConfig from its `to_dict()` form (a converted checkpoint's or an export's record), and the problems
    that stop it from being one (then the config is None)."""
    if not isinstance(data, dict):
        return None, [f"the config is {describe(data)}, expected a JSON object"]
    for section in ("vision", "resampler", "decoder"):
        if not isinstance(data.get(section), dict):
            return None, [f"config.{section} is {describe(data.get(section))}, expected a JSON object"]
    try:
        config = FlamingoConfig.from_dict(data)
    except (KeyError, TypeError) as error:  # a missing or unknown key
        return None, [f"{type(error).__name__}: {error}"]
    return config, config_problems(config)
