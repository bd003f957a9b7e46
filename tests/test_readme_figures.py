"""The READMEs' figures come from results files: the blocks between the report markers are what
``benchmarks.report`` renders from benchmarks/results/ now, every results file a README names
exists, and each figure of a hand-written paragraph that names a results file is one of that
file's values (as the report rounds them)."""
from __future__ import annotations

import json
import re

import pytest
from helpers import ROOT

from benchmarks import plots, report

README, BENCH_README = ROOT / "README.md", ROOT / "benchmarks" / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
BLOCKS = [(BENCH_README, report.START, report.END, report.render),
          (BENCH_README, report.INDEX_START, report.INDEX_END, report.index_table),
          (BENCH_README, plots.PLOTS_START, plots.PLOTS_END, plots.markdown),
          (README, report.SUMMARY_START, report.SUMMARY_END, report.summary),
          (README, plots.HEADLINE_START, plots.HEADLINE_END, plots.headline_markdown)]


def block(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].strip()


@pytest.mark.parametrize("readme,start,end,render", BLOCKS, ids=["tables", "index", "plots", "summary", "headline"])
def test_rendered_blocks_are_the_results_files(readme, start, end, render):
    text = readme.read_text()
    assert start in text and end in text, f"{readme.name} lacks its {start} marker"
    assert block(text, start, end) == render().strip(), \
        f"{readme.relative_to(ROOT)} is out of date: run python -m benchmarks.report --readme"


def named_files(text: str) -> set[str]:
    return set(re.findall(r"([\w.-]+-\d{4}-\d{2}-\d{2}[\w.-]*\.json)", text))


@pytest.mark.parametrize("readme", [README, BENCH_README], ids=["README", "benchmarks/README"])
def test_every_named_results_file_exists(readme):
    names = named_files(readme.read_text())
    assert names, "the README names no results file"
    missing = sorted(n for n in names if not (RESULTS / n).exists())
    assert not missing, missing


def hand_written(text: str) -> str:
    """The README less its rendered blocks."""
    for _, start, end, _ in BLOCKS:
        if start in text:
            head, rest = text.split(start, 1)
            text = head + rest.split(end, 1)[1]
    return text


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, list items apart."""
    return [p for chunk in re.split(r"\n\s*\n", text) for p in re.split(r"\n(?=\s*- )", chunk)]


def leaves(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in leaves(v)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


SCALES = {"%": (100.0, 1.0), "GFLOP/s": (1e-9,), "ms": (1e3,), "s": (1.0,), "x": (1.0,), "tokens/s": (1.0,),
          "": (1.0,)}  # a fraction is shown as percent (or stored as one), FLOP/s as GFLOP/s, seconds as ms


def matches(figure: str, unit: str, values: list[float]) -> bool:
    """The figure is one of the values, scaled for its unit and rounded to its own digits."""
    number = figure.replace(",", "")
    digits = len(number.split(".")[1]) if "." in number else 0
    return any(f"{v * scale:.{digits}f}" == number for v in values for scale in SCALES[unit])


FIGURE = re.compile(r"(?<![\w.`/-])(\d[\d,]*\.\d+|\d[\d,]*(?=\s?(?:%|x\b|tokens/s|GFLOP/s|ms\b|s\b)))"
                    r"(?:\s?(%|x\b|tokens/s|GFLOP/s|ms\b|s\b))?")


def cited_figures() -> list[tuple[str, str, str, list[str]]]:
    """(paragraph start, figure, unit, files) for each figure of a hand-written paragraph that
    names results files."""
    out = []
    for readme in (README, BENCH_README):
        for paragraph in paragraphs(hand_written(readme.read_text())):
            files = sorted(n for n in named_files(paragraph) if (RESULTS / n).exists())
            if not files:
                continue
            # file names, code, dates and versions are not figures
            prose = re.sub(r"[\w.-]+-\d{4}-\d{2}-\d{2}[\w.-]*\.json|`[^`]*`|\d{4}-\d{2}-\d{2}|torch \S+", "",
                           paragraph)
            out += [(paragraph.strip()[:60], figure, unit, files) for figure, unit in FIGURE.findall(prose)]
    return out


def test_figures_of_paragraphs_that_name_results_files_are_in_them():
    """A cheap guard, not a proof: a figure that happens to equal another value of the file passes."""
    unknown = []
    for where, figure, unit, files in cited_figures():
        values = [v for name in files for v in leaves(json.loads((RESULTS / name).read_text()))]
        if not matches(figure, unit, values):
            unknown.append(f"{figure!r}{unit} in {where!r}... (files: {', '.join(files)})")
    assert not unknown, "figures not in the results files their paragraph names:\n" + "\n".join(unknown)
