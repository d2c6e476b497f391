"""IDEFICS (transformers' `IdeficsForVisionText2Text`) -> our FlamingoConfig and state dict.

Three things only: `config_from_hf`, the `WEIGHT_MAP` table, and `convert`. Upstream names are those of
transformers 5.x `models/idefics/modeling_idefics.py` (shared/notes/reference-implementations.md, sec. 2.7).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from flamingo_edge.errors import CheckpointError
from flamingo_edge.config import DecoderConfig, FlamingoConfig, ResamplerConfig, VisionConfig
from flamingo_edge.config_checks import config_problems, describe, is_int, is_number
from flamingo_edge.models.layers import ACTIVATIONS

logger = logging.getLogger(__name__)

MODEL_TYPE = "idefics"

# Our parameter name -> the upstream tensor(s) it is made of. `{i}` is a block index, the same on both sides. Two
# upstream tensors are concatenated along dim 0 (IDEFICS' decoupled embedding / LM head: base rows, then the
# additional rows, which exist only when additional_vocab_size > 0).
_VISION = "model.vision_model"
_BLOCK = f"{_VISION}.encoder.layers.{{i}}"
_PERCEIVER = "model.perceiver_resampler"
_XATTN = "model.gated_cross_attn_layers.{i}"
WEIGHT_MAP: dict[str, tuple[str, ...]] = {
    "vision.patch_embed.weight": (f"{_VISION}.embeddings.patch_embedding.weight",),
    "vision.class_embedding": (f"{_VISION}.embeddings.class_embedding",),
    "vision.position_embedding": (f"{_VISION}.embeddings.position_embedding.weight",),
    "vision.pre_norm.weight": (f"{_VISION}.pre_layrnorm.weight",),
    "vision.pre_norm.bias": (f"{_VISION}.pre_layrnorm.bias",),
    **{
        f"vision.blocks.{{i}}.attn.{ours}.{kind}": (f"{_BLOCK}.self_attn.{theirs}.{kind}",)
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "out_proj"))
        for kind in ("weight", "bias")
    },
    **{
        f"vision.blocks.{{i}}.{ours}.{kind}": (f"{_BLOCK}.{theirs}.{kind}",)
        for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"),
                             ("mlp.fc2", "mlp.fc2"))
        for kind in ("weight", "bias")
    },
    "resampler.latents": (f"{_PERCEIVER}.latents",),
    "resampler.norm.weight": (f"{_PERCEIVER}.layer_norm.weight",),
    "resampler.norm.bias": (f"{_PERCEIVER}.layer_norm.bias",),
    **{
        f"resampler.blocks.{{i}}.attn.{ours}.{kind}": (f"{_PERCEIVER}.blocks.{{i}}.0.{theirs}.{kind}",)
        for ours, theirs in (("media_norm", "context_layer_norm"), ("latents_norm", "latents_layer_norm"),
                             ("q_norm", "q_layer_norm"), ("k_norm", "k_layer_norm"))
        for kind in ("weight", "bias")
    },
    **{
        f"resampler.blocks.{{i}}.attn.{ours}.weight": (f"{_PERCEIVER}.blocks.{{i}}.0.{theirs}.weight",)
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "output_proj"))
    },
    "resampler.blocks.{i}.mlp.norm.weight": (f"{_PERCEIVER}.blocks.{{i}}.1.ln.weight",),
    "resampler.blocks.{i}.mlp.norm.bias": (f"{_PERCEIVER}.blocks.{{i}}.1.ln.bias",),
    "resampler.blocks.{i}.mlp.fc.weight": (f"{_PERCEIVER}.blocks.{{i}}.1.fc.weight",),
    "resampler.blocks.{i}.mlp.proj.weight": (f"{_PERCEIVER}.blocks.{{i}}.1.c_proj.weight",),
    "decoder.embed.weight": ("model.embed_tokens.weight", "model.embed_tokens.additional_embedding.weight"),
    "decoder.lm_head.weight": ("lm_head.weight", "lm_head.additional_fc.weight"),
    "decoder.norm.weight": ("model.norm.weight",),
    **{
        f"decoder.layers.{{i}}.attn.{proj}.weight": (f"model.layers.{{i}}.self_attn.{proj}_proj.weight",)
        for proj in "qkvo"
    },
    **{
        f"decoder.layers.{{i}}.mlp.{proj}.weight": (f"model.layers.{{i}}.mlp.{proj}_proj.weight",)
        for proj in ("gate", "up", "down")
    },
    "decoder.layers.{i}.attn_norm.weight": ("model.layers.{i}.input_layernorm.weight",),
    "decoder.layers.{i}.mlp_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight",),
    **{f"decoder.cross_blocks.{{i}}.{proj}.weight": (f"{_XATTN}.cross_attn.{proj}_proj.weight",) for proj in "qkvo"},
    "decoder.cross_blocks.{i}.q_norm.weight": (f"{_XATTN}.cross_attn.q_layer_norm.weight",),
    "decoder.cross_blocks.{i}.k_norm.weight": (f"{_XATTN}.cross_attn.k_layer_norm.weight",),
    **{
        f"decoder.cross_blocks.{{i}}.mlp.{proj}.weight": (f"{_XATTN}.mlp.{proj}_proj.weight",)
        for proj in ("gate", "up", "down")
    },
    "decoder.cross_blocks.{i}.attn_norm.weight": (f"{_XATTN}.input_layernorm.weight",),
    "decoder.cross_blocks.{i}.mlp_norm.weight": (f"{_XATTN}.post_attention_layernorm.weight",),
    "decoder.cross_blocks.{i}.attn_gate": (f"{_XATTN}.alpha_cross_attn",),
    "decoder.cross_blocks.{i}.mlp_gate": (f"{_XATTN}.alpha_dense",),
}

# Upstream tensors that exist only when the config has extra vocabulary.
ADDITIONAL_VOCAB_TENSORS = ("model.embed_tokens.additional_embedding.weight", "lm_head.additional_fc.weight")
# With tie_word_embeddings the LM head is the embedding, and save_pretrained may omit it.
TIED_TENSORS = {
    "lm_head.weight": "model.embed_tokens.weight",
    "lm_head.additional_fc.weight": "model.embed_tokens.additional_embedding.weight",
}
# Upstream tensors that IDEFICS' forward never uses: known, skipped, logged.
UNUSED_TENSORS = (
    re.compile(rf"{re.escape(_VISION)}\.post_layernorm\.(weight|bias)"),  # applied to the pooled CLS token only
    re.compile(r".*\.rotary_emb\.inv_freq"),  # buffers saved by old transformers versions
    re.compile(rf"{re.escape(_VISION)}\.embeddings\.position_ids"),
)

# Upstream config keys that this importer reads; everything else is logged as ignored.
_USED_KEYS = {
    "model_type", "vocab_size", "additional_vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "hidden_act", "rms_norm_eps", "cross_layer_interval", "qk_layer_norms", "alpha_type",
    "use_resampler", "max_position_embeddings", "rope_parameters", "rope_theta", "rope_scaling", "bos_token_id",
    "eos_token_id", "pad_token_id", "tie_word_embeddings", "vision_config", "perceiver_config",
}
_USED_VISION_KEYS = {
    "embed_dim", "image_size", "patch_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "layer_norm_eps", "num_channels",
}
_USED_PERCEIVER_KEYS = {
    "resampler_n_latents", "resampler_depth", "resampler_n_heads", "resampler_head_dim", "qk_layer_norms_perceiver",
}


def _fail(source: str, what: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{source}: {what}; {fix}")


_REQUIRED = object()  # the default of a key the config must have
_FIX_VALUE = "fix that value in config.json (or restore the file saved with the checkpoint)"
# What a config value must be: a test, and its description for the message.
_KINDS = {
    "count": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "size": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "positive": (lambda v: is_number(v) and v > 0, "a positive number"),
    "flag": (lambda v: v is None or isinstance(v, bool), "true or false"),  # null reads as false, as in transformers
    "token": (lambda v: v is None or (is_int(v) and v >= 0), "a token id (an integer >= 0) or null"),
    "name": (lambda v: isinstance(v, str), "a string"),
}


@dataclass(frozen=True)
class _Section:
    """One object of config.json, read key by key with the type each key must have."""

    data: Mapping
    source: str
    prefix: str = ""  # "vision_config." for a nested object, for messages

    @classmethod
    def nested(cls, hf: Mapping, key: str, source: str) -> _Section:
        value = hf.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise _fail(source, f"{key} is {describe(value)}, expected a JSON object", _FIX_VALUE)
        return cls(value or {}, source, f"{key}.")

    def get(self, key: str, default, kind: str):
        if key not in self.data and default is _REQUIRED:
            raise _fail(self.source, f"required key '{self.prefix}{key}' is missing",
                        "the file is not a complete IDEFICS config")
        value = self.data.get(key, default)
        test, expected = _KINDS[kind]
        if not test(value):
            raise _fail(self.source, f"{self.prefix}{key} is {describe(value)}, expected {expected}", _FIX_VALUE)
        return value


def _rope_theta(hf: _Section) -> float:
    """Only LLaMA's default rope is implemented; scaled variants would silently change every position."""
    rope = _Section.nested(hf.data, "rope_parameters", hf.source)
    scaling = _Section.nested(hf.data, "rope_scaling", hf.source)
    rope_type = rope.data.get("rope_type", scaling.data.get("rope_type", scaling.data.get("type", "default")))
    if rope_type != "default":
        raise _fail(hf.source, f"rope type {rope_type!r} is not supported", "only the default rotary embedding is")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0, "positive"), "positive"))


