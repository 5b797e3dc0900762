"""The examples' command-line helpers; imports only the standard library,
so that a script can parse its flags (and answer ``--help`` or a usage error)
before it imports JAX.

- ``type=`` functions for argparse (:func:`int_in`, :func:`float_in`,
  :func:`name_list`, :func:`number_list` and the ready-made ones);
- :func:`fill_defaults` and :func:`quick_help`: ``--quick`` changes only the
  defaults of the flags not given on the command line;
- :func:`progress`: a tqdm bar that is off when stderr is not a terminal;
- :func:`support_module_main`: a small ``--help`` for the modules that are
  not examples themselves;
- :func:`add_common_flags`: ``--seed``, ``--out`` and ``--quick``, worded
  alike in every example;
- the end of a run: :func:`write_json` (flushed to disk, with
  :func:`fsync_path`), :func:`saved_line` (where the files are) and
  :func:`verdict` (one sentence: who won, by how much, at what cost);
- plots: :func:`method_colours` (one fixed colour per method),
  :func:`dataset_name`, :func:`pyplot` (matplotlib on the Agg backend) and
  :func:`legend_below` (a legend that does not cover the data).

``common.py`` re-exports the type functions under their old names.
"""

import argparse
import json
import math
import os
import sys


def fill_defaults(args, normal, quick=None):
    """Give every flag of ``normal`` that is still None (not given on the
    command line) its default: the one in ``quick`` when ``args.quick`` is
    set and ``quick`` names the flag, else the one in ``normal``. A flag
    given explicitly is never changed.

    Args:
      args: the parsed ``argparse.Namespace`` (with a ``quick`` attribute).
      normal: ``{dest: default}`` of the flags whose parser default is None.
      quick: ``{dest: default under --quick}`` (a subset of ``normal``).

    Returns:
      ``args``, changed in place.
    """
    quick = quick or {}
    use_quick = getattr(args, "quick", False)
    for name, value in normal.items():
        if getattr(args, name) is None:
            setattr(args, name, quick[name] if use_quick and name in quick
                    else value)
    return args


def quick_help(what, normal, quick):
    """The help text of ``--quick``: what it is for, then every default it
    changes (``--flag NEW (else OLD)``), and that explicit flags win."""
    changes = ", ".join(
        f"--{name.replace('_', '-')} {quick[name]} (else {normal[name]})"
        for name in quick)
    return (f"{what}. Changes only the defaults of flags you do not give: "
            f"{changes}. A flag given explicitly always wins.")


def progress(iterable=None, **kwargs):
    """A tqdm progress bar that is disabled when stderr is not a terminal
    (CI logs, pipes, pytest): tqdm's ``disable=None``. Pass ``disable=True``
    to turn it off in any case."""
    from tqdm import tqdm    # imported here: parsing flags stays light
    if not kwargs.get("disable"):
        kwargs["disable"] = None
    return tqdm(iterable, **kwargs)


