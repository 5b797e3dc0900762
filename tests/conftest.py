"""Shared fixtures: float64 for gradient checks, PRNG keys, and the HTML
documentation built once per session."""

import pathlib
import subprocess
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def x64():
    """Enables float64 for the duration of one test."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


@pytest.fixture(scope="session")
def docs_html(tmp_path_factory):
    """The HTML documentation, built once for every test that reads it
    (``sphinx -W --keep-going -b html``); skipped without Sphinx."""
    pytest.importorskip("sphinx", reason="sphinx is not installed")
    pytest.importorskip("sphinx_rtd_theme",
                        reason="sphinx_rtd_theme is not installed")
    out = tmp_path_factory.mktemp("docs")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
           "-b", "html", "-d", str(out / "doctrees"), str(ROOT / "docs"),
           str(out / "html")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{result.stdout[-5000:]}\n"
        f"{result.stderr[-5000:]}")
    return out / "html"
