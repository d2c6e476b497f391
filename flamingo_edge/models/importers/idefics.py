"""IDEFICS (transformers' `IdeficsForVisionText2Text`) -> our FlamingoConfig and state dict.

Three things only: `config_from_hf`, the `WEIGHT_MAP` table, and `convert`. Upstream names are those of
transformers 5.x `models/idefics/modeling_idefics.py` (shared/notes/reference-implementations.md, sec. 2.7).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch

from flamingo_edge.config import FlamingoConfig
# config.json -> FlamingoConfig is torch-free, in the foundation (plan and info read it on a base install)
from flamingo_edge.models.tensor_map import map_tensors
from flamingo_edge.idefics_config import MODEL_TYPE, config_from_hf  # noqa: F401

logger = logging.getLogger(__name__)


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
    def upstream(ours: str) -> tuple[str, ...]:
        parts = upstream_names(ours)
        if config.decoder.additional_vocab_size == 0:
            parts = tuple(p for p in parts if p not in ADDITIONAL_VOCAB_TENSORS)
        return parts

    state, skipped = map_tensors(tensors, files, expected, upstream, tied=TIED_TENSORS, fits=_fits,
                                 unused=lambda name: any(p.fullmatch(name) for p in UNUSED_TENSORS))
    if skipped:
        logger.info("%s: skipped %d tensors that IDEFICS never uses: %s", files.get(skipped[0], "checkpoint"),
                    len(skipped), skipped[:4])
    return state
