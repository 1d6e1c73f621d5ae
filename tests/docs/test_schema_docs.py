"""The data dictionary: complete, in step with the code's schemas, and with its docs page."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from schemas import dictionary as d
from schemas.answers import ANSWER_SCHEMA, SCHEMA_VERSION
from schemas.tables import files_schema, images_schema, rejects_schema

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
PAGE = ROOT / "docs" / "reference" / "data-dictionary.md"


def test_docs_page_block_is_the_generated_dictionary():
    assert d.readme_block(PAGE.read_text()) == d.markdown(), (
        "docs data dictionary is stale: run "
        "`mmrag schema --readme docs/reference/data-dictionary.md`")


def test_every_column_of_every_contract_is_documented():
    found = d.contracts()
    assert {"images", "files", "rejects", "backfills", "answers"} <= {c.name for c in found}
    undocumented = [f"{c.name}.{col.name}" for c in found for col in c.columns if not col.doc]
    assert undocumented == []


@pytest.mark.parametrize("name, schema", [
    ("images", images_schema(d.VECTOR_DIM)), ("files", files_schema()),
    ("rejects", rejects_schema()), ("answers", ANSWER_SCHEMA)])
def test_columns_and_types_are_the_written_schemas(name, schema):
    (contract,) = d.contracts(name)
    top = [c for c in contract.columns if "[]." not in c.name]
    assert [c.name for c in top] == schema.names
    assert [c.type for c in top] == [d.type_name(f.type) for f in schema]


def test_nested_fields_and_placeholder_docs():
    (answers,) = d.contracts("answers")
    cols = {c.name: c for c in answers.columns}
    retrieved = ANSWER_SCHEMA.field("retrieved").type.value_type
    assert [n for n in cols if n.startswith("retrieved[].")] == [
        f"retrieved[].{f.name}" for f in retrieved]
    assert cols["retrieved[].safer"].type == "float32"
    assert cols["min_safer"].doc == cols["max_livelier"].doc != ""
    assert answers.version == SCHEMA_VERSION


def test_type_names():
    assert d.type_name(pa.list_(pa.float32(), 512)) == "fixed_size_list<float32>[dim]"
    assert d.type_name(pa.list_(pa.struct([("a", pa.int32())]))) == "list<struct>"
    assert d.type_name(pa.timestamp("us", tz="UTC")) == "timestamp[us, UTC]"
    assert d.type_name(pa.float64()) == "float64"


def test_markdown_escapes_table_cells():
    md = d.markdown("rejects")
    assert "| `stage` | `string` | path \\| missing \\| read" in md


def test_json_lists_every_column():
    data = json.loads(d.as_json("answers"))["tables"]
    assert [t["name"] for t in data] == ["answers"]
    names = [c["name"] for c in data[0]["columns"]]
    assert set(ANSWER_SCHEMA.names) <= set(names) and all(c["doc"] for c in data[0]["columns"])
    with pytest.raises(KeyError, match="unknown table 'nope'"):
        d.contracts("nope")


def test_update_readme_rewrites_only_the_block(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"# x\n\nintro\n\n{d.BEGIN}\nstale\n{d.END}\n\n## after\n")
    assert d.update_readme(path) is True
    text = path.read_text()
    assert text.startswith("# x\n\nintro\n\n") and text.endswith(f"{d.END}\n\n## after\n")
    assert d.readme_block(text) == d.markdown()
    assert d.update_readme(path) is False
    (tmp_path / "bare.md").write_text("no markers")
    with pytest.raises(ValueError, match="no generated"):
        d.update_readme(tmp_path / "bare.md")


def test_cli_prints_the_dictionary():
    from typer.testing import CliRunner

    from mmrag.cli import app

    r = CliRunner().invoke(app, ["schema", "files"])
    assert r.exit_code == 0 and r.output == d.markdown("files")
    r = CliRunner().invoke(app, ["schema", "--format", "json"])
    assert r.exit_code == 0 and json.loads(r.output) == json.loads(d.as_json())
    assert CliRunner().invoke(app, ["schema", "nope"]).exit_code == 2
