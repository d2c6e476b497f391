"""OpenFlamingo (open_flamingo 2.0.1) -> our FlamingoConfig and state dict.

OpenFlamingo is three upstream parts: an open_clip ViT (`vision_encoder.*`), a Perceiver Resampler (`perceiver.*`),
and a Hugging Face causal LM (`lang_encoder.*`) into which `GatedCrossAttentionBlock`s are hung before decoder layer
i where (i + 1) % N == 0 (N = cross_attn_every_n_layers; open_flamingo src/flamingo_lm.py `init_flamingo`). The
shared modules appear under two names each in `state_dict()` (shared/notes/reference-implementations.md sec. 1.6):
`lang_encoder.gated_cross_attn_layers.K.*` = `lang_encoder.<layers>.K.gated_cross_attn_layer.*` and
`lang_encoder.old_decoder_blocks.K.*` = `lang_encoder.<layers>.K.decoder_layer.*`. `canonical_lm_name` folds both
aliases onto the plain LM names (and `gated_cross_attn_layers.K`), so a released `checkpoint.pt` (wrapped names,
e.g. `lang_encoder.transformer.blocks.1.gated_cross_attn_layer.attn.to_kv.weight`, open_flamingo issue #210), a
whole-model `state_dict()` and the LM's own folder all meet in one namespace.

Upstream constants (src/helpers.py): perceiver and cross-attention use 8 heads of 64 (inner width 512, whatever the
LM width), 4x GELU feed-forwards, LayerNorm (eps 1e-5), bias-free projections and scalar tanh gates.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from flamingo_edge.config_reader import Section, fail as _fail
from flamingo_edge.config import DecoderConfig, FlamingoConfig, ResamplerConfig, VisionConfig
from flamingo_edge.models.importers.language_models import LanguageModel, is_unused, lm_weights

FAMILY = "openflamingo"
HEADS, HEAD_DIM, FF_MULT, NORM_EPS = 8, 64, 4, 1e-5  # open_flamingo src/helpers.py defaults, never overridden

# open_clip model configs (open_clip/model_configs/*.json) of the vision towers OpenFlamingo releases use. Every
# OpenFlamingo release loads "ViT-L-14" with pretrained="openai", which open_clip builds with QuickGELU.
OPEN_CLIP_MODELS: dict[str, dict[str, Any]] = {
    "ViT-L-14": {"embed_dim": 768, "quick_gelu": True,
                 "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}},
    "ViT-B-32": {"embed_dim": 512, "quick_gelu": True,
                 "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}},
    "ViT-B-16": {"embed_dim": 512, "quick_gelu": True,
                 "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16}},
}


# ------------------------------------------------------------------------------------------------------ config


# open_clip vision_cfg keys that change the network and that we do not implement (with the values that are harmless)
_UNSUPPORTED_VISION = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "input_patchnorm": False,
                       "global_average_pool": False, "timm_model_name": None, "hf_model_name": None}


def vision_config(open_clip: Mapping[str, Any], source: str) -> VisionConfig:
    """An open_clip model config ({"embed_dim", "quick_gelu", "vision_cfg": {...}}) -> our VisionConfig (patch
    tokens only, as OpenFlamingo reads them).

    Raises:
        CheckpointError: not a ViT config, or a ViT variant we do not implement.
    """
    cfg = open_clip.get("vision_cfg")
    if not isinstance(cfg, Mapping):
        raise _fail(source, "no \"vision_cfg\" object", "pass an open_clip model config JSON, e.g. ViT-L-14.json")
    for key, harmless in _UNSUPPORTED_VISION.items():
        if cfg.get(key, harmless) not in (harmless, None, False):
            raise _fail(source, f"vision_cfg.{key}={cfg[key]!r} is not supported", "only plain open_clip ViTs are")
    if isinstance(cfg.get("layers"), (list, tuple)):
        raise _fail(source, "vision_cfg.layers is a list (a ResNet tower)", "only ViT towers are supported")
    vision = Section(cfg, source, "open_clip model", "vision_cfg.")
    size, patch = vision.get("image_size", 224, "count"), vision.get("patch_size", 16, "count")
    if size % patch:
        raise _fail(source, f"image_size={size!r}, patch_size={patch!r}",
                    "need a square integer image size that is a multiple of the patch size")
    width, head_width = vision.get("width", 768, "count"), vision.get("head_width", 64, "count")
    if width % head_width:
        raise _fail(source, f"width {width} is not a multiple of head_width {head_width}", "fix the config")
    return VisionConfig(image_size=size, patch_size=patch, width=width, layers=vision.get("layers", 12, "count"),
                        heads=width // head_width,
                        mlp_width=int(width * float(vision.get("mlp_ratio", 4.0, "positive"))),
                        act="quick_gelu" if open_clip.get("quick_gelu") else "gelu", layer_norm_eps=1e-5,
                        output_class_token=False)


def cross_layers(layers: int, every: int) -> tuple[int, ...]:
    """Decoder layers preceded by a gated block: i with (i + 1) % every == 0 (open_flamingo `init_flamingo`)."""
    return tuple(i for i in range(layers) if (i + 1) % every == 0)


def flamingo_config(*, vision: VisionConfig, lm: LanguageModel, lm_config: Mapping[str, Any], lm_source: str,
                    every: int, vocab_size: int, perceiver_depth: int, latents: int,
                    special_tokens: Mapping[str, int | None]) -> FlamingoConfig:
    """The whole model's config from its parts.

    Args:
        vision: from `vision_config`.
        lm, lm_config, lm_source: the LM family, its parsed config.json and where it came from.
        every: cross_attn_every_n_layers.
        vocab_size: rows of the (resized) embedding = len(tokenizer) after OpenFlamingo's tokens were added.
        perceiver_depth, latents: read off the perceiver's tensors.
        special_tokens: bos/eos/pad token ids.
    """
    fields = lm.decoder_fields(lm_config, lm_source)
    layers = fields["layers"]
    if not 1 <= every <= layers:
        raise _fail(lm_source, f"--cross-attn-every-n-layers {every} with {layers} decoder layers",
                    f"pick N in 1..{layers}; the value each OpenFlamingo release uses is in docs/models.md")
    decoder = DecoderConfig(
        vocab_size=vocab_size, additional_vocab_size=0, cross_layers=cross_layers(layers, every), cross_heads=HEADS,
        cross_head_dim=HEAD_DIM, cross_norm="layer", cross_norm_eps=NORM_EPS, cross_mlp="mlp",
        cross_mlp_width=FF_MULT * fields["width"], cross_act="gelu", bos_token_id=special_tokens.get("bos"),
        eos_token_id=special_tokens.get("eos"), pad_token_id=special_tokens.get("pad"), **fields,
    )
    resampler = ResamplerConfig(enabled=True, latents=latents, depth=perceiver_depth, heads=HEADS, head_dim=HEAD_DIM,
                                mlp_width=FF_MULT * vision.width, act="gelu", layer_norm_eps=NORM_EPS)
    return FlamingoConfig(family=FAMILY, vision=vision, resampler=resampler, decoder=decoder)


# ---------------------------------------------------------------------------------------------- checkpoint names


def canonical_lm_name(name: str, layers_path: str) -> str:
    """An LM-side name without OpenFlamingo's aliases: `<layers>.K.decoder_layer.X` and `old_decoder_blocks.K.X` ->
    `<layers>.K.X`; `<layers>.K.gated_cross_attn_layer.X` -> `gated_cross_attn_layers.K.X`; others unchanged."""
    escaped = re.escape(layers_path)
    match = re.fullmatch(rf"(?:{escaped}|old_decoder_blocks)\.(\d+)\.decoder_layer\.(.+)", name) or re.fullmatch(
        r"old_decoder_blocks\.(\d+)\.(.+)", name)
    if match:
        return f"{layers_path}.{match[1]}.{match[2]}"
    match = re.fullmatch(rf"{escaped}\.(\d+)\.gated_cross_attn_layer\.(.+)", name)
    if match:
        return f"gated_cross_attn_layers.{match[1]}.{match[2]}"
    return name


@dataclass
class Parts:
    """A checkpoint's tensors split by part, aliases folded: vision (open_clip names), perceiver, lm (LM names and
    gated_cross_attn_layers.K.*)."""

    vision: dict[str, torch.Tensor]
    perceiver: dict[str, torch.Tensor]
    lm: dict[str, torch.Tensor]


def split_checkpoint(tensors: Mapping[str, torch.Tensor], lm: LanguageModel, source: str) -> Parts:
    """Sort an OpenFlamingo state dict (whole model or trainable parameters only) into its parts.

    Raises:
        CheckpointError: a key outside the three parts, or two aliases of one tensor that differ.
    """
    parts = Parts({}, {}, {})
    seen_as: dict[str, str] = {}
    for name, tensor in tensors.items():
        prefix, _, rest = name.partition(".")
        if prefix == "vision_encoder":
            parts.vision[rest] = tensor
        elif prefix == "perceiver":
            parts.perceiver[rest] = tensor
        elif prefix == "lang_encoder":
            canonical = canonical_lm_name(rest, lm.layers_path)
            if canonical in parts.lm:
                if not torch.equal(parts.lm[canonical], tensor):
                    raise _fail(source, f"{name!r} and {seen_as[canonical]!r} name the same parameter but differ",
                                "the checkpoint is corrupt or was edited; use the file as released")
                continue
            parts.lm[canonical], seen_as[canonical] = tensor, name
        else:
            raise _fail(source, f"key {name!r} belongs to no OpenFlamingo part (vision_encoder, perceiver, "
                        "lang_encoder)", "pass an open_flamingo checkpoint.pt or Flamingo.state_dict()")
    return parts


def open_clip_visual(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The vision tower's tensors from an open_clip file: a whole CLIP state dict (`visual.*` + the text tower,
    which is skipped) or the visual tower's own state dict. HF CLIP files (`vision_model.*`) are renamed too."""
    if any(name.startswith("vision_model.") for name in tensors):
        return _from_hf_clip(tensors, source)
    if any(name.startswith("visual.") for name in tensors):
        return {name[len("visual."):]: t for name, t in tensors.items() if name.startswith("visual.")}
    return dict(tensors)


