"""mllama's text model (Llama 3.2 Vision's decoder) as our Decoder's switches, against transformers'
`MllamaForCausalLM`: grouped-query self- and cross-attention, Llama 3.1 RoPE scaling, cross-attention layers that
replace decoder layers (`cross_placement="replace"`: no self-attention K/V there), q/k RMSNorm, tanh gates, and
mllama's rule for rows that may see no image (`cross_empty_rows="attend_all"`). Random weights, non-zero gates,
fresh inputs; the visual tokens are given already projected, one cross-attention slot per tile.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from flamingo_edge.config import DecoderConfig  # noqa: E402
from flamingo_edge.models.decoder import Decoder, append_kv  # noqa: E402
from flamingo_edge.tolerances import LOGITS_REL_TOL  # noqa: E402

VOCAB, WIDTH, LAYERS, CROSS = 97, 64, 5, (1, 3)
TILES, PATCHES = 2, 3  # per image: its visual tokens are TILES slots of PATCHES tokens


def _upstream(rng: torch.Generator):
    config = transformers.MllamaTextConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, cross_attention_layers=list(CROSS), rms_norm_eps=1e-5, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    model = transformers.MllamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():  # O(1) logits, and gates far from their initial 0
            if name.endswith("_gate"):
                p.copy_(torch.rand(p.shape, generator=rng) + 0.5)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=rng) / p.shape[-1] ** 0.5)
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=rng))
    return model.eval()


def _ours(upstream) -> Decoder:
    config = DecoderConfig(
        vocab_size=VOCAB, additional_vocab_size=8, width=WIDTH, layers=LAYERS, heads=4, mlp_width=96,
        cross_layers=CROSS, cross_heads=4, cross_head_dim=WIDTH // 4, cross_qk_norms=True, kv_heads=2,
        cross_kv_heads=2, cross_placement="replace", cross_empty_rows="attend_all", rms_norm_eps=1e-5,
        rope_type="llama3", rope_theta=500000.0, rope_factor=8.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_positions=32, max_positions=256)
    decoder = Decoder(config=config, visual_width=WIDTH)
    theirs = {name.removeprefix("model."): t for name, t in upstream.state_dict().items()}
    state = {"embed.weight": theirs["embed_tokens.weight"], "norm.weight": theirs["norm.weight"],
             # the 8 extra embedding rows have no logits upstream: ours are 0 and left out of the comparison
             "lm_head.weight": torch.cat((theirs["lm_head.weight"], torch.zeros(8, WIDTH)))}
    own = iter(range(LAYERS))  # our self-attention layers, numbered without the cross-attention ones
    for index in range(LAYERS):
        prefix = f"layers.{index}."
        if index in CROSS:
            block = f"cross_blocks.{CROSS.index(index)}."
            state |= {f"{block}{p}.weight": theirs[f"{prefix}cross_attn.{p}_proj.weight"] for p in "qkvo"}
            state |= {f"{block}{p}_norm.weight": theirs[f"{prefix}cross_attn.{p}_norm.weight"] for p in "qk"}
            state |= {f"{block}attn_gate": theirs[f"{prefix}cross_attn_attn_gate"],
                      f"{block}mlp_gate": theirs[f"{prefix}cross_attn_mlp_gate"]}
        else:
            block = f"layers.{next(own)}."
            state |= {f"{block}attn.{p}.weight": theirs[f"{prefix}self_attn.{p}_proj.weight"] for p in "qkvo"}
        state |= {f"{block}{ours}.weight": theirs[f"{prefix}{name}.weight"]
                  for ours, name in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"))}
        state |= {f"{block}mlp.{p}.weight": theirs[f"{prefix}mlp.{p}_proj.weight"] for p in ("gate", "up", "down")}
    decoder.load_state_dict(state, strict=True)
    return decoder.eval()


def _image_mask(rng: np.random.Generator, batch: int, length: int, images: int) -> np.ndarray:
    """A cross-attention mask [B, S, M, T] as mllama's processor makes them: from each image's token on, the rows
    see that image's real tiles (1 or 2 of the TILES), none before the first image token."""
    mask = np.zeros((batch, length, images, TILES), np.int64)
    for row in range(batch):
        starts = sorted(rng.choice(np.arange(2, length - 1), images, replace=False))
        for image, start in enumerate(starts):
            end = starts[image + 1] if image + 1 < images and rng.random() < 0.5 else length
            mask[row, start:end, image, : int(rng.integers(1, TILES + 1))] = 1
    return mask


def test_mllama_text_model_matches_transformers(seed):
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    rng = torch.Generator().manual_seed(seed)
    draw = np.random.default_rng(seed)
    upstream = _upstream(rng)
    ours = _ours(upstream)
    batch, length, images = 2, 12, 2
    ids = torch.randint(3, VOCAB, (batch, length), generator=rng)
    visual = torch.randn(batch, images * TILES * PATCHES, WIDTH, generator=rng)  # projected visual tokens
    tiles = torch.from_numpy(_image_mask(draw, batch, length, images))  # [B, S, M, T]
    assert (tiles.sum((2, 3)) == 0).any(), "no row before the first image"
    mask, rows = _prepare_cross_attention_mask(tiles, num_vision_tokens=PATCHES, dtype=torch.float32)
    with torch.no_grad():
        expected = upstream(input_ids=ids, cross_attention_states=visual, cross_attention_mask=mask,
                            full_text_row_masked_out_mask=rows).logits  # [B, S, V]
        keys, values = zip(*(block.project_visual(visual) for block in ours.cross_blocks))
        image_mask = tiles.reshape(batch, length, images * TILES)  # one slot per tile
        past_keys, past_values = ours.empty_cache(batch)
        assert len(past_keys) == LAYERS - len(CROSS)  # no self-attention K/V in the cross-attention layers
        whole, _, _ = ours(ids, torch.ones(batch, length, dtype=torch.int64), past_keys, past_values,
                           list(keys), list(values), image_mask)
        split = 7  # prefill, then one token at a time from the cache
        logits, new_keys, new_values = ours(ids[:, :split], torch.ones(batch, split, dtype=torch.int64), past_keys,
                                            past_values, list(keys), list(values), image_mask[:, :split])
        stepped = [logits]
        past_keys, past_values = append_kv(past_keys, new_keys), append_kv(past_values, new_values)
        for i in range(split, length):
            logits, new_keys, new_values = ours(ids[:, i:i + 1], torch.ones(batch, i + 1, dtype=torch.int64),
                                                past_keys, past_values, list(keys), list(values),
                                                image_mask[:, i:i + 1])
            stepped.append(logits)
            past_keys, past_values = append_kv(past_keys, new_keys), append_kv(past_values, new_values)
    scale = expected.abs().max().item()
    assert scale > 1.0, "weights too small for a meaningful comparison"
    for got in (whole, torch.cat(stepped, dim=1)):
        assert (got[..., :VOCAB] - expected).abs().max().item() <= LOGITS_REL_TOL * scale, f"seed {seed}"
    # the switches matter: IDEFICS' rule for image-less rows gives other logits for them
    ours.cross_blocks[0].empty_rows = ours.cross_blocks[1].empty_rows = "zero"
    with torch.no_grad():
        zeroed, _, _ = ours(ids, torch.ones(batch, length, dtype=torch.int64), *ours.empty_cache(batch),
                            list(keys), list(values), image_mask)
    assert (zeroed[..., :VOCAB] - expected).abs().max().item() > 100 * LOGITS_REL_TOL * scale
