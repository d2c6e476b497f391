"""OpenFlamingo checkpoints converted by `flamingo-edge convert openflamingo` against the real open_flamingo 2.0.1.

The reference is tests/fixtures/openflamingo/<family>/, written by tests/reference/openflamingo/build.sh in its own
pinned environment (open_flamingo 2.0.1, transformers 4.33.3, open_clip 2.20.0; CI regenerates it): tiny LLaMA, MPT
and GPT-NeoX language models with random O(1) weights and non-zero gates, their logits on prompts with text before
the first image, three interleaved images and <|endofchunk|> inside, a left-padded batch, and `Flamingo.generate`'s
greedy tokens. Both checkpoint forms are converted: the released form (`checkpoint.pt`, trainable parameters only,
on top of the LM folder and the open_clip weights) and the whole `state_dict()` (both aliases of every shared
module).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from flamingo_edge.errors import CheckpointError, UsageError
from flamingo_edge.models.checkpoint import load_checkpoint, load_config
from flamingo_edge.models.convert import convert_openflamingo, read_state_dict
from flamingo_edge.models.generate import greedy_generate
from flamingo_edge.tolerances import LOGITS_REL_TOL

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "openflamingo"
FAMILIES = ("llama", "mpt", "gpt_neox")


def fixture(family: str) -> tuple[Path, dict, dict[str, np.ndarray]]:
    folder = FIXTURES / family
    return folder, json.loads((folder / "cases.json").read_text()), load_file(folder / "tensors.safetensors")


def convert(family: str, out: Path, *, whole: bool = False) -> Path:
    folder, cases, _ = fixture(family)
    if whole:  # the whole model's state_dict(): vision weights included (llama: safetensors; others: a pickle)
        full = next(folder.glob("checkpoint_full.*"))
        return convert_openflamingo(full, lm_dir=folder / "lm",
                                    vision=str(folder / "vision.json"), out_dir=out,
                                    cross_attn_every_n_layers=cases["cross_attn_every_n_layers"]).folder
    return convert_openflamingo(folder / "checkpoint.pt", lm_dir=folder / "lm", vision=str(folder / "vision.json"),
                                vision_weights=folder / "open_clip.safetensors", out_dir=out,
                                cross_attn_every_n_layers=cases["cross_attn_every_n_layers"]).folder


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    return request.param, convert(request.param, tmp_path_factory.mktemp(request.param) / "checkpoint")


def latest_image_mask(input_ids: np.ndarray, image_id: int, images: int) -> np.ndarray:
    """open_flamingo's MaskedCrossAttention rule, from the ids: text_time = cumsum(ids == <image>); token t attends
    image m iff text_time == m + 1 (no image before the first <image>, no reset at <|endofchunk|>)."""
    text_time = np.cumsum(input_ids == image_id, axis=1)  # [B, S]
    return (text_time[..., None] == np.arange(1, images + 1)).astype(np.int64)  # [B, S, M]


def model_inputs(case: dict, tensors: dict, image_id: int) -> dict[str, np.ndarray]:
    name = case["name"]
    ids, mask = tensors[f"{name}/input_ids"], tensors[f"{name}/attention_mask"]
    pixels = tensors[f"{name}/vision_x"][:, :, 0]  # [B, T_img, F=1, 3, H, W] -> [B, M, 3, H, W]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": np.ascontiguousarray(pixels),
            "image_attention_mask": latest_image_mask(ids, image_id, pixels.shape[1])}


def test_config_follows_open_flamingo(converted):
    family, folder = converted
    _, cases, _ = fixture(family)
    config = load_config(folder)
    assert config.family == "openflamingo"
    assert list(config.decoder.cross_layers) == cases["cross_attn_layer_indices"]
    assert config.decoder.total_vocab_size == cases["len_tokenizer"]
    assert config.vision.num_tokens == (config.vision.image_size // config.vision.patch_size) ** 2  # no class token


@pytest.mark.parametrize("case_index", [0, 1, 2])
def test_logits_equal_open_flamingo(converted, case_index):
    family, folder = converted
    _, cases, tensors = fixture(family)
    case = cases["cases"][case_index]
    model = load_checkpoint(folder)
    inputs = model_inputs(case, tensors, cases["special_token_ids"]["<image>"])
    with torch.no_grad():
        ours = model(*(torch.from_numpy(inputs[k]) for k in ("input_ids", "attention_mask", "pixel_values",
                                                            "image_attention_mask"))).numpy()
    for row, real in enumerate(inputs["attention_mask"].astype(bool)):
        # open_flamingo's forward gives a left-padded row positions 0..T-1 (pads counted, generate does not);
        # its padded rows are compared with the same prompt run alone, which the fixture recorded.
        alone = tensors.get(f"{case['name']}/row{row}/logits_alone")
        expected = alone[0] if alone is not None and not real.all() else tensors[f"{case['name']}/logits"][row][real]
        scale = np.abs(expected).max()
        assert scale > 1.0
        error = np.abs(ours[row][real] - expected).max()
        assert error <= LOGITS_REL_TOL * scale, f"{family} {case['name']} row {row}: {error:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("case_index", [0, 1, 2])
def test_greedy_tokens_equal_flamingo_generate(converted, case_index):
    family, folder = converted
    _, cases, tensors = fixture(family)
    case, special = cases["cases"][case_index], cases["special_token_ids"]
    model = load_checkpoint(folder)
    inputs = model_inputs(case, tensors, special["<image>"])
    expected = tensors[f"{case['name']}/generated"]
    ours = greedy_generate(model, inputs, max_new_tokens=expected.shape[1], stop_token_ids=[special["<|endofchunk|>"]],
                           pad_token_id=special["pad"])
    for row, length in enumerate(case["generated_valid_length"]):
        assert ours[row, :length].tolist() == expected[row, :length].tolist(), f"{family} {case['name']} row {row}"


def test_pixels_reach_only_tokens_after_their_image(converted):
    """Not vacuous: other pixels change the logits from the first <image> on, and not before it."""
    family, folder = converted
    _, cases, tensors = fixture(family)
    case = cases["cases"][0]  # text before the first image
    model = load_checkpoint(folder)
    inputs = model_inputs(case, tensors, cases["special_token_ids"]["<image>"])
    first = int(np.argmax(inputs["input_ids"][0] == cases["special_token_ids"]["<image>"]))
    runs = []
    for pixels in (inputs["pixel_values"], np.random.default_rng(0).standard_normal(inputs["pixel_values"].shape)):
        with torch.no_grad():
            runs.append(model(torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"]),
                              torch.from_numpy(pixels.astype(np.float32)),
                              torch.from_numpy(inputs["image_attention_mask"])).numpy())
    assert np.array_equal(runs[0][0, :first], runs[1][0, :first])
    assert np.abs(runs[0][0, first:] - runs[1][0, first:]).max() > 1e-3


def test_whole_state_dict_converts_to_the_same_weights(tmp_path, converted):
    """Whole-model `state_dict()` (vision included, both aliases of each shared module, de-duplicated) and the
    released form (trainable parameters on top of the LM folder and the open_clip weights) give one model."""
    family = converted[0]
    whole = load_file(convert(family, tmp_path / "whole", whole=True) / "model.safetensors")
    released = load_file(converted[1] / "model.safetensors")
    assert whole.keys() == released.keys()
    assert all(np.array_equal(whole[k], released[k]) for k in whole)


def test_both_aliases_are_in_the_whole_state_dict():
    folder, cases, _ = fixture("llama")
    names = read_state_dict(folder / "checkpoint_full.safetensors")
    layer = cases["cross_attn_layer_indices"][0]
    assert f"lang_encoder.gated_cross_attn_layers.{layer}.attn.to_kv.weight" in names
    assert f"lang_encoder.model.layers.{layer}.gated_cross_attn_layer.attn.to_kv.weight" in names
    assert any(n.startswith("lang_encoder.old_decoder_blocks.") for n in names)


# ------------------------------------------------------------------------------------------------------- errors


def _llama_args(tmp_path: Path, **changes) -> dict:
    folder, cases, _ = fixture("llama")
    args = dict(checkpoint=folder / "checkpoint.pt", lm_dir=folder / "lm", vision=str(folder / "vision.json"),
                vision_weights=folder / "open_clip.safetensors", out_dir=tmp_path / "out",
                cross_attn_every_n_layers=cases["cross_attn_every_n_layers"])
    args.update(changes)
    return args


def _run(args: dict):
    checkpoint = args.pop("checkpoint")
    return convert_openflamingo(checkpoint, **args)


def test_wrong_n_names_the_right_one(tmp_path):
    with pytest.raises(CheckpointError, match=r"gated cross-attention blocks before decoder layers \[1, 3\], but "
                                              r"--cross-attn-every-n-layers puts them before \[0, 1, 2, 3\]; pass "
                                              r"--cross-attn-every-n-layers 2"):
        _run(_llama_args(tmp_path, cross_attn_every_n_layers=1))
    assert not (tmp_path / "out").exists()


def test_a_key_that_maps_nowhere_is_named(tmp_path):
    state = read_state_dict(fixture("llama")[0] / "checkpoint.pt")
    state["perceiver.layers.0.0.surprise"] = torch.zeros(3)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"perceiver tensor 'layers\.0\.0\.surprise' maps to nothing"):
        _run(_llama_args(tmp_path, checkpoint=path))
    state.pop("perceiver.layers.0.0.surprise")
    state["lang_encoder.surprise.weight"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"lang_encoder\.surprise\.weight is not a tensor of the language model"):
        _run(_llama_args(tmp_path, checkpoint=path))
    state.pop("lang_encoder.surprise.weight")
    state["text_projection"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"key 'text_projection' belongs to no OpenFlamingo part"):
        _run(_llama_args(tmp_path, checkpoint=path))
    assert not (tmp_path / "out").exists()


def test_differing_aliases_are_refused(tmp_path):
    state = read_state_dict(fixture("llama")[0] / "checkpoint_full.safetensors")
    name = next(n for n in state if n.startswith("lang_encoder.gated_cross_attn_layers.") and n.endswith("to_q.weight"))
    state[name] = state[name] + 1
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"name the same parameter but differ"):
        _run(_llama_args(tmp_path, checkpoint=path, vision_weights=None))


def test_released_checkpoint_without_vision_weights_says_what_to_pass(tmp_path):
    with pytest.raises(UsageError, match=r"holds no vision_encoder\.\* tensors .* --vision-weights FILE"):
        _run(_llama_args(tmp_path, vision_weights=None))


def test_pickles_with_code_and_training_wrappers(tmp_path):
    """weights_only=True refuses objects; a training checkpoint's model_state_dict and a DDP module. prefix are
    unwrapped (the first upload of OpenFlamingo-3B had one, open_flamingo issue #210)."""
    state = read_state_dict(fixture("llama")[0] / "checkpoint.pt")
    wrapped = tmp_path / "train.pt"
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    assert read_state_dict(wrapped).keys() == state.keys()
    evil = tmp_path / "evil.pt"
    torch.save({"perceiver.latents": torch.zeros(2), "hook": Path("x")}, evil)
    with pytest.raises(CheckpointError, match=r"not a plain tensor file"):
        read_state_dict(evil)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((fixture("llama")[0] / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cannot read weights .* corrupt or truncated"):
        read_state_dict(truncated)


def test_lm_of_another_family_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"lang_encoder\.\S+ is not a tensor of the language model in "
                                              r".*gpt_neox/lm \(gpt_neox; \d+ such tensors\); the checkpoint was "
                                              r"trained with another language model"):
        _run(_llama_args(tmp_path, lm_dir=fixture("gpt_neox")[0] / "lm"))
    assert not (tmp_path / "out").exists()


def test_llama_checkpoint_without_head_rows_gets_zero_rows(tmp_path, caplog):
    """open_flamingo's own filter drops an untied `lm_head` (LLaMA), so the released form lacks the head rows of
    the added tokens (open_flamingo initialises them randomly at load): they become zero rows, with a warning; every
    other logit is unchanged."""
    folder, cases, tensors = fixture("llama")
    state = read_state_dict(folder / "checkpoint.pt")
    assert "lang_encoder.lm_head.weight" in cases["checkpoint"]["keys_added_beyond_filter"]
    del state["lang_encoder.lm_head.weight"]
    path = tmp_path / "released.pt"
    torch.save(state, path)
    out = _run(_llama_args(tmp_path, checkpoint=path)).folder
    assert "using zero rows" in caplog.text
    model = load_checkpoint(out)
    base = cases["lm_vocab_size"]
    assert not model.decoder.lm_head.weight[base:].any()
    case = cases["cases"][0]
    inputs = model_inputs(case, tensors, cases["special_token_ids"]["<image>"])
    with torch.no_grad():
        ours = model(*(torch.from_numpy(inputs[k]) for k in ("input_ids", "attention_mask", "pixel_values",
                                                            "image_attention_mask"))).numpy()
    expected = tensors[f"{case['name']}/logits"]
    assert np.abs(ours[..., :base] - expected[..., :base]).max() <= LOGITS_REL_TOL * np.abs(expected).max()


def test_hf_clip_vision_weights_give_clips_patch_tokens(tmp_path, seed):
    """`--vision-weights` may be a transformers CLIP file (e.g. openai/clip-vit-large-patch14/model.safetensors, the
    OpenAI weights every OpenFlamingo release uses): its vision tower, renamed to open_clip's names, gives our vision
    graph the patch tokens of transformers' CLIPVisionModel (last_hidden_state without the class token; no
    post_layernorm, which CLIP applies to the pooled token only)."""
    transformers = pytest.importorskip("transformers")
    from flamingo_edge.models.importers import open_flamingo as of
    from flamingo_edge.models.checkpoint import read_tensors_file
    from flamingo_edge.models.vision import VisionEncoder

    torch.manual_seed(seed)  # the session's seed (FLAMINGO_EDGE_TEST_SEED replays it)
    config = transformers.CLIPConfig(
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14, hidden_act="quick_gelu"),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99), projection_dim=16)
    clip = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in clip.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 10) + (1 if is_norm_scale else 0))
    clip.save_pretrained(tmp_path)
    tensors = of.open_clip_visual(read_tensors_file(tmp_path / "model.safetensors"), "model.safetensors")
    vision = of.vision_config({"quick_gelu": True, "vision_cfg": {"image_size": 56, "patch_size": 14, "width": 64,
                                                                  "layers": 2, "head_width": 16}}, "test")
    state = of.vision_state(tensors, vision, "model.safetensors")
    ours = VisionEncoder(config=vision).eval()
    ours.load_state_dict({name.removeprefix("vision."): t for name, t in state.items()}, strict=True)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
        actual = ours(pixels)
    assert (actual - expected).abs().max().item() <= 1e-5 * expected.abs().max().item(), f"seed {seed}"