def _from_hf_clip(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """transformers' CLIPVisionModel names -> open_clip's (q/k/v fused into in_proj like nn.MultiheadAttention)."""
    vt = {name[len("vision_model."):]: t for name, t in tensors.items() if name.startswith("vision_model.")}
    out = {"conv1.weight": vt.pop("embeddings.patch_embedding.weight"),
           "class_embedding": vt.pop("embeddings.class_embedding"),
           "positional_embedding": vt.pop("embeddings.position_embedding.weight")}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = vt.pop(f"{theirs}.{kind}")
    index = 0
    while f"encoder.layers.{index}.layer_norm1.weight" in vt:
        src, dst = f"encoder.layers.{index}.", f"transformer.resblocks.{index}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([vt.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{dst}{ours}.{kind}"] = vt.pop(f"{src}{theirs}.{kind}")
        index += 1
    vt.pop("embeddings.position_ids", None)
    if vt:
        raise _fail(source, f"unexpected CLIP vision tensor {sorted(vt)[0]!r}", "pass an open_clip or HF CLIP file")
    return out


# ------------------------------------------------------------------------------------------------ weight mapping


class _Source:
    """Upstream tensors of one part; tracks which were read so that leftovers can be reported by name."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], source: str, what: str):
        self.tensors, self.source, self.what, self.used = dict(tensors), source, what, set()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise _fail(self.source, f"missing {self.what} tensor {name!r}",
                        "the files are incomplete or belong to another configuration")
        self.used.add(name)
        return self.tensors[name].to(torch.float32)

    def check_all_used(self, fix: Callable[[str], str], skip=lambda name: False) -> None:
        """Every tensor was read, but those `skip` knows the forward never uses; `fix(name)` says what to do.

        Raises:
            CheckpointError: naming the first one left over and how many there are.
        """
        names = sorted(n for n in self.tensors if n not in self.used and not skip(n))
        if names:
            raise _fail(self.source, f"{self.what} tensor {names[0]!r} maps to nothing ({len(names)} such tensors)",
                        fix(names[0]))


def _is_pooled_head(name: str) -> bool:
    """open_clip's pooled-token head (`ln_post`, `proj`): OpenFlamingo takes the patch tokens before it."""
    return name.startswith(("ln_post.", "proj"))


