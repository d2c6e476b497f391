"""`flamingo-edge export`: writes the four graphs and a record that the runtime accepts; errors exit 2."""

from __future__ import annotations

from flamingo_edge.artifacts import read_export_record
from flamingo_edge.cli.main import main


def test_export_command(idefics_checkpoint, tmp_path, capsys):
    assert main(["export", str(idefics_checkpoint), "-o", str(tmp_path / "out"), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "decoder" in out and "export.json (contract v2, opset 17)" in out
    assert set(read_export_record(tmp_path / "out").graphs) == {"vision", "resampler", "xattn_kv", "decoder"}


def test_export_of_a_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "-o", str(tmp_path / "out")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err


def test_existing_output_is_refused_and_overwrite_replaces_it_whole(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", "demo", "-o", str(out), "--seed", "1"]) == 0
    first = read_export_record(out)
    assert main(["export", "demo", "-o", str(out), "--seed", "1"]) == 2
    assert "already exists; pick another output folder, or replace that export with --overwrite" in \
        capsys.readouterr().err
    (out / "stale.txt").write_text("left by hand")
    assert main(["export", "demo", "-o", str(out), "--seed", "2", "--overwrite"]) == 0
    assert read_export_record(out).checkpoint_sha256 == first.checkpoint_sha256
    assert not (out / "stale.txt").exists()  # replaced, never merged into
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling, no old copy
