"""benchmarks.plots: the committed results files render as PNGs of the expected kinds, the
committed plots are the ones the report names now, rendering is byte-for-byte repeatable, and
every image the READMEs link exists."""
from __future__ import annotations

import json
import os
import re
import struct

import pytest
from helpers import ROOT

from benchmarks import plots, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which a valid PNG has first."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def test_the_committed_results_warrant_every_kind_of_plot():
    kinds = {report.kind(p.data) for p in plots.planned()}
    assert {"forward", "load", "rest_e2e", "int8_head_to_head"} <= kinds, kinds
    headline = plots.headline(plots.planned())
    assert headline is not None and report.kind(headline.data) == "forward"


def test_a_newer_results_file_supersedes_its_series_plot(tmp_path, monkeypatch):
    """Nothing names a results file: a new forward run of the headline's series takes its place."""
    for path in report.RESULTS.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    old = plots.headline(plots.planned())
    newer = {**old.data, "timestamp": "2099-01-01T00:00:00+00:00", "date": "2099-01-01"}
    (tmp_path / "cpu-newer-2099-01-01.json").write_text(json.dumps(newer))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    names = [p.name for p in plots.planned()]
    assert "cpu-newer-2099-01-01.png" in names and old.name not in names
    assert plots.headline(plots.planned()).name == "cpu-newer-2099-01-01.png"


def test_plots_render_from_the_committed_results(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the bench extra) draws the plots")
    planned = plots.planned()
    (tmp_path / "superseded.png").write_bytes(PNG_SIGNATURE)
    written = plots.write(tmp_path, planned)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in planned)
    assert [p.name for p in written] == [p.name for p in planned]
    for path in written:
        data = path.read_bytes()
        width, height = png_size(data)
        assert width == plots.WIDTH * plots.DPI and height == plots.HEIGHT * plots.DPI, (path.name, width, height)
        assert 10_000 < len(data) < 150_000, (path.name, len(data))


def test_rendering_is_repeatable_and_leaves_unchanged_files_alone(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the bench extra) draws the plots")
    plot = plots.headline(plots.planned())
    (path,) = plots.write(tmp_path, [plot])
    os.utime(path, ns=(0, 0))
    assert plots.render(plot) == path.read_bytes()
    plots.write(tmp_path, [plot])
    assert path.stat().st_mtime_ns == 0  # the same bytes: not rewritten


def test_more_workloads_than_a_row_holds_wrap_onto_more_rows():
    """A later forward file may run more workloads: its panels wrap rather than shrink."""
    pytest.importorskip("matplotlib", reason="matplotlib (the bench extra) draws the plots")
    plot = plots.headline(plots.planned())
    workloads = {f"{name}-{i}": w for i in range(2) for name, w in plot.data["workloads"].items()}
    assert len(workloads) > plots.PANELS_PER_ROW
    wider = plots.Plot(plot.source, {**plot.data, "workloads": workloads}, plot.title, plot.draw)
    assert png_size(plots.render(wider)) == (plots.WIDTH * plots.DPI, 2 * plots.HEIGHT * plots.DPI)


def test_the_committed_plots_are_the_ones_the_report_draws_now():
    committed = sorted(p.name for p in plots.PLOTS.glob("*.png"))
    assert committed == sorted(p.name for p in plots.planned()), \
        "benchmarks/results/plots is out of date: run python -m benchmarks.report --readme"


@pytest.mark.parametrize("readme", [ROOT / "README.md", ROOT / "benchmarks" / "README.md"],
                         ids=["README", "benchmarks/README"])
def test_every_linked_image_exists(readme):
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", readme.read_text())
    assert any(i.endswith(".png") for i in images), "the README shows no plot"
    missing = [i for i in images if not (readme.parent / i).is_file()]
    assert not missing, missing
