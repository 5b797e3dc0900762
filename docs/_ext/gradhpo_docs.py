"""Sphinx extension that fills four gradhpo pages in at build time.

* ``.. public-api::`` — an autosummary table (with one generated page per
  entry under ``api/generated/``) of every name in ``gradhpo.__all__``, so a
  name added to ``__all__`` is documented without touching the docs.
* ``.. benchmark-results::`` — tables built from ``benchmarks/results/*.json``
  except the HPO benchmark's ``hpo*.json`` (or "not yet measured" when
  there are none).
* ``.. hpo-results::`` — the HPO benchmark's tables (per task, method by
  budget, and its Wilcoxon tests), from ``benchmarks/results/hpo.json``.
* ``.. changelog::`` — ``CHANGELOG.md`` shown verbatim (Keep-a-Changelog
  markdown; there is no markdown parser in the docs dependencies).

It also resolves references to a public object by its defining module
(``gradhpo.core.state.BilevelState``, as type hints and base classes are
written) to the documented public name (``gradhpo.BilevelState``).
"""

import importlib
import json
import math
import pathlib
import re
import tempfile

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.ext.autosummary import Autosummary
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

PACKAGE = "gradhpo"
#: Where the per-name pages of the public API are written (relative to the
#: documentation source directory; git-ignored).
GENERATED = "api/generated"
#: Documents whose content depends on files outside the source tree; they are
#: re-read on every build.
_DYNAMIC_KEY = "gradhpo_dynamic_docs"


def public_names():
    """The names in ``gradhpo.__all__``, in their listed order."""
    return list(importlib.import_module(PACKAGE).__all__)


def repository_root(app):
    """The repository root: the parent of the documentation source dir."""
    return pathlib.Path(app.srcdir).resolve().parent


def _mark_dynamic(env, docname):
    if not hasattr(env, _DYNAMIC_KEY):
        setattr(env, _DYNAMIC_KEY, set())
    getattr(env, _DYNAMIC_KEY).add(docname)


# -- the public API -----------------------------------------------------------

class PublicApi(Autosummary):
    """``autosummary`` whose entries are ``gradhpo.__all__``."""

    has_content = False

    def run(self):
        _mark_dynamic(self.env, self.env.docname)
        self.content = StringList(
            [f"{PACKAGE}.{name}" for name in public_names()],
            source="gradhpo.__all__")
        self.options.setdefault("toctree", GENERATED)
        return super().run()


def _generate_public_stubs(app):
    """Writes ``api/generated/gradhpo.<name>.rst`` for every public name.

    Autosummary only generates pages for entries written literally in a
    source file, so the list is written to a temporary file and handed to
    autosummary's generator. Pages of names no longer public are removed
    (they would otherwise be documents outside every toctree).
    """
    from sphinx.ext.autosummary.generate import generate_autosummary_docs

    names = public_names()
    out = pathlib.Path(app.srcdir) / GENERATED
    out.mkdir(parents=True, exist_ok=True)
    keep = {f"{PACKAGE}.{name}.rst" for name in names}
    stub = re.compile(re.escape(PACKAGE) + r"\.[A-Za-z_]\w*\.rst")
    for path in out.iterdir():
        if stub.fullmatch(path.name) and path.name not in keep:
            path.unlink()
    lines = [".. autosummary::", f"   :toctree: {GENERATED}", ""]
    lines += [f"   {PACKAGE}.{name}" for name in names]
    with tempfile.TemporaryDirectory() as tmp:
        source = pathlib.Path(tmp) / "public_api.rst"
        source.write_text("\n".join(lines) + "\n", encoding="utf-8")
        generate_autosummary_docs(
            [str(source)], output_dir=out, suffix=".rst", app=app,
            imported_members=app.config.autosummary_imported_members,
            overwrite=True)


def _public_aliases():
    """``{"gradhpo.core.state.BilevelState": "gradhpo.BilevelState", ...}``."""
    package = importlib.import_module(PACKAGE)
    aliases = {}
    for name in package.__all__:
        obj = getattr(package, name)
        module = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None)
        if module and qualname and module != PACKAGE:
            aliases[f"{module}.{qualname}"] = f"{PACKAGE}.{name}"
    return aliases


