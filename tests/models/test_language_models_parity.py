"""The language models OpenFlamingo builds on (LLaMA, MPT, MosaicGPT names, GPT-NeoX), converted by
`importers/language_models.py` into our Decoder, against transformers' own implementations (5.x, this venv).

Random weights at O(1) scale, fresh inputs every run. The decoder runs text-only (no gated blocks), once over the
whole sequence and once as prefill + cached decode steps.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flamingo_edge.config import DecoderConfig  # noqa: E402
from flamingo_edge.models.decoder import Decoder, append_kv  # noqa: E402
from flamingo_edge.models.importers.language_models import language_model, lm_weights  # noqa: E402
from flamingo_edge.tolerances import LOGITS_REL_TOL  # noqa: E402

VOCAB = 97


def _randomize(model: torch.nn.Module, rng: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=rng) / p.shape[-1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=rng))
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=rng))


def _hf_model(kind: str):
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                          num_attention_heads=4, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(config)
    if kind == "llama3":  # Llama 3's text model (mllama's too): grouped-query attention, Llama 3.1's RoPE scaling
        # head_dim 16 with theta 500000: some wavelengths fall in each of the scaling's three bands at 64 positions
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=512,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        return transformers.LlamaForCausalLM(config)
    if kind == "mpt":  # 6 heads: ALiBi's interleaved slopes for a head count that is not a power of two
        config = transformers.MptConfig(vocab_size=VOCAB, d_model=96, n_heads=6, n_layers=3, expansion_ratio=4,
                                        no_bias=True)
        return transformers.MptForCausalLM(config)
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=3,
                                        intermediate_size=128, rotary_pct=0.5, use_parallel_residual=True,
                                        tie_word_embeddings=False)
    return transformers.GPTNeoXForCausalLM(config)


def _ours(hf_config: dict, tensors: dict[str, torch.Tensor]) -> Decoder:
    spec = language_model(hf_config, "config.json")
    fields = spec.decoder_fields(hf_config, "config.json")
    config = DecoderConfig(vocab_size=VOCAB, additional_vocab_size=0, cross_layers=(), cross_heads=1,
                           cross_head_dim=1, **fields)
    used = set()

    def get(name):
        used.add(name)
        return tensors[name].float()

    state = lm_weights(get, tensors.__contains__, spec, config, tied=spec.tied(hf_config), source="test")
    state = {name.removeprefix("decoder."): t for name, t in state.items()}
    decoder = Decoder(config=config, visual_width=8)
    decoder.load_state_dict(state, strict=True)
    return decoder.eval()


def _run(decoder: Decoder, ids: torch.Tensor, split: int | None = None, *, room: int | None = None) -> torch.Tensor:
    """Logits for ids [B, S]; with `split`, prefill `split` tokens then one token at a time from the cache.

    With `room`, the cache is the runtime's static one: every step feeds a whole [B, H, S + room, Dh] buffer whose
    unused slots hold garbage and are masked, and the new K/V are written into it (ALiBi must not count those slots).
    """
    batch, length = ids.shape
    no_image = torch.zeros(batch, 1, 1, dtype=torch.int64)
    past_keys, past_values = decoder.empty_cache(batch)
    steps = [(0, length)] if split is None else [(0, split)] + [(i, i + 1) for i in range(split, length)]
    config = decoder.config
    if room is not None:
        slots = length + room
        buffers = [torch.randn(batch, config.kv_head_count, slots, config.head_dim) * 50
                   for _ in range(2 * config.layers)]
        in_use = torch.zeros(batch, slots, dtype=torch.int64)
    logits = []
    for start, end in steps:
        new = end - start
        if room is None or start == 0:
            mask = torch.ones(batch, end, dtype=torch.int64)
        else:
            past_keys, past_values = buffers[0::2], buffers[1::2]
            mask = torch.cat((in_use, torch.ones(batch, new, dtype=torch.int64)), dim=1)
        out, new_keys, new_values = decoder(ids[:, start:end], mask, past_keys, past_values, [], [],
                                            no_image.expand(batch, new, 1))
        if room is None:
            past_keys, past_values = append_kv(past_keys, new_keys), append_kv(past_values, new_values)
        else:
            for buffer, added in zip(buffers, (t for pair in zip(new_keys, new_values) for t in pair)):
                buffer[:, :, start:end] = added
            in_use[:, start:end] = 1
        logits.append(out)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("kind", ["llama", "llama3", "mpt", "gpt_neox", "mosaic_gpt_names"])
def test_language_model_matches_transformers(kind, tmp_path, seed):
    rng = torch.Generator().manual_seed(seed)  # the session's seed (FLAMINGO_EDGE_TEST_SEED replays it)
    model = _hf_model("mpt" if kind == "mosaic_gpt_names" else kind)
    _randomize(model, rng)
    model.eval()
    model.save_pretrained(tmp_path)
    from flamingo_edge.artifacts import read_json
    from flamingo_edge.models.checkpoint import read_tensors

    hf_config = read_json(tmp_path / "config.json")
    tensors, _ = read_tensors(tmp_path)
    if kind == "mosaic_gpt_names":  # the released OpenFlamingo-3B LM (anas-awadalla/mpt-1b-redpajama-200b) names
        rename = {".norm_1.": ".ln_1.", ".norm_2.": ".ln_2.", ".ffn.up_proj.": ".mlp.mlp_up.",
                  ".ffn.down_proj.": ".mlp.mlp_down.", "transformer.norm_f.": "transformer.ln_f."}
        renamed = {}
        for name, tensor in tensors.items():
            for old, new in rename.items():
                name = name.replace(old, new)
            renamed[name] = tensor
        tensors = {n: t for n, t in renamed.items() if n != "lm_head.weight"}  # MosaicGPT unembeds with wte
        hf_config = {"model_type": "mosaic_gpt", "d_model": hf_config["d_model"], "n_heads": hf_config["n_heads"],
                     "n_layers": hf_config["n_layers"], "mlp_ratio": hf_config["expansion_ratio"],
                     "max_seq_len": 2048, "alibi": True, "alibi_bias_max": 8, "attn_qk_ln": False,
                     "attn_clip_qkv": None, "softmax_scale": None, "no_bias": True}
    ours = _ours(hf_config, tensors)
    ids = torch.randint(0, VOCAB, (2, 11), generator=rng)
    if kind == "llama3":
        assert (ours.config.kv_head_count, ours.config.rope_type) == (2, "llama3")
        ids = torch.randint(0, VOCAB, (2, 40), generator=rng)  # positions past some of the scaled wavelengths
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        whole, stepped, static = _run(ours, ids), _run(ours, ids, split=6), _run(ours, ids, split=6, room=5)
    scale = expected.abs().max().item()
    assert scale > 1.0, "weights too small for a meaningful comparison"
    assert (whole - expected).abs().max().item() <= LOGITS_REL_TOL * scale, f"seed {seed}"
    assert (stepped - expected).abs().max().item() <= LOGITS_REL_TOL * scale, f"seed {seed}"
    assert (static - expected).abs().max().item() <= LOGITS_REL_TOL * scale, f"seed {seed}"
