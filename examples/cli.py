"""The examples' command-line helpers; imports only the standard library,
so that a script can parse its flags (and answer ``--help`` or a usage error)
before it imports JAX.

- ``type=`` functions for argparse (:func:`int_in`, :func:`float_in`,
  :func:`name_list`, :func:`number_list` and the ready-made ones);
- :func:`fill_defaults` and :func:`quick_help`: ``--quick`` changes only the
  defaults of the flags not given on the command line;
- :func:`progress`: a tqdm bar that is off when stderr is not a terminal;
- :func:`support_module_main`: a small ``--help`` for the modules that are
  not examples themselves.

``common.py`` re-exports the type functions under their old names.
"""

import argparse
import math
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