def _activation(section: _Section, default: str) -> str:
    name = section.get("hidden_act", default, "name")
    if name not in ACTIVATIONS:
        raise _fail(section.source, f"{section.prefix}hidden_act={name!r} is not supported",
                    f"supported: {sorted(ACTIVATIONS)}")
    return name


def _log_ignored(source: str, section: str, data: Mapping, used: set[str]) -> None:
    ignored = sorted(set(data) - used)
    if ignored:
        logger.info("%s: %s keys not used by flamingo-edge (no effect on inference): %s", source, section, ignored)


def _vision_config(vision: _Section) -> VisionConfig:
    width, heads = vision.get("embed_dim", 768, "count"), vision.get("num_attention_heads", 16, "count")
    if width % heads:
        raise _fail(vision.source, f"vision_config.embed_dim={width} is not a multiple of "
                    f"vision_config.num_attention_heads={heads}", "transformers cannot run this config either; "
                    "fix config.json")
    return VisionConfig(
        image_size=vision.get("image_size", 224, "count"), patch_size=vision.get("patch_size", 14, "count"),
        width=width, layers=vision.get("num_hidden_layers", 32, "count"), heads=heads,
        mlp_width=vision.get("intermediate_size", 5120, "count"), act=_activation(vision, "gelu"),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-5, "positive"),
        num_channels=vision.get("num_channels", 3, "count"),
    )


