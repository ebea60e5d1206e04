"""The documentation site builds offline and strictly, and every figure the results page quotes is
the one its committed record holds."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PAGE = ROOT / "docs" / "results.md"
# a table row's figure (the first bold number of its value cell) and its record: [name](data/PATH) `KEY`
ROW = re.compile(r"^\|(?P<cells>.*)\[[^\]]+\]\(data/(?P<path>[^)]+\.json)\)\s*`(?P<key>[^`]+)`\s*\|\s*$")
FIGURE = re.compile(r"\*\*(-?[\d,]*\.?\d+)")


def dig(record: object, key: str) -> object:
    """``record`` at the dotted ``key``; a key that itself holds dots ("0.0") is matched whole,
    longest first."""
    if not key:
        return record
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        head, rest = ".".join(parts[:n]), ".".join(parts[n:])
        if isinstance(record, dict) and head in record:
            return dig(record[head], rest)
        if isinstance(record, list) and n == 1 and head.isdigit() and int(head) < len(record):
            return dig(record[int(head)], rest)
    raise KeyError(key)


def quoted_figures(page: str) -> list[tuple[str, str, str]]:
    """(figure as quoted, record path under bench/results, key) for every row that names a record."""
    rows = []
    for line in page.splitlines():
        m = ROW.match(line)
        if m:
            figure = FIGURE.search(m["cells"])
            assert figure, f"a row names a record but quotes no **figure**: {line}"
            rows.append((figure[1], m["path"], m["key"]))
    return rows


def mismatches(rows: list[tuple[str, str, str]], results: Path) -> list[str]:
    """What is wrong with each quoted figure: a missing record or key, or a value that rounds
    to something else at the quoted precision."""
    wrong = []
    for figure, path, key in rows:
        file = results / path
        if not file.is_file():
            wrong.append(f"{path}: no such record")
            continue
        try:
            value = dig(json.loads(file.read_text()), key)
        except KeyError:
            wrong.append(f"{path}: no key {key}")
            continue
        decimals = len(figure.split(".")[1]) if "." in figure else 0
        half_unit = 0.5 * 10 ** -decimals + 1e-12  # what rounding to the quoted decimals may move
        if not isinstance(value, (int, float)) or abs(float(value) - float(figure.replace(",", ""))) > half_unit:
            wrong.append(f"{path} {key}: quoted {figure}, the record holds {value}")
    return wrong


def test_every_figure_on_the_results_page_is_its_records():
    rows = quoted_figures(RESULTS_PAGE.read_text())
    assert len(rows) >= 20
    assert mismatches(rows, ROOT / "bench" / "results") == []


def test_the_check_catches_a_wrong_figure_a_missing_key_and_a_missing_record(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "r.json").write_text(json.dumps({"a": {"0.0": {"fd": 7.3851}}, "rows": [{"x": 1.2}]}))
    page = "\n".join([
        "| fd | **7.39** | m | c | [r.json](data/s/r.json) `a.0.0.fd` |",   # right
        "| x | **1.20x** | m | c | [r.json](data/s/r.json) `rows.0.x` |",    # right
        "| fd | **7.38** | m | c | [r.json](data/s/r.json) `a.0.0.fd` |",   # wrong at that precision
        "| y | **1** | m | c | [r.json](data/s/r.json) `rows.0.y` |",       # no such key
        "| z | **1** | m | c | [q.json](data/s/q.json) `z` |",              # no such record
    ])
    wrong = mismatches(quoted_figures(page), tmp_path)
    assert wrong == ["s/r.json a.0.0.fd: quoted 7.38, the record holds 7.3851", "s/r.json: no key rows.0.y",
                     "s/q.json: no such record"]


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config),
                           "--site-dir", str(site)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_the_site_builds_strictly_with_nothing_fetched_from_the_web(tmp_path):
    site = tmp_path / "site"
    p = _build(ROOT / "mkdocs.yml", site)
    assert p.returncode == 0, p.stderr[-3000:]
    fetched = re.compile(r"<(?:script|link|img|iframe)[^>]*(?:src|href)=\"(?:https?:)?//|url\((?:https?:)?//")
    offenders = [str(f.relative_to(site)) for f in site.rglob("*") if f.suffix in (".html", ".css", ".js")
                 and fetched.search(f.read_text(errors="replace"))]
    assert offenders == []
    cli = (site / "reference" / "cli.html").read_text()
    sys.path.insert(0, str(ROOT / "tools"))
    from docs_hooks import subcommands

    from ddpm.cli import build_parser
    commands = subcommands(build_parser())  # every subcommand has its section
    assert len(commands) > 5 and all(f"ddpm {name}" in cli for name in commands) and "--sampler" in cli
    assert 'id="ddpm.sampling.generate.generate"' in (site / "reference" / "api.html").read_text()


def test_a_broken_link_fails_the_build(tmp_path):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the guide](guides/nowhere.md).\n")
    mini = {k: config[k] for k in ("site_name", "strict", "validation", "use_directory_urls")}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump({**mini, "docs_dir": str(docs)}))
    p = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert p.returncode != 0 and "nowhere.md" in p.stdout + p.stderr


@pytest.mark.parametrize("page", ["README.md", "BENCHMARKS.md"])
def test_the_front_pages_point_at_pages_that_exist(page):
    text = (ROOT / page).read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"{page} links to {target}, which does not exist"


def test_every_test_the_hostile_inputs_page_names_exists():
    """docs/hostile-inputs.md names the test of each row (`R::test_x`, `test_file.py::test_x`)."""
    text = (ROOT / "docs" / "hostile-inputs.md").read_text()
    legend = dict(re.findall(r"`([A-Z]{1,2})::`\s+is\s+`tests/([\w/]+)\.py`", text))
    named = [(legend[p].rsplit("/", 1)[-1], name) for p, name in re.findall(r"\b([A-Z]{1,2})::(test_\w+)", text)]
    named += re.findall(r"(test_\w+)\.py::(test_\w+)", text)
    assert len(named) > 100
    files = {f.stem: f for f in (ROOT / "tests").rglob("test_*.py")}
    missing = [f"{mod}::{name}" for mod, name in named
               if not re.search(rf"def {name}\b", files[mod].read_text())]
    assert missing == []
