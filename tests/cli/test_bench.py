"""`flamingo-edge bench`: the report's keys and ratios on the demo checkpoint, and bad input. No test asserts on
time: speed is measured by the command, not judged here."""

from __future__ import annotations

import json
import math

import pytest

from flamingo_edge.cli.main import main
from flamingo_edge.models.checkpoint import DEMO_OVERRIDE
from flamingo_edge.tools.bench import STAGES, make_prompt


@pytest.fixture(autouse=True)
def bundled_demo(monkeypatch, tmp_path):
    monkeypatch.delenv(DEMO_OVERRIDE, raising=False)
    monkeypatch.setenv("FLAMINGO_EDGE_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_bench_with_references_reports_every_stage_and_ratio(tmp_path, capsys):
    pytest.importorskip("transformers")
    path = tmp_path / "bench.json"
    assert main(["bench", "demo", "--reference", "demo", "--runs", "2", "--prompt-tokens", "12", "--new-tokens", "5",
                 "--images", "2", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "vs transformers" in out and "vs PyTorch reference" in out and "decode floor" in out
    report = json.loads(path.read_text())
    ours = report["backend_result"]
    assert ours["prompt_tokens"] == 12 and report["workload"] == {"images": 2, "prompt_tokens": 12,
                                                                  "new_tokens": 5, "runs": 2}
    assert set(ours["stages_s"]) == set(STAGES)
    for spread in [*ours["stages_s"].values(), ours["ttft_s"], ours["decode_tokens_per_s"]]:
        assert 0 < spread["min"] <= spread["median"] <= spread["max"] and math.isfinite(spread["max"])
    assert ours["peak_rss_bytes"] > 0 and ours["decode_bytes_per_token"] > 0
    assert 0 < report["memory_bandwidth"]["fraction_of_floor_reached"]
    for key in ("speedup_vs_transformers", "speedup_vs_pytorch_reference"):
        assert set(report[key]) == {"decode", "ttft"} and all(v > 0 for v in report[key].values())


def test_prompt_has_the_asked_length(idefics_checkpoint):
    """With the demo's word-level tokenizer and the presets' character-level one."""
    from flamingo_edge.models.checkpoint import resolve_checkpoint
    from flamingo_edge.runtime.processor import Processor

    for folder in (resolve_checkpoint("demo"), idefics_checkpoint):
        processor = Processor.from_pretrained(folder)
        count = lambda prompt: processor.tokenize([prompt]).input_ids.shape[1]  # noqa: E731
        shortest = count(make_prompt(count, [], 1))  # BOS and the closing "caption:"
        assert 1 < shortest <= 12
        for tokens in (shortest, 17, 40):
            assert count(make_prompt(count, [], tokens)) == tokens


def test_bad_workloads_exit_2(capsys):
    assert main(["bench", "demo", "--new-tokens", "1"]) == 2
    assert "--new-tokens must be at least 2" in capsys.readouterr().err
    assert main(["bench", "demo", "--prompt-tokens", "60", "--new-tokens", "30", "--runs", "1"]) == 2
    assert "the model's context" in capsys.readouterr().err