def _resolve_public_alias(app, env, node, contnode):
    """Resolves a reference to a public object by its defining module."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    for private, public in _public_aliases().items():
        if target == private or target.startswith(private + "."):
            new_target = public + target[len(private):]
            return env.domains["py"].resolve_xref(
                env, node.get("refdoc", env.docname), app.builder,
                node["reftype"], new_target, node, contnode)
    return None


# -- benchmark tables ---------------------------------------------------------

def _escape(text):
    """Backslash-escapes every reST markup character of a table cell."""
    return re.sub(r"([^a-zA-Z0-9\s.,;()%+=/-])", r"\\\1", str(text)).replace(
        "\n", " ")


#: Lists longer than this are shown by their length and ends in a cell.
LONG_LIST = 12


def _format(value):
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, list) and len(value) > LONG_LIST:
        return (f"{len(value)} values: {_format(value[0])}, "
                f"{_format(value[1])}, ..., {_format(value[-1])}")
    return json.dumps(value, sort_keys=True, separators=(", ", ": "))


def _is_rows(value):
    return (isinstance(value, list) and value
            and all(isinstance(row, dict) for row in value))


def _is_table_of_dicts(value):
    return (isinstance(value, dict) and value
            and all(isinstance(row, dict) for row in value.values()))


def _list_table(rows, caption=None, first_column=None):
    """reST ``list-table`` lines for a list of dicts (union of the keys)."""
    columns = [first_column] if first_column else []
    for row in rows:
        columns += [key for key in row if key not in columns]
    title = f" {_escape(caption)}" if caption else ""
    lines = [f".. list-table::{title}", "   :header-rows: 1", ""]
    for index, cells in enumerate(
            [{c: c for c in columns}] + list(rows)):
        for position, column in enumerate(columns):
            text = (column if index == 0 else _format(cells.get(column)))
            bullet = "* -" if position == 0 else "  -"
            lines.append(f"   {bullet} {_escape(text)}")
    return lines + [""]


def _render_result(data):
    """reST lines for one benchmark JSON document (any reasonable layout)."""
    if _is_rows(data):
        return _list_table(data)
    if _is_table_of_dicts(data):
        return _list_table([{"name": key, **row} for key, row in data.items()],
                           first_column="name")
    if not isinstance(data, dict):
        return ["::", ""] + [
            "   " + line for line in json.dumps(data, indent=2).splitlines()
        ] + [""]
    lines, fields = [], []
    for key, value in data.items():
        if _is_rows(value):
            lines += _list_table(value, caption=key)
        elif _is_table_of_dicts(value):
            lines += _list_table(
                [{"name": k, **row} for k, row in value.items()],
                caption=key, first_column="name")
        else:
            fields.append(f":{_escape(key)}: {_escape(_format(value))}")
    return (fields + [""] if fields else []) + lines


class BenchmarkResults(SphinxDirective):
    """Tables of every ``*.json`` file in the benchmark results directory."""

    has_content = False
    option_spec = {"path": directives.unchanged}

    def run(self):
        _mark_dynamic(self.env, self.env.docname)
        relative = self.options.get("path", "benchmarks/results")
        folder = repository_root(self.env.app) / relative
        files = sorted(path for path in folder.glob("*.json")
                       if not path.name.startswith("hpo")
                       ) if folder.is_dir() else []
        if not files:
            text = (f"Not yet measured: there are no results in "
                    f"``{relative}/``. Run the benchmarks (see above) and "
                    f"rebuild the documentation.")
            return self._parse([text])
        lines = []
        for path in files:
            self.env.note_dependency(str(path))
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                logger.warning("cannot read benchmark results %s: %s",
                               path, error, location=self.get_location())
                continue
            lines += [f".. rubric:: {_escape(path.name)}", ""]
            lines += _render_result(data)
        return self._parse(lines)

    def _parse(self, lines):
        container = nodes.container(classes=["benchmark-results"])
        self.state.nested_parse(StringList(lines, source="benchmarks"),
                                self.content_offset, container)
        return [container]


class HpoResults(SphinxDirective):
    """Per task, a table of test accuracy and one of test loss (mean ± std
    over seeds, method by budget), and the Wilcoxon tests, from the HPO
    benchmark's ``hpo.json`` (its ``summary`` and ``wilcoxon_vs_tpe``)."""

    has_content = False
    option_spec = {"path": directives.unchanged}

    def run(self):
        _mark_dynamic(self.env, self.env.docname)
        relative = self.options.get("path", "benchmarks/results/hpo.json")
        path = repository_root(self.env.app) / relative
        if not path.is_file():
            return self._parse([f"Not yet measured: ``{relative}`` does not "
                                "exist."])
        self.env.note_dependency(str(path))
        data = json.loads(path.read_text(encoding="utf-8"))
        summary, tests = data["summary"], data.get("wilcoxon_vs_tpe", [])
        datasets = data["config"].get("datasets", {})
        lines = []
        for task in sorted({s["task"] for s in summary}):
            rows = [s for s in summary if s["task"] == task]
            budgets = sorted({s["budget"] for s in rows})
            methods = list(dict.fromkeys(s["method"] for s in rows))
            seeds = max(s["seeds"] for s in rows)
            lines += [f".. rubric:: {_escape(task)} "
                      f"({_escape(datasets.get(task, '?'))})", ""]
            for key, what, digits in (("acc", "test accuracy", 4),
                                      ("loss", "test loss", 4)):
                table = []
                for method in methods:
                    cells = {"method": method}
                    for budget in budgets:
                        hit = [s for s in rows if s["method"] == method
                               and s["budget"] == budget]
                        cells[f"{budget}x"] = (
                            f"{hit[0][key + '_mean']:.{digits}f} ± "
                            f"{hit[0][key + '_std']:.{digits}f}"
                            if hit else "")
                    table.append(cells)
                lines += _list_table(
                    table, caption=f"{task}: {what}, mean ± std over "
                                   f"{seeds} seeds", first_column="method")
            mine = [t for t in tests if t["task"] == task]
            if mine:
                lines += _list_table(
                    [{"method": t["method"], "budget": f"{t['budget']}x",
                      "mean difference": f"{t['mean_difference']:+.4f}",
                      "p": f"{t['p_value']:.3g}", "seeds": t["seeds"]}
                     for t in mine],
                    caption=f"{task}: paired difference in test accuracy "
                            "against tpe (two-sided Wilcoxon)",
                    first_column="method")
        return self._parse(lines)

    def _parse(self, lines):
        container = nodes.container(classes=["benchmark-results"])
        self.state.nested_parse(StringList(lines, source="hpo"),
                                self.content_offset, container)
        return [container]


