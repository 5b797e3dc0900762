"""The documentation: every public name is documented with an example, and
the Sphinx build (HTML and doctest) passes with warnings as errors."""

import inspect
import pathlib
import subprocess
import sys

import pytest

import gradhpo

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PUBLIC = list(gradhpo.__all__)


def _sphinx_build(builder, out):
    """Runs ``sphinx-build -W --keep-going -b builder docs out``."""
    pytest.importorskip("sphinx")
    pytest.importorskip("sphinx_rtd_theme")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
           "-b", builder, "-d", str(out / "doctrees"), str(DOCS),
           str(out / builder)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{result.stdout[-5000:]}\n"
        f"{result.stderr[-5000:]}")
    return out / builder


@pytest.fixture(scope="module")
def html(docs_html):
    return docs_html


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_docstring_with_example(name):
    doc = inspect.getdoc(getattr(gradhpo, name))
    assert doc, f"gradhpo.{name} has no docstring"
    assert ">>>" in doc, (
        f"the docstring of gradhpo.{name} has no runnable '>>>' example")


def test_api_page_is_generated_from_dunder_all():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import gradhpo_docs
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    assert gradhpo_docs.public_names() == PUBLIC
    assert ".. public-api::" in (DOCS / "api.rst").read_text()


def test_html_build_documents_every_public_name(html):
    api = (html / "api.html").read_text(encoding="utf-8")
    for name in PUBLIC:
        page = html / "api" / "generated" / f"gradhpo.{name}.html"
        assert page.is_file(), f"no API page for gradhpo.{name}"
        assert f'id="gradhpo.{name}"' in page.read_text(encoding="utf-8"), (
            f"the API page of gradhpo.{name} does not describe it")
        assert f"generated/gradhpo.{name}.html" in api, (
            f"gradhpo.{name} is not listed in the API reference")


def test_html_build_fills_in_generated_pages(html):
    bench = (html / "benchmarks.html").read_text(encoding="utf-8")
    results = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    if results:
        for path in results:
            if path.name.startswith("hpo"):
                continue        # on the HPO benchmark's own page
            assert path.name in bench
    else:
        assert "Not yet measured" in bench
    hpo = ROOT / "benchmarks" / "results" / "hpo.json"
    if hpo.is_file():
        import json
        page = (html / "hpo_benchmark.html").read_text(encoding="utf-8")
        for task in {r["task"] for r in json.loads(hpo.read_text())["rows"]}:
            assert f"{task}: test accuracy, mean" in page, task
            assert f"{task}: test loss, mean" in page, task
    for module in ("gradhpo.utils.gradients", "gradhpo.utils.tree",
                   "gradhpo.utils.validation", "gradhpo.utils.types"):
        assert (html / "api" / "generated" / f"{module}.html").is_file()


def test_doctest_build_runs_every_example(tmp_path):
    out = _sphinx_build("doctest", tmp_path)
    report = (out / "output.txt").read_text(encoding="utf-8")
    assert "0 failures in tests" in report


@pytest.mark.parametrize("data", [
    [{"model": "mlp", "ratio": 3.25, "ok": True},
     {"model": "cnn*", "ratio": float("nan"), "note": None}],
    {"machine": "2 CPU `cores`", "jax": "0.10.2",
     "rows": [{"algorithm": "T1T2|exact", "step_ms": 1.5e-3}],
     "scaling": {"1e3": {"ratio": 2.0}, "1e6": {"ratio": [1, 2]}}},
    {"plain_optax": {"ms": 1.0}, "t1t2_exact": {"ms": 3.1, "_x_": "a_b"}},
    [1, 2, 3],
])
def test_benchmark_json_renders_to_valid_rest(data):
    docutils = pytest.importorskip("docutils.core")
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import gradhpo_docs
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    source = "\n".join(gradhpo_docs._render_result(data))
    tree = docutils.publish_doctree(
        source, settings_overrides={"report_level": 1, "halt_level": 5})
    messages = [node.astext() for node in tree.findall()
                if node.tagname == "system_message"]
    assert not messages, f"{messages}\n{source}"
