"""Small Llama 3.2 Vision (mllama) checkpoints with random weights, built offline with transformers.

Like `random_idefics`, they exist so that every stage can be checked against transformers' own
`MllamaForConditionalGeneration` on a machine with no network. The folder is what `save_pretrained` of the model
and of its `MllamaProcessor` write. The tokenizer is shaped like Llama 3's: `<|begin_of_text|>` added by the
tokenizer's post-processor, `<|image|>` the first id past the text vocabulary (the model's embedding has 8 rows more
than its LM head, the first of them for `<|image|>`).

transformers and pillow are needed here (`pip install -e '.[test]'`); nothing else in the package imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flamingo_edge.models.random_idefics import _CORPUS, _require_transformers, randomize_

SUPPORTED_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]  # max_num_tiles 4

# "tiny": the parity tests (a 28-px tile of 2x2 patches, P = 5 tokens per tile; cross-attention layers at 1 and 3 of
# 5; grouped-query self- and cross-attention; Llama 3.1 RoPE scaling).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vision=dict(hidden_size=32, attention_heads=4, intermediate_size=64, image_size=28, patch_size=14,
                    num_hidden_layers=3, num_global_layers=1, intermediate_layers_indices=[0, 2]),
        text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                  num_key_value_heads=2, cross_attention_layers=[1, 3]),
    ),
}
# Not used by the tests: a ~100M-parameter model for benchmarks (a 14-layer 768-wide text model whose layers 3 and 8
# are cross-attention layers, like the 11B's first two; a 112-px tile of 8x8 patches).
LARGER_PRESETS: dict[str, dict[str, Any]] = {
    "100m": dict(
        vision=dict(hidden_size=384, attention_heads=6, intermediate_size=1536, image_size=112, patch_size=14,
                    num_hidden_layers=4, num_global_layers=2, intermediate_layers_indices=[1, 3]),
        text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12,
                  num_key_value_heads=4, cross_attention_layers=[3, 8]),
    ),
}

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>")
IMAGE_TOKEN = "<|image|>"  # added last: its id is the text vocabulary's size, as in Llama 3.2 Vision


def build_tokenizer(vocab_size: int = 256):
    """A byte-level BPE tokenizer shaped like Llama 3's: the post-processor adds `<|begin_of_text|>`, EOS is
    `<|eot_id|>`, pad `<|finetune_right_pad_id|>`, and `<|image|>` is the last token."""
    _require_transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>", padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def _mllama_rule(generator):
    """Every tanh gate well away from 0 and the tile and position embeddings O(1) (upstream starts the gates at 0,
    which would hide the cross-attention and the tile embeddings from any comparison)."""
    import torch

    def special(name: str, noise):
        if "gate" in name:
            return torch.empty(noise.shape).uniform_(0.3, 1.2, generator=generator)
        if "embedding" in name and "patch" not in name and "embed_tokens" not in name:
            return noise
        return None

    return special


def build_random_mllama(preset: str = "tiny", seed: int = 0):
    """A `MllamaForConditionalGeneration` with random weights and its `MllamaProcessor` (not saved).

    Args:
        preset: a key of `PRESETS` or `LARGER_PRESETS`.
        seed: seeds the weights.

    Returns:
        (model, processor), the model in eval mode.
    """
    _require_transformers()
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    presets = {**PRESETS, **LARGER_PRESETS}
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(presets)}")
    settings = presets[preset]
    tokenizer = build_tokenizer()
    vision = dict(settings["vision"], max_num_tiles=4, supported_aspect_ratios=SUPPORTED_ASPECT_RATIOS)
    vision["vision_output_dim"] = vision["hidden_size"] * (1 + len(vision["intermediate_layers_indices"]))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = dict(settings["text"], vocab_size=image_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5,
                max_position_embeddings=512, tie_word_embeddings=False,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64})
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    randomize_(model, generator, _mllama_rule(generator))
    tile = vision["image_size"]
    image_processor = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def save_random_mllama(out_dir: str | Path, *, preset: str = "tiny", seed: int = 0) -> Path:
    """Build a random mllama checkpoint and save it as a `save_pretrained` folder; returns the folder."""
    out_dir = Path(out_dir)
    model, processor = build_random_mllama(preset, seed)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