# -- changelog ----------------------------------------------------------------

class Changelog(SphinxDirective):
    """``CHANGELOG.md`` verbatim, highlighted as markdown."""

    has_content = False
    option_spec = {"path": directives.unchanged}

    def run(self):
        _mark_dynamic(self.env, self.env.docname)
        relative = self.options.get("path", "CHANGELOG.md")
        path = repository_root(self.env.app) / relative
        if not path.is_file():
            return [nodes.paragraph(
                text=f"No changelog yet ({relative} does not exist).")]
        self.env.note_dependency(str(path))
        text = path.read_text(encoding="utf-8")
        block = nodes.literal_block(text, text, language="markdown")
        block["classes"].append("changelog")
        return [block]


# -- named tuples -------------------------------------------------------------

def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    """Skips ``NamedTuple`` field accessors ("Alias for field number k").

    The fields are documented in the class's ``Attributes:`` section;
    documenting the accessors too would describe each field twice.
    """
    doc = getattr(obj, "__doc__", None) or ""
    if what == "class" and doc.startswith("Alias for field number"):
        return True
    return None


# -- wiring -------------------------------------------------------------------

def _always_outdated(app, env, added, changed, removed):
    """Re-reads the pages built from files outside the source tree."""
    dynamic = getattr(env, _DYNAMIC_KEY, set())
    return [doc for doc in dynamic if doc in env.found_docs]


def _purge(app, env, docname):
    getattr(env, _DYNAMIC_KEY, set()).discard(docname)


def _merge(app, env, docnames, other):
    merged = getattr(env, _DYNAMIC_KEY, set())
    merged |= getattr(other, _DYNAMIC_KEY, set())
    setattr(env, _DYNAMIC_KEY, merged)


def setup(app):
    # Before autosummary's own generation (priority 500), so that the pages of
    # the public names exist when the documents are read.
    app.connect("builder-inited", _generate_public_stubs, priority=400)
    app.connect("missing-reference", _resolve_public_alias)
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.connect("env-get-outdated", _always_outdated)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.add_directive("public-api", PublicApi)
    app.add_directive("benchmark-results", BenchmarkResults)
    app.add_directive("hpo-results", HpoResults)
    app.add_directive("changelog", Changelog)
    return {"version": "1", "parallel_read_safe": True,
            "parallel_write_safe": True}
