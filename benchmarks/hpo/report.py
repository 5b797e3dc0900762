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
    counted cost per (task, method, budget)."""
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["task"], r["method"], r["budget"])].append(r)
    out = []
    for (task, method, budget), rs in sorted(groups.items()):
        acc = np.array([r["test_accuracy"] for r in rs])
        out.append(dict(
            task=task, method=method, budget=budget, seeds=len(rs),
            acc_mean=float(acc.mean()),
            acc_std=float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
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
    lines = [f"{'task':<16}{'method':<22}{'budget':>7}{'seeds':>6}"
             f"{'test acc (mean ± std)':>24}{'G (mean)':>11}{'s':>8}"]
    for s in summary:
        lines.append(
            f"{s['task']:<16}{s['method']:<22}{s['budget']:>6}×"
            f"{s['seeds']:>6}{s['acc_mean']:>15.4f} ± {s['acc_std']:.4f}"
            f"{s['grad_evals_mean']:>11.0f}{s['seconds_mean']:>8.1f}")
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


def plot(summary: Sequence[Dict], datasets: Dict[str, str],
         out_dir: str) -> List[str]:
    """One PNG per task: test accuracy (mean ± std over seeds) against the
    budget, one colour per method; references (trained once) as dashed
    horizontal lines. Returns the written paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for task in sorted({s["task"] for s in summary}):
        rows = [s for s in summary if s["task"] == task]
        methods = sorted({s["method"] for s in rows})
        colours = plt.get_cmap("tab10")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        budgets = sorted({s["budget"] for s in rows})
        for i, method in enumerate(methods):
            ms = sorted((s for s in rows if s["method"] == method),
                        key=lambda s: s["budget"])
            c = colours(i % 10)
            if len(ms) == 1 and len(budgets) > 1:
                ax.axhline(ms[0]["acc_mean"], color=c, ls="--",
                           label=f"{method} (1×)")
                continue
            ax.errorbar([s["budget"] for s in ms],
                        [s["acc_mean"] for s in ms],
                        yerr=[s["acc_std"] for s in ms], color=c,
                        marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xticks(budgets)
        ax.set_xticklabels([f"{b}×" for b in budgets])
        ax.set_xlabel("budget (multiples of one S-step training run, "
                      "counted in gradient evaluations)")
        ax.set_ylabel("test accuracy")
        seeds = max(s["seeds"] for s in rows)
        ax.set_title(f"{task} on {datasets.get(task, '?')} "
                     f"(mean ± std over {seeds} seed(s))")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{task}_accuracy.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)
