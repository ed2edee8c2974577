"""The docs' benchmark charts are drawn from the committed results, and are up to date."""

from __future__ import annotations

import xml.dom.minidom
from pathlib import Path

import pytest

from bench import charts


def test_tables_and_numbers_are_read_from_markdown(tmp_path: Path) -> None:
    page = tmp_path / "r.md"
    page.write_text(
        "# x\n\n| proxy | n | share |\n| --- | ---: | ---: |\n| a | 1,077 | 98 % |\n| b | 4 | 9.5% |\n\nend\n"
    )
    assert charts.tables(page) == [
        [{"proxy": "a", "n": "1,077", "share": "98 %"}, {"proxy": "b", "n": "4", "share": "9.5%"}]
    ]
    assert charts.number("1,077") == 1077 and charts.number("98 %") == 98 and charts.number("2,030.3 ms") == 2030.3
    with pytest.raises(ValueError):
        charts.number("-")


def test_a_chart_is_valid_svg_with_every_bar_labelled() -> None:
    svg = charts.bar_chart("t <&>", "u", [charts.Bar("sidecar", 116, True), charts.Bar("naive", 4316, False)], log=True)
    document = xml.dom.minidom.parseString(svg)
    texts = [
        child.data
        for node in document.getElementsByTagName("text")
        if isinstance(child := node.firstChild, xml.dom.minidom.Text)
    ]
    assert "t <&>" in texts and "sidecar" in texts and "4,316" in texts


@pytest.mark.parametrize(
    "name", ["bench-proxy-cpu.svg", "bench-proxy-cpu-target.svg", "bench-pacing.svg", "bench-faults-success.svg"]
)
def test_the_committed_charts_match_the_committed_results(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(charts, "IMAGES", tmp_path)
    charts.main()
    fresh = (tmp_path / name).read_text()
    xml.dom.minidom.parseString(fresh)
    assert fresh == (charts.ROOT / "docs" / "images" / name).read_text(), f"run bench/run charts and commit {name}"
