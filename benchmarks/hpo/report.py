"""The summary table, paired statistics and plots of ``hpo.json`` rows."""

import collections
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

#: Wilcoxon tests need at least this many paired seeds.
MIN_SEEDS_FOR_TEST = 5


def summarize(rows: Sequence[Dict]) -> List[Dict]:
    """Mean and std (ddof 1; 0 for one seed) of the test accuracy and the
    test loss, and the mean counted cost, per (task, method, budget)."""
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["task"], r["method"], r["budget"])].append(r)
    out = []
    for (task, method, budget), rs in sorted(groups.items()):
        acc = np.array([r["test_accuracy"] for r in rs])
        loss = np.array([r["test_loss"] for r in rs])
        out.append(dict(
            task=task, method=method, budget=budget, seeds=len(rs),
            acc_mean=float(acc.mean()),
            acc_std=float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
            loss_mean=float(loss.mean()),
            loss_std=float(loss.std(ddof=1)) if len(rs) > 1 else 0.0,
            grad_evals_mean=float(np.mean([r["grad_evals"] for r in rs])),
            seconds_mean=float(np.mean([r["seconds"] for r in rs]))))
    return out


def wilcoxon_vs(rows: Sequence[Dict], baseline: str = "tpe"
                ) -> List[Dict]:
    """Two-sided Wilcoxon signed-rank p-values of each ``gh_*`` method's
    test accuracy against ``baseline``, paired by seed, per (task, budget)
    with at least :data:`MIN_SEEDS_FOR_TEST` common seeds."""
    from scipy import stats
    acc = {(r["task"], r["method"], r["budget"], r["seed"]):
           r["test_accuracy"] for r in rows}
    out = []
    keys = sorted({(r["task"], r["method"], r["budget"]) for r in rows
                   if r["method"].startswith("gh_")})
    for task, method, budget in keys:
        seeds = sorted(s for (t, m, b, s) in acc
                       if (t, m, b) == (task, method, budget)
                       and (task, baseline, budget, s) in acc)
        if len(seeds) < MIN_SEEDS_FOR_TEST:
            continue
        a = np.array([acc[(task, method, budget, s)] for s in seeds])
        b = np.array([acc[(task, baseline, budget, s)] for s in seeds])
        if np.all(a == b):
            p = 1.0
        else:
            p = float(stats.wilcoxon(a, b).pvalue)
        out.append(dict(task=task, method=method, baseline=baseline,
                        budget=budget, seeds=len(seeds),
                        mean_difference=float(np.mean(a - b)), p_value=p))
    return out


def format_table(summary: Sequence[Dict],
                 tests: Optional[Sequence[Dict]] = None) -> str:
    """A plain-text table of :func:`summarize` (and the p-values)."""
    lines = [f"{'task':<20}{'method':<24}{'budget':>7}{'seeds':>6}"
             f"{'test acc (mean ± std)':>24}{'test loss':>18}"
             f"{'G (mean)':>10}{'s':>7}"]
    for s in summary:
        lines.append(
            f"{s['task']:<20}{s['method']:<24}{s['budget']:>6}×"
            f"{s['seeds']:>6}{s['acc_mean']:>15.4f} ± {s['acc_std']:.4f}"
            f"{s['loss_mean']:>10.4f} ± {s['loss_std']:.3f}"
            f"{s['grad_evals_mean']:>10.0f}{s['seconds_mean']:>7.1f}")
    if tests:
        lines.append("")
        lines.append("Wilcoxon signed-rank vs tpe (paired seeds):")
        for t in tests:
            lines.append(
                f"  {t['task']} {t['method']} {t['budget']}×: "
                f"mean diff {t['mean_difference']:+.4f}, "
                f"p = {t['p_value']:.3g} ({t['seeds']} seeds)")
    elif tests is not None:
        lines.append(f"(no Wilcoxon test: fewer than {MIN_SEEDS_FOR_TEST} "
                     "seeds)")
    return "\n".join(lines)


