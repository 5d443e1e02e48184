"""The documentation: generated pages match the code and the committed results, links resolve, pages tell
the product and not its history, and the site builds with `mkdocs build --strict`."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import docs_pages

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_MAX_LINES = 250
SETUP_COMMANDS = (
    "python3 -m pip install nox && python3 -m nox -s smoke",
    "python3 -m pip install nox && python3 -m nox -s tests",
)
LINK = re.compile(r"\]\(([^)\s]+)\)")
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', re.M)


def pages() -> list[Path]:
    return sorted(path for path in DOCS.rglob("*.md") if "snippets" not in path.parts)


def prose_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *DOCS.rglob("*.md")]


def test_generated_pages_match_the_code_and_the_committed_results():
    stale = docs_pages.stale_pages(ROOT)
    assert not stale, f"stale generated pages {stale}: run `python -m bench.docs_pages` and commit them"


def test_check_mode_names_a_stale_page_and_exits_1(tmp_path, capsys):
    for name in ("bench", "results"):
        (tmp_path / name).symlink_to(ROOT / name)
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "CONTRIBUTING.md", tmp_path)
    columns = tmp_path / "docs/reference/columns.md"
    columns.write_text(columns.read_text().replace("`peak_reserved_bytes`", "`peak_mem`"))
    assert docs_pages.main(["--check", "--repo", str(tmp_path)]) == 1
    assert "docs/reference/columns.md" in capsys.readouterr().err


def test_every_matrix_key_and_method_option_has_a_description():
    code = docs_pages.documented()
    spec, method_names, method_class = code.matrix_spec, code.method_names, code.method_class
    page = docs_pages.matrix_page(spec, method_names, method_class)
    assert "(no description)" not in page
    keys = set(spec.model_fields) | {
        f"{section}.{key}"
        for section, field in spec.model_fields.items()
        if hasattr(field.annotation, "model_fields")
        for key in field.annotation.model_fields
    }
    assert set(docs_pages.MATRIX_KEYS) <= keys, "descriptions of keys the schema no longer has"
    options = {option for method in method_names for option in method_class(method).Options.model_fields}
    assert set(docs_pages.METHOD_OPTIONS) <= options, "descriptions of options no method has"
    for method, described in docs_pages.METHOD_OPTIONS_BY_METHOD.items():
        assert set(described) <= set(method_class(method).Options.model_fields), f"{method}: options it lacks"


def test_every_result_column_has_exactly_one_description():
    schema = docs_pages.documented().row_schema
    described = [column for group in docs_pages.COLUMN_GROUPS.values() for column in group]
    assert len(described) == len(set(described)), "a column described in two groups"
    assert set(described) == set(schema.names)


def test_the_cli_page_lists_every_verb_and_flag_of_the_parser():
    parser = docs_pages.documented().parser
    page = (DOCS / "reference/cli.md").read_text()
    for verb, sub in docs_pages._subcommands(parser).items():
        assert f"## `quantbench {verb}`" in page
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in page or f", {flag}`" in page, (verb, flag)


def test_the_package_layout_lists_every_module():
    layout = (DOCS / "reference/layout.md").read_text()
    for path in (ROOT / "bench").rglob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            assert f"`{path.relative_to(ROOT)}`" in layout, path


def test_the_readme_is_a_short_front_page_with_the_setup_commands_and_a_generated_picture():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    for command in SETUP_COMMANDS:
        assert command in readme
    assert str(docs_pages.PLOT) in readme and (ROOT / docs_pages.PLOT).stat().st_size > 10_000
    matrix = re.search(r"```toml\n(.*?)```", readme, re.S).group(1)
    assert len(matrix.strip().splitlines()) <= 10


def test_the_docs_tell_the_product_not_its_history():
    for path in prose_files():
        found = re.findall(r"session [0-9]+", path.read_text(), re.I)
        assert not found, f"{path.relative_to(ROOT)}: {found}"


def test_relative_links_resolve_in_the_readme_contributing_and_docs():
    for path in prose_files():
        for target in LINK.findall(path.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            assert (path.parent / target.split("#")[0]).exists(), f"{path.relative_to(ROOT)} links to {target}"


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def entries(nav) -> list[str]:
        items = nav.values() if isinstance(nav, dict) else nav
        return [leaf for item in items for leaf in (entries(item) if not isinstance(item, str) else [item])]

    assert sorted(entries(config["nav"])) == sorted(str(page.relative_to(DOCS)) for page in pages())
    assert config["theme"]["font"] is False, "the site must build offline: no Google Fonts"


def test_every_snippet_is_generated_and_every_generated_snippet_is_used():
    method_names = docs_pages.documented().method_names
    generated = {f"{table.name}.md" for table in docs_pages.FINDINGS_TABLES} | {
        f"{name}.md"
        for name in [
            *docs_pages.KERNEL_RUNS,
            *docs_pages.ATTENTION_KERNEL_RUNS,
            *docs_pages.DETECTION_RUNS,
            *docs_pages.RESOLUTION_RUNS,
            *docs_pages.RUN_TIMES,
            *(f"options-{method}" for method in method_names),
        ]
    }
    included = {name for page in pages() for name in SNIPPET.findall(page.read_text())}
    assert included == generated
    assert {path.name for path in (DOCS / "snippets").iterdir()} == generated


def test_each_findings_page_has_a_question_an_answer_a_generated_table_and_a_command():
    findings = [page for page in (DOCS / "findings").glob("*.md") if page.name != "index.md"]
    assert len(findings) >= 8
    for page in findings:
        text = page.read_text()
        assert "**Question.**" in text and "**Answer.**" in text, page.name
        assert SNIPPET.search(text), f"{page.name}: no generated table"
        reproduce = text.split("## Reproduce", 1)
        assert len(reproduce) == 2 and "```bash\n" in reproduce[1], f"{page.name}: no reproducing command"


def test_findings_tables_name_the_harness_commit_their_rows_record():
    for table in docs_pages.FINDINGS_TABLES:
        snippet = (DOCS / "snippets" / f"{table.name}.md").read_text()
        assert "| harness |" in snippet and "harness commit" in snippet, table.name


def test_bitsandbytes_int8_latency_from_synthetic_weights_is_flagged_where_it_shows():
    for name in ("findings/bnb-int8-graph-breaks.md", "findings/flux-dev-shapes.md", "methods/bitsandbytes.md"):
        text = (DOCS / name).read_text()
        assert "outlier" in text and "synthetic" in text, name


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs-material is not installed (pip install -e '.[docs]')",
)
def test_the_site_builds_with_strict_links(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert (tmp_path / "site/findings/int8wo-compile.html").exists()  # the offline plugin: plain file URLs
