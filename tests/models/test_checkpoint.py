"""Every way a checkpoint folder can be wrong gives a CheckpointError naming the file and key, and how to fix it."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from flamingo_edge.errors import CheckpointError
from flamingo_edge.models import load_checkpoint, load_config


@pytest.fixture
def checkpoint(tmp_path_factory, idefics_checkpoint):
    """A private copy of a preset checkpoint that the test may damage."""
    folder = tmp_path_factory.mktemp("damaged") / "ckpt"
    shutil.copytree(idefics_checkpoint, folder)
    return folder


def _edit_weights(folder, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_not_an_idefics_checkpoint(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type is 'llama', not 'idefics'.*IDEFICS"):
        load_checkpoint(checkpoint)


def test_folder_without_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(checkpoint)


def test_corrupt_config(checkpoint):
    (checkpoint / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(checkpoint)


def test_no_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights \(\*\.safetensors"):
        load_checkpoint(checkpoint)


def test_corrupt_safetensors(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated copy
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read weights.*corrupt or truncated"):
        load_checkpoint(checkpoint)


def test_missing_tensor(checkpoint):
    _edit_weights(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    expected = re.escape(f"{checkpoint}: missing tensor 'model.layers.1.mlp.up_proj.weight'")
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(checkpoint)


def test_unexpected_tensor(checkpoint):
    _edit_weights(checkpoint, lambda t: t.update({"model.layers.99.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.99\.mlp"):
        load_checkpoint(checkpoint)


def test_shape_mismatch(checkpoint):
    def shrink(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()

    _edit_weights(checkpoint, shrink)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has shape"):
        load_checkpoint(checkpoint)


def test_pickled_weights_load_only_as_plain_tensors(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    torch.save(tensors, checkpoint / "pytorch_model.bin")
    load_checkpoint(checkpoint)  # plain tensors: fine, read with weights_only=True
    torch.save({"weights": tensors, "code": print}, checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a plain tensor file"):
        load_checkpoint(checkpoint)


def test_unused_config_keys_are_logged(checkpoint, caplog):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "my_custom_flag": True}))
    with caplog.at_level(logging.INFO, logger="flamingo_edge"):
        load_config(checkpoint)
    assert "my_custom_flag" in caplog.text and "freeze_text_layers" in caplog.text


def test_unsupported_rope_is_refused(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):
        load_config(checkpoint)


def test_sharded_checkpoint_loads_the_same_weights(tmp_path, idefics_checkpoint):
    transformers = pytest.importorskip("transformers")
    sharded = tmp_path / "sharded"
    model = transformers.IdeficsForVisionText2Text.from_pretrained(idefics_checkpoint)
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    expected = load_checkpoint(idefics_checkpoint).state_dict()
    actual = load_checkpoint(sharded).state_dict()
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    shard = sorted(sharded.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard.name)}: listed in model\.safetensors\.index\.json"):
        load_checkpoint(sharded)