#: One fixed colour per method, the same in every task's plot: gradhpo
#: methods in blues/greens/purples, Optuna in oranges/reds, controls grey.
COLOURS = {
    "gh_t1t2": "#1f77b4", "gh_t1t2_per_weight": "#17becf",
    "gh_greedy": "#2ca02c", "gh_implicit": "#9467bd",
    "gh_implicit_per_weight": "#c5b0d5", "gh_forward_mode": "#8c564b",
    "gh_forward_mode_every_step": "#c49c94",
    "gh_hyperdistill": "#bcbd22", "gh_population": "#393b79",
    "random": "#ff7f0e", "tpe": "#d62728", "tpe_sh": "#e377c2",
    "default": "#7f7f7f", "default_full_budget": "#404040",
    "oracle": "#000000"}


def style(method: str):
    """(colour, line style) of a method: solid for gradhpo, dashed for
    Optuna and the controls."""
    return (COLOURS.get(method, "#aec7e8"),
            "-" if method.startswith("gh_") else "--")


def merge(results: Sequence[Dict]) -> Dict:
    """One ``hpo.json`` from several runs (for example one per task): the
    rows concatenated, each run's configuration kept under ``runs``; the
    summary and the tests are recomputed by the caller. A (task, method,
    budget, seed) measured by two runs (the 1x references of a second
    run) must agree exactly; it is kept once."""
    rows, runs, seen = [], [], {}
    for r in results:
        # a merged result brings its runs, not a nested record of them
        runs.extend(r["config"]["runs"] if r["config"].get("merged")
                    else [r["config"]])
        for row in r["rows"]:
            key = (row["task"], row["method"], row["budget"], row["seed"])
            if key in seen:
                if seen[key] != row["test_accuracy"]:
                    raise ValueError(
                        f"the runs overlap and disagree: {key} has test "
                        f"accuracy {seen[key]} and {row['test_accuracy']}")
                continue
            seen[key] = row["test_accuracy"]
            rows.append(row)
    datasets = {}
    for c in runs:
        datasets.update(c.get("datasets", {}))
    config = dict(merged=True, runs=runs, datasets=datasets,
                  tasks=sorted({r["task"] for r in rows}),
                  total_seconds=sum(c.get("total_seconds", 0.0)
                                    for c in runs))
    for key in ("budget_unit", "cost_rules"):
        config[key] = runs[0].get(key)
    return dict(config=config, environment=results[0]["environment"],
                rows=rows)


def _zoom(ax, rows: Sequence[Dict], key: str) -> None:
    """Limits the y axis to where most means lie (a method that failed
    would otherwise flatten every other curve) and names each mean left
    off the axis, with its value, at the edge it lies beyond."""
    means = np.array([s[f"{key}_mean"] for s in rows])
    lo, hi = np.percentile(means, [10, 90])
    span = max(hi - lo, 1e-3)
    bottom = max(means.min(), lo - 1.5 * span)
    top = min(means.max(), hi + 1.5 * span)
    pad = 0.08 * (top - bottom)
    ax.set_ylim(bottom - pad, top + pad)
    stacked = {"low": 0, "high": 0}
    for s in rows:
        v = s[f"{key}_mean"]
        if bottom - pad <= v <= top + pad:
            continue
        side = "low" if v < bottom else "high"
        edge = bottom - pad if side == "low" else top + pad
        step = 9 * stacked[side] * (1 if side == "low" else -1)
        stacked[side] += 1
        ax.annotate(f"{s['method']} {s['budget']}×: {v:.3g} (off scale)",
                    (0.5, edge), xycoords=("axes fraction", "data"),
                    xytext=(0, step), textcoords="offset points",
                    fontsize=7, color=style(s["method"])[0], ha="center",
                    va="bottom" if side == "low" else "top")


