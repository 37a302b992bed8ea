"""report.html: one self-contained page rendered from report.json, written by `latprune optimize`."""
from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import onnx
import pytest

from onnx_builders import residual_cnn
from test_cli import cli
from latprune.report_html import render_report_html, write_report_html

HOSTILE = "<script>alert(1)</script>"
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source"}


class StrictParser(HTMLParser):
    """Checks that every non-void element is closed in order and collects tags and text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.tags, self.attrs, self.errors, self.text = [], [], set(), [], []

    def handle_starttag(self, tag, attrs):
        self.handle_startendtag(tag, attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.update(name for name, _ in attrs)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> StrictParser:
    p = StrictParser()
    p.feed(page)
    p.close()
    assert not p.errors, p.errors
    assert not p.stack, p.stack
    return p


def assert_self_contained(page: str) -> None:
    p = parse(page)
    assert not {"script", "link", "img", "iframe", "object"} & set(p.tags), p.tags
    assert not {"src", "href", "xlink:href"} & p.attrs, p.attrs
    assert not any(a.startswith("on") for a in p.attrs), p.attrs
    assert set(re.findall(r"https?://[^\s\"']+", page)) <= {"http://www.w3.org/2000/svg"}


@pytest.fixture(scope="module")
def html_lut(cli_workdir) -> Path:
    """A table of its own: test_cli expects to be first to fill the shared one."""
    return cli_workdir / "lut-html.sqlite"


@pytest.fixture(scope="module")
def optimized_html(residual_path, html_lut, cli_workdir):
    out = cli_workdir / "opt-html"
    proc = cli("optimize", residual_path, "--speedup", "1.3", "--out", out, "--lut", html_lut, "-q",
               timeout=300)
    assert proc.returncode in (0, 3), proc.stderr
    return out


def test_optimize_writes_report_html(optimized_html):
    out = optimized_html
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "pruned.onnx", "report.html", "report.json"]
    report = json.loads((out / "report.json").read_text())
    page = (out / "report.html").read_text(encoding="utf-8")
    p = parse(page)
    assert "svg" in p.tags and "table" in p.tags
    assert_self_contained(page)
    for key in ("measured_ms", "budget_ms", "dense_ms", "predicted_ms"):
        assert f"{report[key]:.3f}" in page, key
    assert f"{report['speedup']:.2f}×" in page
    assert f"{100 * report['prediction_error']:+.1f} %" in page
    assert ("meets the budget" in page) == report["meets_budget"]
    for layer in report["layers"]:
        assert layer["name"] in page
    # the page written by the pipeline is exactly the render of its own outputs
    plan = json.loads((out / "plan.json").read_text())
    assert page == render_report_html(report, plan)


def test_hostile_names_are_escaped(optimized_html):
    report = json.loads((optimized_html / "report.json").read_text())
    report["layers"][0]["name"] = HOSTILE
    report["layers"][1]["removed"] = True
    report["model"] = f"/uploads/{HOSTILE}.onnx"
    report["warnings"] = [f"bad {HOSTILE}"]
    report["solver"]["status"] = HOSTILE
    report["device"]["cpu"] = HOSTILE
    page = render_report_html(report, {"widths": {HOSTILE: 3}, "removed_blocks": [HOSTILE]})
    parse(page)
    assert HOSTILE not in page
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "(removed)" in page


def test_minimal_and_partial_reports():
    for report in ({}, {"layers": None, "rounds": None, "solver": None, "device": None},
                   {"dense_ms": None, "meets_budget": None, "layers": [{}], "rounds": [{}], "warnings": [None]},
                   {"dense_ms": float("nan"), "speedup": "fast", "layers": [{"dense_ms": True}]}):
        page = render_report_html(report)
        parse(page)
        assert "—" in page
        assert_self_contained(page)


def test_report_without_measured(optimized_html):
    report = json.loads((optimized_html / "report.json").read_text())
    for key in ("measured_ms", "measured_p90_ms", "prediction_error", "speedup", "meets_budget"):
        del report[key]
    page = render_report_html(report)
    p = parse(page)
    assert "svg" in p.tags
    assert f"{report['budget_ms']:.3f}" in page
    assert f"{report['dense_ms']:.3f}" in page


def test_write_report_html_atomic(tmp_path):
    path = write_report_html(tmp_path / "new", {"model": "m.onnx", "dense_ms": 2.0, "budget_ms": 1.5})
    assert path == tmp_path / "new" / "report.html"
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]
    assert "1.500" in path.read_text(encoding="utf-8")


def test_flops_budget_writes_escaped_report_html(html_lut, tmp_path):
    """The FLOPs-budget path (no latency budget, no predicted ms) also writes report.html, and a
    hostile layer name and file name stay escaped end to end."""
    model = residual_cnn()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    conv.name = HOSTILE
    src = tmp_path / "<img src=x onerror=alert(1)>.onnx"
    onnx.save(model, str(src))
    out = tmp_path / "flops"
    proc = cli("optimize", src, "--flops-ratio", "0.5", "--out", out, "--lut", html_lut, "-q", timeout=300)
    assert proc.returncode in (0, 3), proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["budget"]["kind"] == "flops"
    page = (out / "report.html").read_text(encoding="utf-8")
    parse(page)
    assert_self_contained(page)
    assert HOSTILE not in page and "<img" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert f"{report['measured_ms']:.3f}" in page
