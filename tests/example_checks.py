"""Checks shared by the example tests: the saved-files line, the verdict
sentence and the colours of the figures, against the example's own
results."""

import pathlib
import re

import pytest


#: "Verdict: [the baseline ]WINNER wins on METRIC (V at G G), ahead of the
#: runner-up, [the baseline ]SECOND (V at G G), by MARGIN; ..." (or a tie:
#: "Verdict: A and B tie on METRIC (...; margin M)").
VERDICT = re.compile(
    r"^Verdict: (?:the baseline )?(?P<first>.+?)"
    r"(?: wins on .+?, ahead of the runner-up, (?:the baseline )?"
    r"(?P<second>.+?) \(\d.*?\), by (?P<margin>[0-9.]+);"
    r"| and (?:the baseline )?(?P<tied>.+?) tie on .+?; margin "
    r"(?P<tie_margin>[0-9.]+)\);)", re.M)


def check_verdict(out, rows, metric, higher_is_better=True, places=3):
    """The verdict line names the best of ``rows`` (as in results.json) and
    the runner-up, and prints their difference as the margin."""
    match = VERDICT.search(out)
    assert match, out
    ranked = sorted(rows, key=lambda r: r[metric],
                    reverse=higher_is_better)
    value = {r["method"]: r[metric] for r in rows}
    first = match["first"]
    second = match["second"] or match["tied"]
    margin = float(match["margin"] or match["tie_margin"])
    assert value[first] == ranked[0][metric], (first, ranked)
    assert value[second] == ranked[1][metric], (second, ranked)
    assert margin == pytest.approx(abs(value[first] - value[second]),
                                   abs=0.5 * 10 ** -places + 1e-12)
    return first


def check_saved_line(out, files):
    """The "Saved in FOLDER: FILES" line names a folder that holds them."""
    match = re.search(r"^Saved in (.+): (.+)$", out, re.M)
    assert match, out
    folder = pathlib.Path(match[1])
    assert folder.is_absolute() and folder.is_dir()
    assert match[2].split(", ") == files
    for name in files:
        assert (folder / name).stat().st_size > 0, name
    return folder


def check_colours(figure, names):
    """Every line of ``figure`` names its run (``gid``), a run has one
    colour in all panels and no two runs share one; returns the lines."""
    seen, lines = {}, []
    for ax in figure.axes:
        for line in ax.get_lines():
            assert line.get_gid() in names, line.get_gid()
            seen.setdefault(line.get_gid(), set()).add(line.get_color())
            lines.append(line)
    assert set(seen) == set(names), (set(seen), names)
    assert all(len(c) == 1 for c in seen.values()), seen
    assert len({c for cs in seen.values() for c in cs}) == len(seen), seen
    return lines