def support_module_main(doc, usage, argv=None):
    """``main`` of a support module run as a script: ``--help`` prints the
    first paragraph of ``doc`` and ``usage``; without flags it prints
    ``usage`` and exits 0 (there is nothing to run)."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], epilog=usage,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)
    print(usage)
    sys.exit(0)


def add_common_flags(parser, out=None, quick=None,
                     seed_help="random seed (data split, initial weights, "
                     "batch order)"):
    """Adds the flags every example shares, worded alike.

    Args:
      parser: an ``argparse.ArgumentParser``.
      out: the default of ``--out`` (None: no ``--out``, for a script that
        writes no files).
      quick: the help text of ``--quick`` (e.g. from :func:`quick_help`;
        None: no ``--quick``). ``--quick`` only sets ``args.quick``: call
        :func:`fill_defaults` after parsing, so that it never overrides a
        flag given on the command line.
      seed_help: the help text of ``--seed`` (default 0).
    """
    parser.add_argument("--seed", type=seed_int, default=0,
                        help=f"{seed_help} (default 0)")
    if out is not None:
        parser.add_argument("--out", default=out,
                            help="directory for results.json and the plots "
                            f"(created if missing; default {out})")
    if quick is not None:
        parser.add_argument("--quick", action="store_true", help=quick)
    return parser


# -- the end of a run: files, where they are, and the verdict -----------------

def fsync_path(path):
    """Flushes a file or a folder to disk (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. folders on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_json(path, obj, **kwargs):
    """Writes ``obj`` as JSON to ``path`` and flushes it to disk before
    returning (``kwargs`` go to ``json.dump``, e.g. ``indent=1``)."""
    with open(path, "w") as f:
        json.dump(obj, f, **kwargs)
        f.flush()
        os.fsync(f.fileno())


def saved_line(out, files):
    """The line that says where a run left its files: the absolute path of
    the folder ``out`` and the names of ``files`` in it."""
    return f"Saved in {os.path.abspath(out)}: {', '.join(files)}"


def _times(ratio):
    """``ratio`` of two budgets in words: "half", "a quarter of", "twice",
    "1.3 times"."""
    words = {1 / 4: "a quarter of", 1 / 3: "a third of", 1 / 2: "half",
             2: "twice", 3: "three times", 4: "four times"}
    for value, text in words.items():
        if abs(ratio / value - 1) < 0.02:
            return text
    return f"{ratio:.2g} times"


def verdict(rows, metric, label, higher_is_better=True, spec=".3f",
            baselines=(), cost="grad_evals", note=""):
    """One sentence: which row is best on ``metric``, the runner-up, the
    margin between them, and what each cost.

    The ranking uses the values in ``rows`` (non-finite ones rank last); the
    margin is the difference of the two best values, printed with
    ``spec``. When a row's ``cost`` differs from the winner's by more than
    2 %, the sentence says so, as a ratio of the winner's.

    Args:
      rows: dicts with ``"method"``, ``metric`` and ``cost`` (gradient
        evaluations as gradhpo counted them); at least two.
      metric: the key the example selects on (e.g. ``"test_acc"``).
      label: the metric in words (e.g. ``"test accuracy"``).
      higher_is_better: False for losses and perplexities.
      spec: the format of the values and the margin.
      baselines: the names of the baseline rows (named "the baseline
        NAME", so that a winning baseline is seen as one).
      cost: the key of the cost.
      note: a clause appended before the full stop.
    """
    if len(rows) < 2:
        raise ValueError("a verdict compares at least two rows")
    sign = 1.0 if higher_is_better else -1.0

    def key(row):
        value = float(row[metric])
        return sign * value if math.isfinite(value) else -math.inf
    best, second = sorted(rows, key=key, reverse=True)[:2]
    margin = abs(float(best[metric]) - float(second[metric]))

    def name(row):
        return (f"the baseline {row['method']}" if row["method"] in baselines
                else row["method"])

    def at(row):
        return f"{float(row[metric]):{spec}} at {float(row[cost]):.0f} G"
    if format(margin, spec) == format(0.0, spec):
        text = (f"Verdict: {name(best)} and {name(second)} tie on {label} "
                f"({at(best)} and {at(second)}; margin "
                f"{margin:{spec}})")
    else:
        text = (f"Verdict: {name(best)} wins on {label} ({at(best)}), ahead "
                f"of the runner-up, {name(second)} ({at(second)}), by "
                f"{margin:{spec}}")
    budget = float(best[cost])
    differ = [(r["method"], float(r[cost]) / budget) for r in rows
              if r is not best and budget > 0
              and abs(float(r[cost]) / budget - 1) > 0.02]
    if differ:
        text += ("; the budgets differ: " + ", ".join(
            f"{n} used {_times(ratio)} the gradient evaluations of "
            f"{best['method']}" for n, ratio in differ))
    else:
        text += "; every compared row used the same budget"
    return text + (f"; {note}" if note else "") + "."


# -- plots --------------------------------------------------------------------

#: Colours of the methods (matplotlib's "tab10" without its grey) and of the
#: baselines (black and greys), so a method keeps its colour in every panel.
METHOD_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
                  "#8c564b", "#e377c2", "#17becf", "#bcbd22")
BASELINE_PALETTE = ("#000000", "#7f7f7f", "#b0b0b0", "#505050")


def method_colours(methods, baselines=()):
    """``{name: colour}``: the methods in :data:`METHOD_PALETTE`'s order, the
    baselines in black and greys; use one map for all plots of an example."""
    colours, i, j = {}, 0, 0
    for name in methods:
        if name in baselines:
            colours[name] = BASELINE_PALETTE[j % len(BASELINE_PALETTE)]
            j += 1
        else:
            colours[name] = METHOD_PALETTE[i % len(METHOD_PALETTE)]
            i += 1
    for name in baselines:
        if name not in colours:
            colours[name] = BASELINE_PALETTE[j % len(BASELINE_PALETTE)]
            j += 1
    return colours


