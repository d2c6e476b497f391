"""Llama 3.2 Vision (transformers' `MllamaForConditionalGeneration`) -> our state dict.

The config is read by `flamingo_edge/mllama_config.py` (torch-free). Names are those of a `save_pretrained` folder
(transformers 5.x still writes the hub's names: `vision_model.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.weight`); a state dict taken from a model in memory
(`model.vision_model.*`, `model.language_model.*`, `lm_head.weight`) is read too. The text model's decoder layers
are numbered together with its cross-attention layers upstream; ours number the self-attention layers alone
(`cross_placement="replace"`), and the cross-attention layers are our gated blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from flamingo_edge.config import FlamingoConfig
from flamingo_edge.models.tensor_map import map_tensors
from flamingo_edge.mllama_config import MODEL_TYPE, config_from_hf  # noqa: F401  (re-exported for the loaders)
from flamingo_edge.models.mllama_vision import PROJECTOR_WEIGHT_MAP, VISION_WEIGHT_MAP, upstream_name

logger = logging.getLogger(__name__)

# In-memory names (transformers 5.x module tree) -> the saved names this importer reads.
_IN_MEMORY = (("model.vision_model.", "vision_model."), ("model.multi_modal_projector.", "multi_modal_projector."),
              ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))
_TEXT = "language_model.model."
_PARTS = (("vision.", "vision_model.", VISION_WEIGHT_MAP), ("resampler.", "multi_modal_projector.",
                                                            PROJECTOR_WEIGHT_MAP))
_NORMS = (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"))
_MLP = ("gate", "up", "down")
UNUSED_TENSORS = ("rotary_emb.inv_freq",)  # buffers some saves carry


def saved_name(name: str) -> str:
    """An upstream tensor name in the saved (hub) form."""
    for memory, saved in _IN_MEMORY:
        if name.startswith(memory):
            return saved + name[len(memory):]
    return name


def upstream_names(config: FlamingoConfig) -> dict[str, str]:
    """Our decoder's parameter names -> the saved upstream names (the vision tower and projector go through
    mllama_vision's weight maps)."""
    text = config.decoder
    names = {"decoder.embed.weight": f"{_TEXT}embed_tokens.weight", "decoder.norm.weight": f"{_TEXT}norm.weight",
             "decoder.lm_head.weight": "language_model.lm_head.weight"}
    own = iter(range(text.self_attention_layers))  # our self-attention layers, without the cross-attention ones
    for index in range(text.layers):
        theirs = f"{_TEXT}layers.{index}."
        if index in text.cross_layers:
            ours = f"decoder.cross_blocks.{text.cross_layers.index(index)}."
            names |= {f"{ours}{p}.weight": f"{theirs}cross_attn.{p}_proj.weight" for p in "qkvo"}
            names |= {f"{ours}{p}_norm.weight": f"{theirs}cross_attn.{p}_norm.weight" for p in "qk"}
            names |= {f"{ours}attn_gate": f"{theirs}cross_attn_attn_gate",
                      f"{ours}mlp_gate": f"{theirs}cross_attn_mlp_gate"}
        else:
            ours = f"decoder.layers.{next(own)}."
            names |= {f"{ours}attn.{p}.weight": f"{theirs}self_attn.{p}_proj.weight" for p in "qkvo"}
        names |= {f"{ours}{mine}.weight": f"{theirs}{upstream}.weight" for mine, upstream in _NORMS}
        names |= {f"{ours}mlp.{p}.weight": f"{theirs}mlp.{p}_proj.weight" for p in _MLP}
    return names


def _upstream_name(ours: str, text_names: Mapping[str, str]) -> str:
    for prefix, upstream_prefix, weight_map in _PARTS:
        if ours.startswith(prefix):
            return upstream_prefix + upstream_name(ours[len(prefix):], weight_map)
    return text_names[ours]


def convert(tensors: Mapping[str, torch.Tensor], files: Mapping[str, str], config: FlamingoConfig,
            expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Upstream tensors -> our state dict, every name mapped and every shape checked, none left over.

    Args:
        tensors: upstream name -> tensor, as stored (or a model's state dict).
        files: upstream name -> the file it was read from (for messages).
        config: our config (from `config_from_hf`).
        expected: our parameter name -> shape, from the model we will load into.

    Raises:
        CheckpointError: a tensor is missing, unexpected, or of the wrong shape; the message names file and key.
    """
    stored = {saved_name(name): tensor for name, tensor in tensors.items()}
    where = {saved_name(name): file for name, file in files.items()}
    text_names = upstream_names(config)
    state, _ = map_tensors(stored, where, expected, lambda ours: (_upstream_name(ours, text_names),),
                           unused=lambda name: name.endswith(UNUSED_TENSORS))
    return state
