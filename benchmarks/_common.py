"""Shared helpers for the benchmarks: cases, alternating timing, reports.

A benchmark is a list of :class:`Case` objects. Each case builds a jitted
step closure ``fn(carry, *args) -> carry`` and its first inputs; the timer
compiles and warms every case up, then for ``rounds`` rounds times each case
once, in a rotating order, feeding each output carry back as the next input
(so no result can be cached and the device is never idle between a dispatch
and its use). Because the machine is shared and absolute times are noisy,
what is reported is the median over rounds of the per-round ratio of a case to
the baseline case (and to the case's hand-written reference): a slow-down of
the machine during one round affects numerator and denominator alike.

These helpers are deliberately independent of gradhpo so that later
benchmarks (Greedy, HyperDistill, warm starts) can reuse them.
"""

import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax

#: ``build(problem) -> (fn, carry0, args)`` where ``fn`` is jitted and
#: ``fn(carry, *args)`` returns the next carry (any pytree of arrays).
BuildFn = Callable[[Any], Tuple[Callable[..., Any], Any, Tuple[Any, ...]]]


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of a benchmark table.

    Attributes:
      name: short identifier (JSON key and table row).
      build: ``build(problem) -> (fn, carry0, args)``; see :data:`BuildFn`.
      reference: name of the case this one is compared with (its
        hand-written counterpart), or ``None``.
      goal_vs_base: upper bound on the median ratio to the baseline case,
        or ``None`` for no goal.
      goal_vs_reference: upper bound on the median ratio to ``reference``.
      per_call: how many units of work one call of ``fn`` performs (e.g. a
        Greedy step over a horizon of K inner steps counts K); times and
        ratios are reported per unit.
      description: one line for the table legend.
    """

    name: str
    build: BuildFn
    reference: Optional[str] = None
    goal_vs_base: Optional[float] = None
    goal_vs_reference: Optional[float] = None
    per_call: int = 1
    description: str = ""


@dataclasses.dataclass
class Built:
    """A compiled case ready to be timed."""

    case: Case
    fn: Callable[..., Any]
    carry: Any
    args: Tuple[Any, ...]
    compile_seconds: float = 0.0
    calls: int = 1


def block(tree: Any) -> Any:
    """Waits until every array of ``tree`` is computed."""
    return jax.block_until_ready(tree)


def build_cases(cases: Sequence[Case], problem: Any,
                warmup: int = 3,
                log: Callable[[str], None] = print) -> List[Built]:
    """Builds, compiles and warms up every case.

    A case whose build raises is skipped with a message (optional
    algorithms that do not exist yet, or whose API changed), so a benchmark
    never fails because of one row.
    """
    built = []
    for case in cases:
        try:
            start = time.perf_counter()
            fn, carry, args = case.build(problem)
            carry = block(fn(carry, *args))   # compiles
            compile_s = time.perf_counter() - start
            for _ in range(warmup):
                carry = block(fn(carry, *args))
        except Exception as err:  # noqa: BLE001 -- report and skip the row
            log(f"  skipping {case.name}: {type(err).__name__}: {err}")
            continue
        built.append(Built(case, fn, carry, args, compile_s))
    return built


def time_alternating(built: Sequence[Built], rounds: int
                     ) -> Dict[str, List[float]]:
    """Per-round seconds per unit of work of every case, alternating.

    Round ``r`` times the cases in the order rotated by ``r`` (so no case is
    always first or always after the same neighbour); each sample is
    ``b.calls`` consecutive calls, each fed the previous output.

    Returns:
      ``{name: [seconds per unit in round 0, round 1, ...]}``.
    """
    times: Dict[str, List[float]] = {b.case.name: [] for b in built}
    n = len(built)
    for r in range(rounds):
        for i in range(n):
            b = built[(i + r) % n]
            carry = b.carry
            start = time.perf_counter()
            for _ in range(b.calls):
                carry = b.fn(carry, *b.args)
            block(carry)
            elapsed = time.perf_counter() - start
            b.carry = carry
            times[b.case.name].append(
                elapsed / (b.calls * b.case.per_call))
    return times


def calibrate_calls(built: Sequence[Built], sample_seconds: float,
                    calls: int = 0) -> Dict[str, int]:
    """Sets how many calls make one timed sample of each case.

    Very short samples are dominated by dispatch jitter and timer
    resolution, so each case gets enough consecutive calls for a sample of
    about ``sample_seconds`` (at least one; a case slower than that is timed
    one call per round, which keeps slow rows from dominating the run).
    ``calls > 0`` forces the same number for every case.

    Returns:
      ``{name: calls}``.
    """
    for b in built:
        if calls > 0:
            b.calls = calls
            continue
        reps = 2
        carry = b.carry
        start = time.perf_counter()
        for _ in range(reps):
            carry = b.fn(carry, *b.args)
        block(carry)
        b.carry = carry
        per_call = (time.perf_counter() - start) / reps
        b.calls = max(1, int(round(sample_seconds / max(per_call, 1e-9))))
    return {b.case.name: b.calls for b in built}


def summarize(built: Sequence[Built], times: Dict[str, List[float]],
              base: str) -> List[Dict[str, Any]]:
    """Median seconds and median per-round ratios, with goal checks."""
    rows = []
    for b in built:
        c = b.case
        own = times[c.name]
        row: Dict[str, Any] = {
            "name": c.name,
            "description": c.description,
            "reference": c.reference,
            "per_call": c.per_call,
            "calls_per_sample": b.calls,
            "compile_seconds": b.compile_seconds,
            "median_seconds": statistics.median(own),
            "min_seconds": min(own),
            "ratio_vs_base": _median_ratio(own, times[base]),
            "ratio_vs_base_iqr": _ratio_iqr(own, times[base]),
            "ratio_vs_reference": None,
            "goal_vs_base": c.goal_vs_base,
            "goal_vs_reference": c.goal_vs_reference,
        }
        if c.reference is not None and c.reference in times:
            row["ratio_vs_reference"] = _median_ratio(own, times[c.reference])
        row["pass_vs_base"] = _check(row["ratio_vs_base"], c.goal_vs_base)
        row["pass_vs_reference"] = _check(row["ratio_vs_reference"],
                                          c.goal_vs_reference)
        rows.append(row)
    return rows


def _median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def _ratio_iqr(num: Sequence[float], den: Sequence[float]
               ) -> Tuple[float, float]:
    ratios = sorted(a / b for a, b in zip(num, den))
    if len(ratios) < 4:
        return ratios[0], ratios[-1]
    q = statistics.quantiles(ratios, n=4)
    return q[0], q[2]


def _check(value: Optional[float], goal: Optional[float]) -> Optional[bool]:
    if value is None or goal is None:
        return None
    return bool(value <= goal)


def format_table(rows: Sequence[Dict[str, Any]], base: str) -> str:
    """A fixed-width table of the summarised rows."""
    header = (f"{'case':<22} {'median ms':>10} {'x ' + base:>10} "
              f"{'IQR':>13} {'goal':>6} {'vs ref':>8} {'goal':>6}  ok")
    lines = [header, "-" * len(header)]
    for r in rows:
        lo, hi = r["ratio_vs_base_iqr"]
        ref = r["ratio_vs_reference"]
        ok = [v for v in (r["pass_vs_base"], r["pass_vs_reference"])
              if v is not None]
        lines.append(
            f"{r['name']:<22} {1e3 * r['median_seconds']:>10.3f} "
            f"{r['ratio_vs_base']:>10.3f} "
            f"{f'{lo:.2f}-{hi:.2f}':>13} "
            f"{_fmt_goal(r['goal_vs_base']):>6} "
            f"{'' if ref is None else f'{ref:.3f}':>8} "
            f"{_fmt_goal(r['goal_vs_reference']):>6}  "
            f"{'' if not ok else ('yes' if all(ok) else 'NO')}")
    legend = [f"  {r['name']}: {r['description']}"
              + (f" (vs {r['reference']})" if r['reference'] else "")
              for r in rows if r["description"]]
    return "\n".join(lines + [""] + legend)


def _fmt_goal(goal: Optional[float]) -> str:
    return "" if goal is None else f"<={goal:g}"


def environment() -> Dict[str, Any]:
    """Versions and devices, for the JSON report."""
    import optax
    return {
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "optax": optax.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "machine": platform.machine(),
    }


def _jaxlib_version() -> Optional[str]:
    try:
        import jaxlib
        return jaxlib.__version__
    except ImportError:  # pragma: no cover
        return None


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Writes ``payload`` as indented JSON (creating the directory)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def hlo_stats(fn: Callable[..., Any], *args: Any) -> Dict[str, Any]:
    """Op counts and XLA's cost estimate of a jitted ``fn`` at ``args``.

    Deterministic (independent of machine load), so a library step and its
    hand-written counterpart can be compared exactly: flops, bytes accessed,
    and the number of fusions, dots/convolutions, selects, converts and
    reductions in the optimised HLO.
    """
    compiled = fn.lower(*args).compile()
    text = compiled.as_text()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    ops = {}
    for op in ("fusion", "dot", "convolution", "select", "convert", "reduce",
               "copy", "transpose", "while", "custom-call"):
        ops[op] = sum(1 for line in text.splitlines()
                      if f" {op}(" in line and "=" in line)
    return {
        "flops": float(cost.get("flops", float("nan"))),
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        "ops": ops,
        "hlo_lines": len(text.splitlines()),
    }


# --------------------------------------------------------------------------
# Memory and scaling helpers (benchmarks/scaling.py, benchmarks/population.py)


def proc_status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``"VmHWM"``, ``"VmRSS"``)
    in bytes; 0 where the file does not exist (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return 1024 * int(line.split()[1])
    except OSError:  # pragma: no cover -- not Linux
        pass
    return 0


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes.

    ``VmHWM`` (reset by :func:`reset_peak_rss`), falling back to
    ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (kilobytes on Linux).
    """
    peak = proc_status_bytes("VmHWM")
    if peak:
        return peak
    import resource  # pragma: no cover -- not Linux
    return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> bool:
    """Resets ``VmHWM`` to the current resident size (Linux >= 4.0).

    Returns whether it worked; the peak of a later phase can then be read
    separately from the peaks of the phases before it.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:  # pragma: no cover -- not Linux, or not permitted
        return False


def available_memory_bytes() -> Optional[int]:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return 1024 * int(line.split()[1])
    except OSError:  # pragma: no cover -- not Linux
        pass
    return None


def load_average() -> Optional[Tuple[float, float, float]]:
    """The 1, 5 and 15 minute load averages (the machine may be shared)."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return None


def loglog_fit(sizes: Sequence[float], seconds: Sequence[float]
               ) -> Dict[str, float]:
    """Least-squares fit of ``log10 t = slope * log10 n + intercept``.

    A slope of 1 means time proportional to size. Returns ``slope``,
    ``intercept`` and the coefficient of determination ``r2`` (NaN with
    fewer than two points).
    """
    import math
    xs = [math.log10(n) for n in sizes]
    ys = [math.log10(t) for t in seconds]
    if len(xs) < 2:
        nan = float("nan")
        return {"slope": nan, "intercept": nan, "r2": nan, "points": len(xs)}
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"slope": slope, "intercept": intercept, "r2": r2,
            "points": len(xs)}