def dataset_name(data_dir):
    """The data set of the digit examples in words, for plot titles."""
    if data_dir:
        return f"MNIST ({os.path.basename(os.path.normpath(data_dir))})"
    return "scikit-learn digits (8x8)"


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no window)."""
    import matplotlib    # imported here: parsing flags stays light
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def legend_below(fig, handles=None, labels=None, ncol=3):
    """One legend for the whole figure, below its panels, so that it hides
    no data (call before ``savefig``; the figure needs
    ``layout="constrained"``)."""
    if handles is None:
        seen = {}
        for ax in fig.axes:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(lab, h)
        labels, handles = list(seen), list(seen.values())
    return fig.legend(handles, labels, loc="outside lower center",
                      ncol=min(ncol, max(1, len(labels))), fontsize=8,
                      frameon=False)


# -- command-line types -------------------------------------------------------
#
# ``type=`` functions for argparse: a bad value raises ArgumentTypeError, so
# the parser exits with its usage message and status 2, naming the flag
# (argparse adds "argument --flag: "), the value and what is allowed.

def _fail(what, text):
    raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}")


def int_in(low=None, high=None, what=None):
    """A type function for integers in ``[low, high]`` (None: unbounded)."""
    if what is None:
        what = (f"an integer in [{low}, {high}]" if high is not None
                else f"an integer >= {low}" if low is not None
                else "an integer")

    def parse(text):
        try:
            value = int(text)
        except (TypeError, ValueError):
            _fail(what, text)
        if (low is not None and value < low) or (
                high is not None and value > high):
            _fail(what, text)
        return value
    parse.__name__ = what
    return parse


def float_in(low=None, high=None, low_open=False, high_open=False,
             what=None):
    """A type function for finite floats in the interval from ``low`` to
    ``high`` (None: unbounded; ``*_open``: the end is excluded). NaN and
    infinities are always refused."""
    if what is None:
        what = "a finite number"
        if low is not None and high is not None:
            what += (f" in {'(' if low_open else '['}{low:g}, {high:g}"
                     f"{')' if high_open else ']'}")
        elif low is not None:
            what += f" {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            what += f" {'<' if high_open else '<='} {high:g}"

    def parse(text):
        try:
            value = float(text)
        except (TypeError, ValueError):
            _fail(what, text)
        if not math.isfinite(value):
            _fail(what, text)
        if low is not None and (value < low or (low_open and value == low)):
            _fail(what, text)
        if high is not None and (value > high
                                 or (high_open and value == high)):
            _fail(what, text)
        return value
    parse.__name__ = what
    return parse


#: Sizes, counts, steps, intervals: 1, 2, ...
positive_int = int_in(1, what="a positive integer (>= 1)")
#: Counts where 0 means "all" or "none": 0, 1, ...
nonnegative_int = int_in(0, what="an integer >= 0")
#: Seeds: JAX's ``PRNGKey`` takes 32 bits (larger seeds wrap around) and
#: numpy's seed sequences refuse negative ones.
seed_int = int_in(0, 2 ** 32 - 1, what="an integer in [0, 2**32 - 1]")
#: Learning rates, step sizes, scales: finite and > 0 (nan and inf refused).
positive_float = float_in(0.0, low_open=True)
#: Finite and >= 0.
nonnegative_float = float_in(0.0)
#: Any finite number (initial values of log-parametrised hyperparameters).
finite_float = float_in()
#: Fractions and discounts: [0, 1].
fraction = float_in(0.0, 1.0)
#: Probabilities that pass through a logit: (0, 1).
open_fraction = float_in(0.0, 1.0, low_open=True, high_open=True)


def _items(text):
    return [t.strip() for t in str(text).split(",") if t.strip()]


def name_list(known, what="method"):
    """A type function for a comma-separated subset of ``known`` names.

    Returns the names joined by commas (blanks and repeats dropped), so the
    flag stays a string; unknown names and an empty list are refused.
    """
    known = tuple(known)
    choices = ", ".join(known)

    def parse(text):
        names = list(dict.fromkeys(_items(text)))
        if not names:
            raise argparse.ArgumentTypeError(
                f"must name at least one {what} (comma-separated, from "
                f"{choices}); got {text!r}")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what}{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))} in {text!r}; choose "
                f"(comma-separated) from {choices}")
        return ",".join(names)
    parse.__name__ = f"{what} list"
    return parse


def number_list(item_type):
    """A type function for a non-empty comma-separated list of numbers, each
    checked by ``item_type`` (e.g. :data:`positive_float`); returns the
    items joined by commas (blanks dropped), so the flag stays a string."""
    def parse(text):
        items = _items(text)
        if not items:
            raise argparse.ArgumentTypeError(
                f"must be a non-empty comma-separated list, every item "
                f"{item_type.__name__}; got {text!r}")
        for item in items:
            try:
                item_type(item)
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(
                    f"every item {e} (in {text!r})") from None
        return ",".join(items)
    parse.__name__ = f"list of {item_type.__name__}"
    return parse


if __name__ == "__main__":
    support_module_main(__doc__, "cli.py is a support module: the command-line "
                        "helpers of the examples; it has nothing to run. Run "
                        "an example, e.g. python examples/mnist.py --help.")
