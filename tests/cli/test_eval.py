"""`flamingo-edge eval`: held-out scenes through PyTorch and ONNX Runtime; JSON report; errors exit 2."""

from __future__ import annotations

import json

from flamingo_edge.cli.main import main
from flamingo_edge.demo.evaluate import held_out_prompts, pipeline_answerer, pytorch_answerer


def test_both_backends_give_the_same_answers(idefics_checkpoint, idefics_export):
    prompts = [prompt for _, prompt, _ in held_out_prompts(3, seed=5)]
    assert pytorch_answerer(idefics_checkpoint)(prompts) == pipeline_answerer(idefics_export)(prompts)


def test_eval_json(idefics_export, capsys):
    assert main(["eval", str(idefics_export), "--n", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 4 and 0 <= report["answer_accuracy"] <= 1 and 0 <= report["caption_accuracy"] <= 1


def test_eval_backend_and_folder_mismatch_exit_2(idefics_checkpoint, idefics_export, capsys):
    assert main(["eval", str(idefics_checkpoint), "--backend", "onnxruntime"]) == 2
    assert "is not an export folder (no export.json); export it first" in capsys.readouterr().err
    assert main(["eval", str(idefics_export), "--backend", "pytorch"]) == 2
    assert "is an export; the pytorch backend needs the checkpoint" in capsys.readouterr().err
