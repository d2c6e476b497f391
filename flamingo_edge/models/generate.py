"""Greedy generation with the PyTorch reference model and its KV cache (the reference for the runtime's numbers).

Same rules as transformers' IDEFICS `generate` and as `runtime/generation.py`: new tokens attend to the image mask
of the prompt's last position; finished rows are fed the pad token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flamingo_edge.models.decoder import append_kv
from flamingo_edge.models.flamingo import FlamingoModel


@torch.no_grad()
def greedy_generate(model: FlamingoModel, inputs: dict[str, np.ndarray], *, max_new_tokens: int,
                    stop_token_ids: Sequence[int], pad_token_id: int) -> np.ndarray:
    """Generate greedily from processor outputs.

    Args:
        model: the reference model.
        inputs: `Processor(...)` outputs (numpy): input_ids, attention_mask, pixel_values, image_attention_mask (and
            for a tiled tower aspect_ratio_ids, aspect_ratio_mask).
        max_new_tokens: tokens to generate per row.
        stop_token_ids: tokens that end a row (the processor's `stop_token_ids`: EOS for IDEFICS,
            `<|endofchunk|>` for OpenFlamingo; empty: never).
        pad_token_id: fed to finished rows.

    Returns:
        int64 [B, max_new_tokens], pad after a row's stop token.
    """
    ids, mask, image_mask = (torch.from_numpy(inputs[k]) for k in ("input_ids", "attention_mask",
                                                                   "image_attention_mask"))
    pixels = torch.from_numpy(inputs["pixel_values"])
    batch = ids.shape[0]
    tiles = tuple(torch.from_numpy(inputs[k]) for k in ("aspect_ratio_ids", "aspect_ratio_mask")
                  ) if model.config.tiled else ()
    keys, values = model.rows_cross_kv(pixels, *tiles)
    past_keys, past_values = model.decoder.empty_cache(batch)
    logits, past_keys, past_values = model.decoder(ids, mask, past_keys, past_values, keys, values, image_mask)
    # (a P = 0 prefill: the new K/V are the whole cache)
    new_image_mask = image_mask[:, -1:]
    done = torch.zeros(batch, dtype=torch.bool)
    tokens = []
    for _ in range(max_new_tokens):
        token = torch.where(done, pad_token_id, logits[:, -1].argmax(-1))
        tokens.append(token)
        done |= torch.isin(token, torch.tensor(list(stop_token_ids), dtype=token.dtype))
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits, new_keys, new_values = model.decoder(token[:, None], mask, past_keys, past_values, keys, values,
                                                     new_image_mask)
        past_keys, past_values = append_kv(past_keys, new_keys), append_kv(past_values, new_values)
    out = torch.stack(tokens, dim=1)
    padding = torch.full((batch, max_new_tokens - out.shape[1]), pad_token_id, dtype=out.dtype)
    return torch.cat([out, padding], dim=1).numpy()