def plot(summary: Sequence[Dict], datasets: Dict[str, str],
         out_dir: str) -> List[str]:
    """One PNG per task, two panels: test accuracy and test loss (mean ±
    std over seeds) against the budget, one fixed colour per method
    (:data:`COLOURS`); references trained once as dotted horizontal lines.
    Returns the written paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for task in sorted({s["task"] for s in summary}):
        rows = [s for s in summary if s["task"] == task]
        methods = sorted({s["method"] for s in rows})
        budgets = sorted({s["budget"] for s in rows})
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, key, label in ((axes[0], "acc", "test accuracy"),
                               (axes[1], "loss", "test loss (cross-entropy)")):
            for method in methods:
                ms = sorted((s for s in rows if s["method"] == method),
                            key=lambda s: s["budget"])
                c, ls = style(method)
                if len(ms) == 1 and len(budgets) > 1:
                    ax.axhline(ms[0][f"{key}_mean"], color=c, ls=":",
                               label=f"{method} (trained once, 1×)")
                    continue
                ax.errorbar([s["budget"] for s in ms],
                            [s[f"{key}_mean"] for s in ms],
                            yerr=[s[f"{key}_std"] for s in ms], color=c,
                            ls=ls, capsize=3, label=method,
                            marker="o" if method.startswith("gh_") else "s")
            _zoom(ax, rows, key)
            ax.set_xscale("log")
            ax.set_xticks(budgets)
            ax.set_xticklabels([f"{b}×" for b in budgets])
            ax.minorticks_off()
            ax.set_xlabel("budget (× one S-step run, counted in G)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        seeds = max(s["seeds"] for s in rows)
        fig.suptitle(f"{task} on {datasets.get(task, '?')}: mean ± std over "
                     f"{seeds} seed(s); gradhpo solid, Optuna and controls "
                     "dashed")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=7, loc="center right")
        fig.tight_layout(rect=(0, 0, 0.83, 1))
        path = os.path.join(out_dir, f"{task}_accuracy.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def headline(summary: Sequence[Dict], budgets=(3, 10)) -> str:
    """A markdown table for a summary: per task and budget, ``gh_t1t2``,
    the best gradhpo row, ``tpe``, and the best of the other non-gradhpo
    rows (Optuna and ``default_full_budget``), by mean test accuracy (loss
    in brackets), with the margin of the best gradhpo row over the best
    baseline (both bests are picked after the fact, on test means)."""
    lines = ["| task | budget | T1–T2 | best gradhpo row | tpe "
             "| best other baseline | best gradhpo − best baseline |",
             "|---|---|---|---|---|---|---|"]
    for task in sorted({s["task"] for s in summary}):
        for budget in budgets:
            rows = [s for s in summary if s["task"] == task
                    and s["budget"] == budget]
            if not rows:
                continue
            gh = max((s for s in rows if s["method"].startswith("gh_")),
                     key=lambda s: s["acc_mean"])
            tpe = [s for s in rows if s["method"] == "tpe"]
            others = [s for s in rows if not s["method"].startswith("gh_")
                      and s["method"] != "tpe"]
            base = max(tpe + others, key=lambda s: s["acc_mean"])
            other = max(others, key=lambda s: s["acc_mean"])

            def cell(s):
                return (f"{s['method']} {s['acc_mean']:.4f} "
                        f"({s['loss_mean']:.3f})")
            t1t2 = [s for s in rows if s["method"] == "gh_t1t2"][0]
            lines.append(
                f"| {task} | {budget}× | {t1t2['acc_mean']:.4f} "
                f"({t1t2['loss_mean']:.3f}) | {cell(gh)} | "
                f"{tpe[0]['acc_mean']:.4f} ({tpe[0]['loss_mean']:.3f}) | "
                f"{cell(other)} | "
                f"{100 * (gh['acc_mean'] - base['acc_mean']):+.2f} points |")
    return "\n".join(lines)
