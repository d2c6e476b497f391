"""`flamingo-edge bench`: the report's keys and ratios on the demo checkpoint, and bad input. No test asserts on
time: speed is measured by the command, not judged here."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from flamingo_edge.cli.main import main
from flamingo_edge.config import FlamingoConfig
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
    band = report["memory_bandwidth"]
    assert 0 < band["fraction_of_floor_spread"]["min"] <= band["fraction_of_floor_reached"] <= band[
        "fraction_of_floor_spread"]["max"] and band["fraction_of_floor_spread"]["median"] == band[
        "fraction_of_floor_reached"]
    assert f"reached {band['fraction_of_floor_reached']:.1%} of it (" in out and "over the runs)" in out
    for key in ("speedup_vs_transformers", "speedup_vs_pytorch_reference"):
        assert set(report[key]) == {"decode", "ttft"} and all(v > 0 for v in report[key].values())


def test_bench_of_an_mllama_export_against_transformers(mllama_export, tmp_path, capsys):
    """Llama 3.2 Vision: transformers' MllamaForConditionalGeneration and our PyTorch reference run the same workload
    in the same process; the ratios are reported (their size is not judged: a tiny model on a shared machine)."""
    pytest.importorskip("transformers")
    checkpoint, export = mllama_export
    path = tmp_path / "bench.json"
    assert main(["bench", str(export), "--reference", str(checkpoint), "--runs", "1", "--prompt-tokens", "12",
                 "--new-tokens", "4", "--images", "2", "--json", str(path)]) == 0
    assert "vs transformers" in capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["backend_result"]["prompt_tokens"] == 12 and report["transformers"] is not None
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


def test_several_prompt_lengths_in_one_run(tmp_path, capsys):
    """One report per length, in the order asked, each with the time outside the graphs, and one table of them."""
    path = tmp_path / "bench.json"
    assert main(["bench", "demo", "--runs", "1", "--prompt-tokens", "12,8", "--new-tokens", "3",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "prompt tokens | TTFT | decode tokens/s | decoder step | outside the graphs per token" in out
    report = json.loads(path.read_text())
    assert report["prompt_lengths"] == [12, 8]
    assert [one["backend_result"]["prompt_tokens"] for one in report["reports"]] == [12, 8]
    for one in report["reports"]:
        ours = one["backend_result"]
        assert one["workload"]["prompt_tokens"] == ours["prompt_tokens"]
        # the step's time is inside the token's: what is outside is not negative, the rate ratio at most 1
        assert ours["host_per_token_s"]["min"] >= 0
        assert 0 < ours["decode_rate_vs_step_rate"] <= 1.0 + 1e-9
        assert f"{ours['prompt_tokens']:13d} | " in out


def test_bad_workloads_exit_2(capsys):
    assert main(["bench", "demo", "--new-tokens", "1"]) == 2
    assert "--new-tokens must be at least 2" in capsys.readouterr().err
    assert main(["bench", "demo", "--prompt-tokens", "60", "--new-tokens", "30", "--runs", "1"]) == 2
    assert "the model's context" in capsys.readouterr().err
    assert main(["bench", "demo", "--prompt-tokens", "8,60", "--new-tokens", "30", "--runs", "1"]) == 2
    assert "60 prompt tokens + 30 new tokens" in capsys.readouterr().err  # refused before the 8-token run
    with pytest.raises(SystemExit):
        main(["bench", "demo", "--prompt-tokens", "8,0"])
    assert "expected an integer >= 1, got 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_fp16(demo_export, tmp_path_factory):
    """The demo export in fp16: another precision of the same checkpoint."""
    from flamingo_edge.calibration.quantize import quantize_export

    return quantize_export(demo_export, tmp_path_factory.mktemp("fp16") / "export", "fp16")


def test_bench_against_a_baseline_reports_ratios_per_stage(demo_export, demo_fp16, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", str(demo_fp16), "--baseline", str(demo_export), "--runs", "2", "--prompt-tokens", "12",
                 "--new-tokens", "4", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "vs fp32 baseline" in out and "per stage (baseline / this)" in out and "baseline decode floor" in out
    report = json.loads(path.read_text())
    ours, theirs = report["backend_result"], report["baseline_result"]
    assert report["precision"] == "fp16" and report["baseline_precision"] == "fp32"
    assert theirs["prompt"] == ours["prompt"] and theirs["prompt_tokens"] == ours["prompt_tokens"] == 12
    assert ours["peak_rss_bytes"] > 0 and theirs["peak_rss_bytes"] is None  # one process: only ours is its own
    for result in (ours, theirs):
        for spread in [*result["stages_s"].values(), result["ttft_s"], result["decode_tokens_per_s"]]:
            assert 0 < spread["min"] <= spread["median"] <= spread["max"] and math.isfinite(spread["max"])
    ratios = report["stage_speedup_vs_baseline"]
    assert set(ratios) == set(STAGES)
    for stage, ratio in ratios.items():
        assert ratio == pytest.approx(theirs["stages_s"][stage]["median"] / ours["stages_s"][stage]["median"])
    speedup = report["speedup_vs_baseline"]
    assert speedup["decode"] == pytest.approx(ours["decode_tokens_per_s"]["median"]
                                              / theirs["decode_tokens_per_s"]["median"])
    # A decode step reads the decoder's weights, fp16 ones half the bytes (norms stay fp32), and the same fp32 K/V
    kv = kv_bytes(demo_export, prompt_tokens=12, new_tokens=4)
    assert 1.8 < (theirs["decode_bytes_per_token"] - kv) / (ours["decode_bytes_per_token"] - kv) <= 2
    # each side's floor from the copy bandwidth measured before each of its runs
    for result, floor in ((ours, report["memory_bandwidth"]), (theirs, report["baseline_memory_bandwidth"])):
        bandwidth = floor["copy_bytes_per_s_spread"]
        assert 0 < bandwidth["min"] <= floor["copy_bytes_per_s"] <= bandwidth["max"]
        assert (result["decode_bytes_per_token"] / bandwidth["max"] * (1 - 1e-9) <= floor["decode_floor_s"]
                <= result["decode_bytes_per_token"] / bandwidth["min"] * (1 + 1e-9))


def kv_bytes(export, *, prompt_tokens: int, new_tokens: int) -> float:
    """The fp32 self- and cross-attention K/V one decode step reads: every slot of the cache (prompt + new - 1)."""
    config = FlamingoConfig.from_dict(json.loads((export / "export.json").read_text())["config"])
    text, context = config.decoder, prompt_tokens + new_tokens - 1
    return 4 * 2 * (text.layers * text.heads * text.head_dim * context
                    + len(text.cross_layers) * text.cross_heads * text.cross_head_dim * config.resampler.latents)


@pytest.mark.parametrize("precision, stored_bits", [("int4", 4 + 32 / 128), ("int8-weights", 8 + 32 / 128)])
def test_weight_only_decode_reads_the_stored_bits(demo_export, tmp_path, capsys, precision, stored_bits):
    """bench of a weight-only export against its fp32 baseline: the decoder's weights a step reads are the packed
    ones plus a fp32 scale per block (32 weights for int4, 128 for int8-weights), not their fp32 size."""
    from flamingo_edge.calibration.quantize import quantize_export

    quantized = quantize_export(demo_export, tmp_path / precision, precision)
    path = tmp_path / "bench.json"
    assert main(["bench", str(quantized), "--baseline", str(demo_export), "--runs", "1", "--prompt-tokens", "12",
                 "--new-tokens", "4", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["precision"] == precision and f"this {precision} export is" in capsys.readouterr().out
    kv = kv_bytes(demo_export, prompt_tokens=12, new_tokens=4)
    ours, theirs = (report[key]["decode_bytes_per_token"] - kv for key in ("backend_result", "baseline_result"))
    # every MatMul weight at `stored_bits`; the norms and the embedding's row stay fp32, so a little less than 32/bits
    assert 0.93 * 32 / stored_bits < theirs / ours <= 32 / stored_bits


def test_a_baseline_of_another_checkpoint_is_refused(demo_export, idefics_export, tmp_path, capsys):
    assert main(["bench", str(demo_export), "--baseline", str(idefics_export), "--runs", "1"]) == 2
    assert "another model (decoder." in capsys.readouterr().err
    other = tmp_path / "other-weights"
    shutil.copytree(demo_export, other)
    record = json.loads((other / "export.json").read_text())
    record["checkpoint_sha256"] = "0" * 64
    (other / "export.json").write_text(json.dumps(record))
    assert main(["bench", str(demo_export), "--baseline", str(other), "--runs", "1"]) == 2
    assert "other weights (sha256" in capsys.readouterr().err