def test_released_3b_language_model_names(tmp_path):
    """OpenFlamingo-3B's LM (anas-awadalla/mpt-1b-redpajama-200b) is MosaicGPT: flat attention keys in config.json,
    `ln_1`/`ln_2`/`mlp.mlp_up`/`mlp.mlp_down`/`ln_f` and no `lm_head` (it unembeds with `wte`). The MPT fixture's LM
    saved under those names converts to the same model: logits equal open_flamingo's."""
    import shutil

    from safetensors.torch import load_file as load_torch, save_file

    folder, cases, tensors = fixture("mpt")
    lm = tmp_path / "mpt-1b-like"
    shutil.copytree(folder / "lm", lm)
    hf = json.loads((lm / "config.json").read_text())
    mosaic = {"model_type": "mosaic_gpt", "d_model": hf["d_model"], "n_heads": hf["n_heads"],
              "n_layers": hf["n_layers"], "mlp_ratio": hf["expansion_ratio"], "max_seq_len": hf["max_seq_len"], "vocab_size": hf["vocab_size"],
              "alibi": True, "alibi_bias_max": 8, "attn_qk_ln": False, "attn_clip_qkv": None, "softmax_scale": None,
              "no_bias": True, "low_precision_layernorm": True, "logit_scale": None, "embedding_fraction": 1.0}
    (lm / "config.json").write_text(json.dumps(mosaic))
    rename = {".norm_1.": ".ln_1.", ".norm_2.": ".ln_2.", ".ffn.up_proj.": ".mlp.mlp_up.",
              ".ffn.down_proj.": ".mlp.mlp_down.", "transformer.norm_f.": "transformer.ln_f."}
    weights = {}
    for name, tensor in load_torch(lm / "model.safetensors").items():
        for old, new in rename.items():
            name = name.replace(old, new)
        weights[name] = tensor
    save_file(weights, str(lm / "model.safetensors"))
    out = convert_openflamingo(folder / "checkpoint.pt", lm_dir=lm, vision=str(folder / "vision.json"),
                               vision_weights=folder / "open_clip.safetensors", out_dir=tmp_path / "out",
                               cross_attn_every_n_layers=cases["cross_attn_every_n_layers"]).folder
    case = cases["cases"][0]
    model = load_checkpoint(out)
    inputs = model_inputs(case, tensors, cases["special_token_ids"]["<image>"])
    with torch.no_grad():
        ours = model(*(torch.from_numpy(inputs[k]) for k in ("input_ids", "attention_mask", "pixel_values",
                                                            "image_attention_mask"))).numpy()
    expected = tensors[f"{case['name']}/logits"]
    assert np.abs(ours - expected).max() <= LOGITS_REL_TOL * np.abs(expected).max()


def test_released_4b_checkpoint_buffers_are_skipped(tmp_path):
    """OpenFlamingo-4B's checkpoint.pt carries GPT-NeoX buffers of transformers 4.28 (bool `attention.bias`,
    `attention.masked_bias`, `rotary_emb.inv_freq` under the decoder_layer alias): known, skipped."""
    folder, cases, _ = fixture("gpt_neox")
    state = read_state_dict(folder / "checkpoint.pt")
    for layer in range(4):
        prefix = f"lang_encoder.gpt_neox.layers.{layer}.decoder_layer.attention."
        state[prefix + "bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
        state[prefix + "masked_bias"] = torch.tensor(-1e9)
    path = tmp_path / "released-4b.pt"
    torch.save(state, path)
    out = convert_openflamingo(path, lm_dir=folder / "lm", vision=str(folder / "vision.json"),
                               vision_weights=folder / "open_clip.safetensors", out_dir=tmp_path / "out",
                               cross_attn_every_n_layers=cases["cross_attn_every_n_layers"]).folder
    ours, reference = (load_file(f / "model.safetensors") for f in (out, convert("gpt_neox", tmp_path / "ref")))
    assert ours.keys() == reference.keys() and all(np.array_equal(ours[k], reference[k]) for k in ours)
