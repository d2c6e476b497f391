"""Small IDEFICS checkpoints with random weights, built offline with transformers.

They exist so that every stage of the toolkit can be exercised, and checked against transformers, on a machine with
no network: the tests build them, and `samples/random_idefics.py` writes one for users to try the commands on. The
folder is exactly what `IdeficsForVisionText2Text.save_pretrained` + `IdeficsProcessor.save_pretrained` write
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json, processor_config.json).

transformers and pillow are needed here (`pip install -e '.[test]'`); nothing else in the package imports this module.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flamingo_edge.errors import FeatureUnavailableError

# Presets that, together, cover the IDEFICS variants the converter must handle: cross_layer_interval 1 and > 1,
# qk_layer_norms on/off, alpha_type float/vector, resampler on/off with different depths and latent counts,
# additional_vocab_size 0 and > 0, different image and patch sizes, GELU and quick-GELU vision towers.
PRESETS: dict[str, dict[str, Any]] = {
    "a": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        cross_layer_interval=1, qk_layer_norms=False, alpha_type="float", use_resampler=True,
        additional_vocab_size=2,
        vision_config=dict(embed_dim=24, image_size=32, patch_size=8, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=48, hidden_act="gelu"),
        perceiver_config=dict(resampler_n_latents=8, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=8, qk_layer_norms_perceiver=False),
    ),
    "b": dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
        cross_layer_interval=2, qk_layer_norms=True, alpha_type="vector", use_resampler=False,
        additional_vocab_size=0,
        vision_config=dict(embed_dim=16, image_size=28, patch_size=14, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, hidden_act="quick_gelu"),
        perceiver_config=dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8),
    ),
    "c": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=6, num_attention_heads=6,
        cross_layer_interval=3, qk_layer_norms=True, alpha_type="float", use_resampler=True,
        additional_vocab_size=3,
        vision_config=dict(embed_dim=32, image_size=24, patch_size=6, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64, hidden_act="gelu"),
        perceiver_config=dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=4,
                              resampler_head_dim=8, qk_layer_norms_perceiver=True),
    ),
}

# Not used by the tests: a ~115M-parameter model (12-layer 768-wide decoder, 224-px ViT, 64 latents) for benchmarks.
LARGER_PRESETS: dict[str, dict[str, Any]] = {
    "100m": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        cross_layer_interval=4, qk_layer_norms=False, alpha_type="float", use_resampler=True,
        additional_vocab_size=2,
        vision_config=dict(embed_dim=384, image_size=224, patch_size=16, num_hidden_layers=6,
                           num_attention_heads=6, intermediate_size=1536, hidden_act="gelu"),
        perceiver_config=dict(resampler_n_latents=64, resampler_depth=2, resampler_n_heads=6,
                              resampler_head_dim=64),
    ),
}

# Not used by the parity tests or in development: a config the engine builds meet for the first time in CI (wider than
# the others, 256-wide decoder and 192-wide ViT, where TensorRT for RTX was seen to refuse some fp16 graphs).
HELD_OUT_PRESETS: dict[str, dict[str, Any]] = {
    "held-out": dict(
        hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=8,
        cross_layer_interval=2, qk_layer_norms=True, alpha_type="vector", use_resampler=True,
        additional_vocab_size=2,
        vision_config=dict(embed_dim=192, image_size=64, patch_size=16, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=512, hidden_act="quick_gelu"),
        perceiver_config=dict(resampler_n_latents=16, resampler_depth=2, resampler_n_heads=4,
                              resampler_head_dim=32, qk_layer_norms_perceiver=True),
    ),
}

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
# Added after training, in this order, so that the last `additional_vocab_size` ids are IDEFICS' extra vocabulary.
IMAGE_TOKENS = ("<end_of_utterance>", "<fake_token_around_image>", "<image>")

_CORPUS = (
    "User: Describe this image. Assistant: two red circles and a blue square on a white table.",
    "What colour is the square? blue. How many circles are there? two.",
    "A photo of a cat sitting on the grass next to a small dog in the morning light.",
    "The quick brown fox jumps over the lazy dog while the camera records every frame.",
    "Question: what is in the picture? Answer: a green triangle above a yellow star.",
)


def _require_transformers():
    try:
        import transformers  # noqa: F401
        import PIL  # noqa: F401
    except ImportError as error:
        raise FeatureUnavailableError(
            f"building a random IDEFICS checkpoint needs transformers and pillow ({error}); "
            "install them with: pip install -e '.[test]'"
        ) from error


def build_tokenizer(vocab_size: int = 256):
    """A byte-level BPE tokenizer trained offline on a tiny corpus, with IDEFICS' special and image tokens."""
    _require_transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)})
    return fast


def randomize_(model, generator, special=lambda name, noise: None) -> None:
    """Give every parameter O(1)-scale random values so that every path (images, gates) moves the logits: a bias
    0.1 N(0, 1), a vector (norm weights, class embedding) 1 + 0.1 N(0, 1), a matrix N(0, 1 / fan_in).

    `special(name, noise)` is a family's own value for a parameter (None: the rule above); `noise` is the parameter's
    N(0, 1) draw, taken for every parameter in order, so that a family's rule leaves the others' draws as they were.
    """
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            value = special(name, noise)
            if value is None:
                if name.endswith("bias"):
                    value = 0.1 * noise
                elif param.ndim == 1:
                    value = 1.0 + 0.1 * noise
                else:
                    value = noise / math.sqrt(math.prod(param.shape[1:]))
            param.copy_(value)


def _idefics_gates(name: str, noise):
    """transformers initialises the gates `alpha_*` to 0, which would hide the cross-attention (tanh(0) = 0) from any
    comparison (and Linear weights with std 0.02)."""
    return noise if "alpha_" in name else None


def build_random_idefics(preset: str = "a", seed: int = 0):
    """An `IdeficsForVisionText2Text` with random weights and its `IdeficsProcessor` (not saved).

    Args:
        preset: a key of `PRESETS`, `LARGER_PRESETS` or `HELD_OUT_PRESETS`.
        seed: seeds the weights and the tokenizer-independent parts.

    Returns:
        (model, processor), the model in eval mode.
    """
    _require_transformers()
    import torch
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    presets = {**PRESETS, **LARGER_PRESETS, **HELD_OUT_PRESETS}
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(presets)}")
    settings = presets[preset]
    tokenizer = build_tokenizer()
    vocab_size = len(tokenizer) - settings["additional_vocab_size"]
    config = IdeficsConfig(
        vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **settings,
    )
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config).eval()
    randomize_(model, torch.Generator().manual_seed(seed), _idefics_gates)
    image_processor = IdeficsImageProcessorPil(image_size=settings["vision_config"]["image_size"])
    processor = IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def save_random_idefics(out_dir: str | Path, *, preset: str = "a", seed: int = 0) -> Path:
    """Build a random IDEFICS checkpoint and save it as a `save_pretrained` folder.

    Args:
        out_dir: folder to write (created if needed).
        preset: a key of `PRESETS` (or `LARGER_PRESETS`, `HELD_OUT_PRESETS`).
        seed: seeds the random weights.

    Returns:
        The folder.
    """
    out_dir = Path(out_dir)
    model, processor = build_random_idefics(preset, seed)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