def _resampler_config(hf: _Section, perceiver: _Section, vision_width: int) -> ResamplerConfig:
    return ResamplerConfig(
        enabled=bool(hf.get("use_resampler", False, "flag")),  # the top-level flag is the one IDEFICS reads
        latents=perceiver.get("resampler_n_latents", 64, "count"), depth=perceiver.get("resampler_depth", 6, "count"),
        heads=perceiver.get("resampler_n_heads", 16, "count"),
        head_dim=perceiver.get("resampler_head_dim", 96, "count"), mlp_width=4 * vision_width, act="relu",
        qk_layer_norms=bool(perceiver.get("qk_layer_norms_perceiver", False, "flag")),
    )


def _decoder_config(hf: _Section) -> DecoderConfig:
    layers, interval = hf.get("num_hidden_layers", _REQUIRED, "count"), hf.get("cross_layer_interval", 1, "count")
    if layers % interval:
        raise _fail(hf.source, f"num_hidden_layers={layers} is not a multiple of cross_layer_interval={interval}",
                    "transformers cannot run this config either; fix config.json")
    width, heads = hf.get("hidden_size", _REQUIRED, "count"), hf.get("num_attention_heads", _REQUIRED, "count")
    if width % heads:
        raise _fail(hf.source, f"hidden_size={width} is not a multiple of num_attention_heads={heads}",
                    "transformers cannot run this config either; fix config.json")
    alpha_type = hf.data.get("alpha_type", "float")
    if alpha_type not in ("float", "vector"):
        raise _fail(hf.source, f"alpha_type={alpha_type!r}", "expected 'float' or 'vector'")
    return DecoderConfig(
        vocab_size=hf.get("vocab_size", _REQUIRED, "count"),
        additional_vocab_size=hf.get("additional_vocab_size", 0, "size"),
        width=width, layers=layers, heads=heads, mlp_width=hf.get("intermediate_size", _REQUIRED, "count"),
        cross_layers=tuple(range(0, layers, interval)), cross_heads=heads, cross_head_dim=width // heads,
        cross_qk_norms=bool(hf.get("qk_layer_norms", False, "flag")), vector_gates=alpha_type == "vector",
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6, "positive"), rope_theta=_rope_theta(hf),
        max_positions=hf.get("max_position_embeddings", 2048, "count"), act=_activation(hf, "silu"),
        bos_token_id=hf.get("bos_token_id", None, "token"), eos_token_id=hf.get("eos_token_id", None, "token"),
        pad_token_id=hf.get("pad_token_id", None, "token"),
    )


