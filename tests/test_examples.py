"""End-to-end runs of the README example and the bundled examples."""

import pathlib
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def test_readme_opens_with_two_commands():
    text = (ROOT / "README.md").read_text()
    # the first fenced block (.ci/run runs it; only a title may precede it)
    block = re.match(r"(?:# [^\n]*\n\n)?```bash\n(.*?)```", text, re.S)
    assert block, "README.md must open with a bash code block"
    commands = block.group(1).strip().splitlines()
    assert len(commands) == 2
    assert commands[0].startswith("pip install -e") and "python " in \
        commands[0]
    assert "pytest" in commands[1]


def test_readme_example_tunes_the_penalty(capsys):
    """The README's Python example runs as written and lowers the penalty
    (the data are nearly noise-free, so less regularisation validates
    better) and the validation loss against the untuned start."""
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    state, opt = namespace["state"], namespace["opt"]
    assert float(state.hyperparams["log_l2"]) < -1.0
    x, y = namespace["x"], namespace["y"]
    start = opt.init(jnp.zeros(6), {"log_l2": jnp.array(0.0)})
    fixed = start
    for _ in range(300):
        fixed = fixed.replace(hyperparams=start.hyperparams)
        fixed = opt.step(fixed, (x[::2], y[::2]), (x[1::2], y[1::2]))
    val = (x[1::2], y[1::2])
    assert (namespace["val_loss"](state.params, None, val)
            < 0.5 * namespace["val_loss"](fixed.params, None, val))
    assert "log_l2" in capsys.readouterr().out


def test_quickstart_improves_validation_loss(capsys):
    import quickstart
    before, after = quickstart.main(["--steps", "400"])
    assert np.isfinite(before) and np.isfinite(after)
    assert after < before
    out = capsys.readouterr().out
    # the verdict compares the test losses of the table, at the same count
    table = {m[1]: float(m[2]) for m in re.finditer(
        r"^(fixed L2|T1-T2 tuned L2) .*? ([0-9.]+) +[0-9.]+ +\d+$", out,
        re.M)}
    assert len(table) == 2, out
    winner = min(table, key=table.get)
    verdict = re.search(r"^Verdict: (?:the baseline )?(.+?) wins on test "
                        r"loss .*?, by ([0-9.]+); every compared row used "
                        r"the same budget\.$", out, re.M)
    assert verdict, out
    assert verdict[1] == winner
    assert float(verdict[2]) == pytest.approx(
        abs(table["fixed L2"] - table["T1-T2 tuned L2"]), abs=2e-4)
    assert "No files written" in out
