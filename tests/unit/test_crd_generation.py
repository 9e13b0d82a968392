"""The committed CRD is exactly what the API model generates."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from kontext_lora.cli import app
from kontext_lora.crd import CRD_FILE, build_crd, render_crd

REPO = Path(__file__).resolve().parents[2]


def test_committed_crd_matches_the_model() -> None:
    committed = (REPO / "crds" / CRD_FILE).read_text()
    assert committed == render_crd(), "crds/kontextlorajob.yaml is stale: run `kontext-lora crd` and commit it"


def test_crd_check_command_fails_on_a_stale_file(tmp_path: Path) -> None:
    (tmp_path / CRD_FILE).write_text("stale\n")
    result = CliRunner().invoke(app, ["crd", "--check", "--output", str(tmp_path)])
    assert result.exit_code == 1
    assert "out of date" in result.output
    assert CliRunner().invoke(app, ["crd", "--check", "--output", str(REPO / "crds")]).exit_code == 0


def _schema_nodes(node: dict, path: str = "$"):
    """Every schema node: the root, each property and each list's items."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _schema_nodes(child, f"{path}.{name}")
    if "items" in node:
        yield from _schema_nodes(node["items"], f"{path}[]")


def test_schema_is_structural() -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _schema_nodes(schema):
        assert "$ref" not in node and "title" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), path
        assert node.get("additionalProperties") is not False, path
