"""The convergence benchmark's machinery, on a few steps: a run of each kind
gives a record, the same seed gives the same start in every setting, and the
summary's gaps and targets are what their definitions say."""

import importlib.util
import math
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def convergence():
    spec = importlib.util.spec_from_file_location("convergence", ROOT / "benchmarks" / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_give_records_and_share_their_start(convergence):
    exact = convergence.train("vit", "exact", 0, steps=3)
    mesa = convergence.train("vit", "8", 0, steps=3)
    for r in (exact, mesa):
        assert r["steps"] == 3 and len(r["curve"]) == 3 and math.isfinite(r["val_loss"])
    # same weights and batch at step 0, and the forward is exact: same first loss
    assert exact["curve"][0] == mesa["curve"][0]
    assert 0.99 < exact["trained_worst_cosine"] <= 1.0 and "trained_worst_cosine" not in mesa


def test_summary_gaps_and_targets(convergence):
    def rec(setting, seed, loss):
        return {"task": "t", "setting": setting, "seed": seed, "steps": 1, "val_loss": loss, "curve": [loss]}

    exact = [2.0, 2.1, 1.9]
    results = [rec("exact", i, v) for i, v in enumerate(exact)]
    results += [rec("8", i, v) for i, v in enumerate([2.05, 2.1, 2.05])]   # +1.7%: inside the spread 0.2
    results += [rec("4", i, v) for i, v in enumerate([2.5, 2.5, 2.5])]     # +25%: outside 2% and the spread
    results += [rec("2", i, v) for i, v in enumerate([1.5, 1.6, 1.7])]     # better: no target at 2 bits
    rows = {r["setting"]: r for r in convergence.summarize(results)}
    e_mean = statistics.fmean(exact)
    assert rows["8"]["gap"] == pytest.approx((statistics.fmean([2.05, 2.1, 2.05]) - e_mean) / e_mean)
    assert rows["8"]["met"] is True and rows["4"]["met"] is False and rows["2"]["met"] is None
    assert rows["8"]["spread_only"] is True  # +1.7% > 1%: met through the exact spread alone
    assert rows["exact"]["exact_spread"] == pytest.approx(0.2)
    # paired by seed: 2.05 > 2.0, 2.1 = 2.1, 2.05 > 1.9
    assert (rows["8"]["worse_seeds"], rows["8"]["paired_seeds"]) == (2, 3)
    assert rows["2"]["worse_seeds"] == 0
    text = convergence.markdown(list(rows.values()), "cmd")
    assert "**no**" in text and text.count("| t |") == 4


def test_replace_section_keeps_the_rest_of_the_file(tmp_path):
    from torch_mesa.tools.bench import replace_section

    doc = tmp_path / "b.md"
    doc.write_text("# B\n\nintro\n\n<!-- t:start -->\nold\n<!-- t:end -->\n\n## After\n\ntail\n")
    replace_section(doc, "t", "new table")
    assert doc.read_text() == "# B\n\nintro\n\n<!-- t:start -->\nnew table\n<!-- t:end -->\n\n## After\n\ntail\n"
    replace_section(doc, "u", "other", heading="U")  # missing markers: appended under a heading
    assert doc.read_text().endswith("tail\n\n## U\n\n<!-- u:start -->\nother\n<!-- u:end -->\n")
    assert doc.read_text().count("new table") == 1