def _vision_weights(src: _Source, config: VisionConfig) -> dict[str, torch.Tensor]:
    out = {"vision.patch_embed.weight": src.get("conv1.weight"), "vision.class_embedding": src.get("class_embedding"),
           "vision.position_embedding": src.get("positional_embedding"),
           "vision.pre_norm.weight": src.get("ln_pre.weight"), "vision.pre_norm.bias": src.get("ln_pre.bias")}
    for i in range(config.layers):
        theirs, ours = f"transformer.resblocks.{i}.", f"vision.blocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v = src.get(f"{theirs}attn.in_proj_{kind}").chunk(3, dim=0)
            out.update({f"{ours}attn.q.{kind}": q, f"{ours}attn.k.{kind}": k, f"{ours}attn.v.{kind}": v})
            for mine, upstream in (("attn.out", "attn.out_proj"), ("norm1", "ln_1"), ("norm2", "ln_2"),
                                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{ours}{mine}.{kind}"] = src.get(f"{theirs}{upstream}.{kind}")
    return out


def vision_state(tensors: Mapping[str, torch.Tensor], config: VisionConfig, source: str) -> dict[str, torch.Tensor]:
    """An open_clip vision tower's tensors (`open_clip_visual`'s output) in our names (`vision.*`).

    Raises:
        CheckpointError: a tensor is missing, or one is left over (other than the pooled head's ln_post/proj).
    """
    src = _Source(tensors, source, "vision")
    state = _vision_weights(src, config)
    src.check_all_used(lambda name: "pass the weights of this ViT", skip=_is_pooled_head)
    return state


def _perceiver_weights(src: _Source, depth: int) -> dict[str, torch.Tensor]:
    out = {"resampler.latents": src.get("latents"), "resampler.norm.weight": src.get("norm.weight"),
           "resampler.norm.bias": src.get("norm.bias")}
    for i in range(depth):
        theirs, ours = f"layers.{i}.", f"resampler.blocks.{i}."
        k, v = src.get(f"{theirs}0.to_kv.weight").chunk(2, dim=0)  # to_kv = [K; V]
        out.update({f"{ours}attn.q.weight": src.get(f"{theirs}0.to_q.weight"), f"{ours}attn.k.weight": k,
                    f"{ours}attn.v.weight": v, f"{ours}attn.out.weight": src.get(f"{theirs}0.to_out.weight"),
                    f"{ours}mlp.fc.weight": src.get(f"{theirs}1.1.weight"),
                    f"{ours}mlp.proj.weight": src.get(f"{theirs}1.3.weight")})
        for kind in ("weight", "bias"):
            out[f"{ours}attn.media_norm.{kind}"] = src.get(f"{theirs}0.norm_media.{kind}")
            out[f"{ours}attn.latents_norm.{kind}"] = src.get(f"{theirs}0.norm_latents.{kind}")
            out[f"{ours}mlp.norm.{kind}"] = src.get(f"{theirs}1.0.{kind}")
    return out


def _cross_weights(src: _Source, layer: int, block: int) -> dict[str, torch.Tensor]:
    theirs, ours = f"gated_cross_attn_layers.{layer}.", f"decoder.cross_blocks.{block}."
    k, v = src.get(f"{theirs}attn.to_kv.weight").chunk(2, dim=0)
    out = {f"{ours}q.weight": src.get(f"{theirs}attn.to_q.weight"), f"{ours}k.weight": k, f"{ours}v.weight": v,
           f"{ours}o.weight": src.get(f"{theirs}attn.to_out.weight"),
           f"{ours}mlp.up.weight": src.get(f"{theirs}ff.1.weight"),
           f"{ours}mlp.down.weight": src.get(f"{theirs}ff.3.weight"),
           f"{ours}attn_gate": src.get(f"{theirs}attn_gate"), f"{ours}mlp_gate": src.get(f"{theirs}ff_gate")}
    for kind in ("weight", "bias"):
        out[f"{ours}attn_norm.{kind}"] = src.get(f"{theirs}attn.norm.{kind}")
        out[f"{ours}mlp_norm.{kind}"] = src.get(f"{theirs}ff.0.{kind}")
    return out


def _lm_and_cross_weights(src: _Source, lm: LanguageModel, config: DecoderConfig,
                          tied: bool) -> dict[str, torch.Tensor]:
    out = lm_weights(src.get, src.has, lm, config, tied=tied, source=src.source)
    for block, layer in enumerate(config.cross_layers):
        out.update(_cross_weights(src, layer, block))
    return out


def convert(parts: Parts, config: FlamingoConfig, lm: LanguageModel, sources: Mapping[str, str],
            expected: Mapping[str, torch.Size], *, tied: bool) -> dict[str, torch.Tensor]:
    """Upstream tensors -> our state dict, every tensor accounted for and every shape checked.

    Args:
        parts: the merged upstream tensors (vision in open_clip names, perceiver, LM + gated layers).
        config: our config.
        lm: the LM family.
        tied: whether the LM head is the input embedding (`LanguageModel.tied` of its config.json).
        sources: part name ("vision", "perceiver", "lm") -> where its tensors came from, for messages.
        expected: our parameter name -> shape, from the model we will load into.

    Raises:
        CheckpointError: a tensor is missing, left over, or of the wrong shape; the message names it.
    """
    check_cross_layers(parts, config, sources["lm"])
    vision = _Source(parts.vision, sources["vision"], "vision")
    perceiver = _Source(parts.perceiver, sources["perceiver"], "perceiver")
    language = _Source(parts.lm, sources["lm"], "language model")
    state = {**_vision_weights(vision, config.vision), **_perceiver_weights(perceiver, config.resampler.depth),
             **_lm_and_cross_weights(language, lm, config.decoder, tied)}
    for src, skip in ((vision, _is_pooled_head), (perceiver, lambda name: False),
                      (language, lambda name: is_unused(lm, name))):
        src.check_all_used(lambda name: _leftover_fix(name, config), skip=skip)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise _fail(sources["lm"], f"no upstream tensor for {missing[0]}", "the checkpoint is incomplete")
    for name, tensor in state.items():
        if name not in expected or tuple(tensor.shape) != tuple(expected[name]):
            want = tuple(expected[name]) if name in expected else "no such parameter"
            raise _fail(sources["lm"], f"{name}: upstream shape {tuple(tensor.shape)}, expected {want}",
                        "the files disagree with the configs (LM config, vision config, N)")
    return {name: tensor.contiguous() for name, tensor in state.items()}


def check_cross_layers(parts: Parts, config: FlamingoConfig, source: str) -> None:
    """The gated blocks the checkpoint has sit where N puts them; if not, name the N that fits.

    Raises:
        CheckpointError: they differ.
    """
    found = sorted({int(m[1]) for n in parts.lm if (m := re.match(r"gated_cross_attn_layers\.(\d+)\.", n))})
    wanted, layers = list(config.decoder.cross_layers), config.decoder.layers
    if found == wanted:
        return
    fits = [n for n in range(1, layers + 1) if list(cross_layers(layers, n)) == found]
    fix = (f"pass --cross-attn-every-n-layers {fits[0]}" if fits else
           "no N places them so: the checkpoint belongs to another language model")
    raise _fail(source, f"the checkpoint has gated cross-attention blocks before decoder layers {found}, but "
                f"--cross-attn-every-n-layers puts them before {wanted}", fix)


def _leftover_fix(name: str, config: FlamingoConfig) -> str:
    match = re.fullmatch(r"gated_cross_attn_layers\.(\d+)\..*", name)
    if match:
        return (f"the checkpoint has a gated block before decoder layer {match[1]}, but N puts them before "
                f"{list(config.decoder.cross_layers)}: pass the --cross-attn-every-n-layers it was trained with")
    return "the checkpoint does not belong to this language model / vision tower, or is of another version"


def perceiver_shape(tensors: Mapping[str, torch.Tensor], source: str) -> tuple[int, int]:
    """(depth, latents) read off the perceiver's tensors."""
    if "latents" not in tensors:
        raise _fail(source, "no perceiver.latents", "pass an OpenFlamingo checkpoint (it holds the perceiver)")
    depth = 1 + max((int(m[1]) for n in tensors if (m := re.match(r"layers\.(\d+)\.", n))), default=-1)
    return depth, int(tensors["latents"].shape[0])
