"""The Helm chart's generated files are current, and every value is documented (no helm binary needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from typer.testing import CliRunner

from kontext_lora.chart import (
    CHART_DIR,
    README,
    documented_values,
    render_chart_crd,
    render_values_table,
    stale_files,
    undocumented_values,
)
from kontext_lora.cli import app
from kontext_lora.crd import build_crd

VALUES = (CHART_DIR / "values.yaml").read_text()


def test_generated_chart_files_are_current() -> None:
    stale = stale_files()
    assert not stale, f"{[str(p.relative_to(CHART_DIR)) for p in stale]} stale: run `kontext-lora chart` and commit"


def test_every_value_is_documented_and_in_the_readme_table() -> None:
    assert undocumented_values(VALUES) == []
    table = (CHART_DIR / README).read_text()
    for key in yaml.safe_load(VALUES):
        assert f"| `{key}" in table, f"values.yaml key {key} is missing from the chart README's values table"
    for doc in documented_values(VALUES):
        assert doc.description and doc.description[0].isupper(), f"{doc.key}: write a sentence"


def test_chart_crd_is_the_models_crd_behind_a_value() -> None:
    template = render_chart_crd()
    assert template.startswith("{{- if .Values.crds.install }}") and template.rstrip().endswith("{{- end }}")
    body = "\n".join(line for line in template.splitlines() if "{{" not in line)
    assert yaml.safe_load(body)["spec"] == build_crd()["spec"]


def test_docs_parser_covers_nested_maps_and_reports_gaps() -> None:
    text = (
        "# -- The name.\nname: x\nsection:\n  # -- A documented map,\n  # on two lines.\n  inner:\n    a: 1\n"
        "  undocumented: 2\nlist:\n  - a: b\n"
    )
    docs = {doc.key: doc.description for doc in documented_values(text)}
    assert docs == {"name": "The name.", "section.inner": "A documented map, on two lines."}
    assert undocumented_values(text) == ["section.undocumented", "list"]
    assert '| `section.inner` | object | `{"a": 1}` |' in render_values_table(text)


def test_chart_check_command_fails_on_a_stale_chart(tmp_path: Path) -> None:
    chart = tmp_path / "kontext-lora"
    shutil.copytree(CHART_DIR, chart)
    runner = CliRunner()
    assert runner.invoke(app, ["chart", "--check", "--chart-dir", str(chart)]).exit_code == 0
    values = chart / "values.yaml"
    values.write_text(values.read_text().replace("# -- Operator image pull policy.", "# -- Pull policy."))
    result = runner.invoke(app, ["chart", "--check", "--chart-dir", str(chart)])
    assert result.exit_code == 1 and "README.mdisoutofdate" in "".join(result.output.split())  # rich wraps lines
    assert runner.invoke(app, ["chart", "--chart-dir", str(chart)]).exit_code == 0
    assert "| Pull policy. |" in (chart / README).read_text()
    values.write_text(values.read_text() + "extra: 1\n")
    result = runner.invoke(app, ["chart", "--chart-dir", str(chart)])
    assert result.exit_code == 1 and "extra" in result.output