def config_from_hf(hf: Mapping, source: str = "config.json") -> FlamingoConfig:
    """Map an IDEFICS `config.json` (as a dict) to our FlamingoConfig.

    Args:
        hf: the parsed config.json.
        source: the file it came from, for messages.

    Raises:
        CheckpointError: the config is not IDEFICS, uses a variant we do not implement, or has a value of the wrong
            type (a string or null where a size goes) or out of range (a size <= 0); the message names the key.
    """
    if hf.get("model_type") != MODEL_TYPE:
        raise _fail(source, f"model_type is {hf.get('model_type')!r}, not 'idefics'",
                    "pass the folder of an IDEFICS checkpoint (IdeficsForVisionText2Text.save_pretrained)")
    top = _Section(hf, source)
    vision, perceiver = _Section.nested(hf, "vision_config", source), _Section.nested(hf, "perceiver_config", source)
    for section, data, used in (("top-level", hf, _USED_KEYS), ("vision_config", vision.data, _USED_VISION_KEYS),
                                ("perceiver_config", perceiver.data, _USED_PERCEIVER_KEYS)):
        _log_ignored(source, section, data, used)
    vision_config = _vision_config(vision)
    config = FlamingoConfig(family=MODEL_TYPE, vision=vision_config,
                            resampler=_resampler_config(top, perceiver, vision_config.width),
                            decoder=_decoder_config(top))
    problems = config_problems(config)
    if problems:  # what the key-by-key reading cannot see, in flamingo-edge's names
        raise _fail(source, "; ".join(problems) + " (flamingo-edge's names for the values read)", _FIX_VALUE)
    return config


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_OUR_PATTERNS = [(_template_regex(ours), theirs) for ours, theirs in WEIGHT_MAP.items()]


def upstream_names(our_name: str) -> tuple[str, ...]:
    """The upstream tensor names our parameter is made of (looked up in WEIGHT_MAP)."""
    for pattern, theirs in _OUR_PATTERNS:
        match = pattern.match(our_name)
        if match:
            index = match.groupdict().get("i")
            return tuple(name.replace("{i}", index) if index is not None else name for name in theirs)
    raise KeyError(f"{our_name} has no entry in WEIGHT_MAP")


def _fits(tensor: torch.Tensor, shape: torch.Size) -> bool:
    """Equal shapes up to size-1 dims (IDEFICS stores vector gates as [1, 1, D], we as [D])."""
    return [d for d in tensor.shape if d != 1] == [d for d in shape if d != 1] and tensor.numel() == shape.numel()


def convert(
    tensors: Mapping[str, torch.Tensor], files: Mapping[str, str], config: FlamingoConfig,
    expected: Mapping[str, torch.Size],
) -> dict[str, torch.Tensor]:
    """Upstream tensors -> our state dict, every name through WEIGHT_MAP, every shape checked.

    Args:
        tensors: upstream name -> tensor, as stored.
        files: upstream name -> the file it was read from (for messages).
        config: our config (from `config_from_hf`).
        expected: our parameter name -> shape, from the model we will load into.

    Raises:
        CheckpointError: a tensor is missing, unexpected, or of the wrong shape; the message names file and key.
    """
    folder = str(Path(next(iter(files.values()))).parent) if files else "checkpoint"
    tied = set()
    needed = {}
    for ours in expected:
        parts = upstream_names(ours)
        if config.decoder.additional_vocab_size == 0:
            parts = tuple(p for p in parts if p not in ADDITIONAL_VOCAB_TENSORS)
        needed[ours] = parts
    state = {}
    for ours, parts in needed.items():
        pieces = []
        for part in parts:
            if part not in tensors and part in TIED_TENSORS and TIED_TENSORS[part] in tensors:
                part = TIED_TENSORS[part]  # tie_word_embeddings: the head is the embedding
                tied.add(part)
            if part not in tensors:
                raise _fail(folder, f"missing tensor {part!r} (needed for {ours})",
                            "the checkpoint is incomplete or was saved from a different config; re-save it with "
                            "save_pretrained")
            pieces.append(tensors[part].to(torch.float32))
        value = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        if not _fits(value, expected[ours]):
            raise _fail(files.get(parts[0], folder), f"tensor {parts[0]!r} has shape {tuple(value.shape)}, "
                        f"expected {tuple(expected[ours])} from config.json",
                        "config.json and the weights disagree; use the config saved with these weights")
        state[ours] = value.reshape(expected[ours])
    used = {part for parts in needed.values() for part in parts} | tied
    unused = [name for name in tensors if name not in used]
    unexpected = [name for name in unused if not any(p.fullmatch(name) for p in UNUSED_TENSORS)]
    if unexpected:
        name = sorted(unexpected)[0]
        raise _fail(files[name], f"unexpected tensor {name!r} ({len(unexpected)} unexpected in all)",
                    "the weights belong to a different architecture or config than config.json describes")
    if unused:
        logger.info("%s: skipped %d tensors that IDEFICS never uses: %s", folder, len(unused), sorted(unused)[:4])
    return state
