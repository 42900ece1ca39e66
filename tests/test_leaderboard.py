"""Leaderboard numbers against hand computation: cells, intervals, significance marks, ranks, Friedman,
``compare``, the sensitivity table, and the one selection of records that leaderboard and report share."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from conftest import make_suite
from harness.cli import main
from harness.errors import UsageError
from harness.reporting.leaderboard import (StatsOptions, column_test, compare, current_records, leaderboard_table,
                                          sensitivity, write_leaderboard, write_leaderboards)
from harness.reporting.stats import holm as stats_holm

T_975_2 = 4.302653  # Student t quantile 0.975 with 2 degrees of freedom (tables)

#: Three seeds of three rows. knn/top1: "best" leads by ~0.2 with a small spread, "a" and "b" are tied with
#: each other far below it -> best is bold. lbfgs/top1: "a" is within noise of "best" -> both tied (italics),
#: "b" is far below -> unmarked.
VALUES = {
    "best": {"knn/top1": [0.90, 0.92, 0.94], "lbfgs/top1": [0.80, 0.85, 0.90]},
    "a": {"knn/top1": [0.70, 0.71, 0.73], "lbfgs/top1": [0.82, 0.83, 0.88]},
    "b": {"knn/top1": [0.71, 0.70, 0.72], "lbfgs/top1": [0.60, 0.66, 0.70]},
}


def record(label: str, seed: int, metrics: dict[str, float], rep_metrics: dict[str, dict] | None = None,
           dataset: str = "digits") -> dict:
    return {"run_id": f"{label}-{dataset}-{seed}", "suite": "syn", "status": "ok", "split_sha256": "a" * 64,
            "train_seconds": 1.0, "train": {"peak_memory_mb": 10.0},
            "spec": {"label": label, "method": label, "dataset": dataset, "seed": seed, "budget": {"epochs": 1},
                     "protocols": {"knn": {"k": 20, "temperature": 0.1}}},
            "metrics": {"backbone": metrics, **(rep_metrics or {})}}


def synthetic_records() -> list[dict]:
    return [record(label, seed, {m: v[seed] for m, v in metrics.items()})
            for label, metrics in VALUES.items() for seed in range(3)]


def test_cells_intervals_marks_and_ranks_by_hand():
    """mean, std (ddof=1), n, the t interval, the rank and which cell is bold or tied, all computed by hand.
    Breakage each assertion catches: std with ddof=0 (0.0163 for best's knn), a z interval (±2.26 instead of
    ±4.97 points), bold on the best mean without a test (lbfgs's best would be bold), no Holm (same here, see
    test_holm_decides_the_mark), marks on the wrong rows."""
    board = leaderboard_table(synthetic_records())
    cells = board.stats.set_index(["row", "metric"])
    best_knn = cells.loc[("best", "knn/top1")]
    assert best_knn["mean"] == pytest.approx(0.92) and best_knn["std"] == pytest.approx(0.02)
    assert best_knn["n"] == 3
    half = T_975_2 * 0.02 / math.sqrt(3)
    assert (best_knn["ci_low"], best_knn["ci_high"]) == pytest.approx((0.92 - half, 0.92 + half), abs=1e-6)
    assert cells.loc[("a", "lbfgs/top1"), "std"] == pytest.approx(np.std([0.82, 0.83, 0.88], ddof=1))
    display = board.display
    assert display.at["best", "digits knn/top1"] == "**92.0 [87.0, 97.0]**"
    assert display.at["a", "digits knn/top1"] == "71.3 [67.5, 75.1]"  # 71.33 ± 4.3027 * 1.528 / sqrt 3
    assert display.at["b", "digits knn/top1"] == "71.0 [68.5, 73.5]"
    assert display.at["best", "digits lbfgs/top1"] == "_85.0 [72.6, 97.4]_"  # best mean, but not significant
    assert display.at["a", "digits lbfgs/top1"].startswith("_84.3 [")  # tied with the best
    assert not display.at["b", "digits lbfgs/top1"].startswith(("_", "*"))
    assert list(display.index) == ["best", "a", "b"] and list(display["rank"]) == ["1.0", "2.0", "3.0"]
    assert dict(cells["mark"].items()) == {("a", "knn/top1"): "", ("a", "lbfgs/top1"): "tied",
                                           ("b", "knn/top1"): "", ("b", "lbfgs/top1"): "",
                                           ("best", "knn/top1"): "best", ("best", "lbfgs/top1"): "tied"}
    assert board.tests == {"paired t"}


def test_holm_decides_the_mark():
    """The p-value against the best is scipy's paired t-test, Holm-adjusted over the column's other rows:
    (p_a, p_b) -> the smaller times 2, the larger times 1 (made monotone). Catches unpaired tests and a
    missing correction."""
    board = leaderboard_table(synthetic_records())
    p = {row: st.ttest_rel(VALUES["best"]["knn/top1"], VALUES[row]["knn/top1"]).pvalue for row in ("a", "b")}
    low, high = sorted(p, key=p.get)
    expected = {low: 2 * p[low], high: max(2 * p[low], p[high])}
    got = board.stats[board.stats["metric"] == "knn/top1"].set_index("row")["p_vs_best"]
    assert got[["a", "b"]].to_dict() == pytest.approx(expected)
    assert math.isnan(got["best"])


def test_marks_follow_the_holm_adjusted_p_values():
    """Two rows below the best by small, steady margins over 4 seeds: each paired t-test alone rejects (p = 0.032
    and 0.026), Holm's correction over the two does not (both 0.052), so both are tied with the best and the
    best is not bold. Catches marks read from the raw p-values."""
    best = np.array([0.90, 0.92, 0.94, 0.93])
    values = pd.DataFrame({"best": best, "a": best - [0.02, 0.06, 0.03, 0.07], "b": best - [0.02, 0.06, 0.03, 0.06]})
    raw = [st.ttest_rel(best, values[row]).pvalue for row in ("a", "b")]
    assert max(raw) < 0.05 < min(np.minimum(1, 2 * np.array(raw)))
    result = column_test(values, values.mean(), alpha=0.05)
    assert result.marks == {"a": "tied", "b": "tied", "best": "tied"}
    assert result.p_vs_best == pytest.approx(dict(zip(("a", "b"), stats_holm(raw))))


def test_the_paired_test_is_chosen_for_the_number_of_comparisons_holm_adjusts():
    """Six seeds: Wilcoxon's smallest p, 2 / 2**6 = 0.031, can reject one comparison at 0.05 but not two after
    Holm (0.0625), so a column with two rows below its best uses the paired t-test for both. Catches the test
    chosen as if each comparison were alone."""
    rng = np.random.default_rng(0)
    best = 0.9 + 0.01 * rng.normal(size=6)
    values = pd.DataFrame({"best": best, "a": best - 0.05 + 0.01 * rng.normal(size=6),
                           "b": best - 0.08 + 0.01 * rng.normal(size=6)})
    result = column_test(values, values.mean(), alpha=0.05)
    assert result.tests == {"paired t"}
    raw = [st.ttest_rel(best, values[row]).pvalue for row in ("a", "b")]
    assert result.p_vs_best == pytest.approx(dict(zip(("a", "b"), stats_holm(raw))))


def test_compare_counts_only_the_testable_columns_as_comparisons():
    """Seven seeds in three columns and one shared seed in a fourth: Holm adjusts three comparisons, where
    Wilcoxon's smallest p, 2 / 2**7 x 3 = 0.047, can still reject, so the three use Wilcoxon and the fourth says
    n<2. Catches the untestable column counted (4 comparisons: 0.0625, the paired t-test)."""
    rng = np.random.default_rng(1)
    records = []
    for seed in range(7):
        for label, shift in (("x", 0.0), ("y", -0.05)):
            metrics = {f"m{i}/top1": 0.8 + shift + 0.01 * rng.normal() for i in range(3)}
            records.append(record(label, seed, metrics | ({"m3/top1": 0.5} if seed == 0 else {})))
    table = compare(records, "x", "y").set_index("column")
    assert table["test"].to_dict() == {"digits m0/top1": "wilcoxon", "digits m1/top1": "wilcoxon",
                                       "digits m2/top1": "wilcoxon", "digits m3/top1": "n<2"}


def test_fewer_than_three_seeds_say_so_and_bootstrap_is_seeded():
    """Two seeds: ``(n<3)`` and no interval in the csv; the bootstrap interval lies within the seeds' range
    and is the same twice. Catches a zero-width or absurdly wide 2-seed interval and an unseeded bootstrap."""
    records = [r for r in synthetic_records() if r["spec"]["seed"] < 2]
    board = leaderboard_table(records)
    assert board.display.at["b", "digits knn/top1"] == "70.5 (n<3)"
    assert board.stats["ci_low"].isna().all() and (board.stats["n"] == 2).all()
    boot = leaderboard_table(synthetic_records(), StatsOptions(ci="bootstrap")).stats.set_index(["row", "metric"])
    low, high = boot.loc[("best", "knn/top1"), ["ci_low", "ci_high"]]
    assert 0.90 <= low < 0.92 < high <= 0.94
    again = leaderboard_table(synthetic_records(), StatsOptions(ci="bootstrap")).stats
    assert again["ci_low"].tolist() == boot["ci_low"].tolist()
    with pytest.raises(UsageError, match="unknown interval method"):
        StatsOptions(ci="normal")
    with pytest.raises(UsageError, match="alpha"):
        StatsOptions(alpha=1.5)


def test_diagram_bars_join_mean_ranks_closer_than_the_critical_difference_only():
    """Demšar (2006, Sec. 3.2.2): two methods differ when their mean ranks differ by at least the critical
    difference, so a bar joins only rows closer than it. Mean ranks 1, 2, 3, 3.5 with CD exactly 1: no bar
    joins 1 and 2 or 2 and 3; one joins 3 and 3.5 (and, with CD a hair above 1, each neighbour pair). Catches
    ``<=`` for ``<`` (a tie at CD joined)."""
    from harness.reporting import stats
    from harness.reporting.leaderboard import SuiteRanks

    friedman = stats.FriedmanResult(np.array([2.0, 1.0, 3.5, 3.0]), 0.0, 1.0, 0.0, 1.0, 5)
    ranks = SuiteRanks(list("abcd"), ["x"], friedman, 1.0, 0.05, [], 1)
    assert ranks.groups() == [(2, 3)]
    assert SuiteRanks(list("abcd"), ["x"], friedman, 1.0 + 1e-9, 0.05, [], 1).groups() == [(0, 1), (1, 2), (2, 3)]


def test_friedman_and_the_critical_difference_diagram(tmp_path):
    """Ranks 1, 2, 3 in both headline columns: chi2_F = 12 N / (k (k+1)) * (sum R^2 - k (k+1)^2 / 4) = 4.0,
    p = exp(-2); CD = 2.343 * sqrt(3 * 4 / (6 * 2)) = 2.343 (Demšar 2006, Table 5). The diagram is written as
    PNG and SVG beside the tables, byte-identical the second time; the csv keeps the interval columns."""
    ranks = leaderboard_table(synthetic_records()).ranks
    assert ranks.friedman.average_ranks.tolist() == [2.0, 3.0, 1.0]  # rows a, b, best (sorted by name)
    assert ranks.friedman.chi2 == pytest.approx(4.0) and ranks.friedman.p_value == pytest.approx(math.exp(-2))
    assert ranks.critical_difference == pytest.approx(2.343, abs=1e-3)
    assert ranks.groups() == [(0, 2)]  # the three mean ranks span 2 < CD: one group
    write_leaderboard(synthetic_records(), "syn", tmp_path)
    first = {ext: (tmp_path / f"syn-cd.{ext}").read_bytes() for ext in ("png", "svg")}
    assert first["png"][:8] == b"\x89PNG\r\n\x1a\n" and b"<svg" in first["svg"]
    write_leaderboard(synthetic_records(), "syn", tmp_path)
    assert first == {ext: (tmp_path / f"syn-cd.{ext}").read_bytes() for ext in ("png", "svg")}
    md = (tmp_path / "syn.md").read_text()
    assert "paired t" in md and "alpha = 0.05" in md and "chi2 = 4.00" in md and "syn-cd.png" in md
    one_row = [r for r in synthetic_records() if r["spec"]["label"] == "best"]
    write_leaderboard(one_row, "syn", tmp_path)  # no Friedman test: the old diagram goes, the table says why
    assert not list(tmp_path.glob("syn-cd.*")) and "No Friedman test" in (tmp_path / "syn.md").read_text()
    csv = pd.read_csv(tmp_path / "syn.csv")
    assert {"mean", "std", "n", "ci_low", "ci_high"} <= set(csv.columns)


def test_a_table_dropped_from_the_suite_is_removed_and_other_suites_tables_stay(tmp_path):
    """``tables: {knn: [knn/]}`` writes ``syn-knn.*`` and names it in ``syn.md``; without that entry the next
    write removes every ``syn-knn`` file, and leaves alone a suite named ``syn-extra`` that shares the prefix."""
    records = synthetic_records()
    write_leaderboard(records, "syn-extra", tmp_path)
    write_leaderboards(records, "syn", tmp_path, tables={"knn": ["knn/"]})
    assert "Other tables of this suite: `syn-knn.md`." in (tmp_path / "syn.md").read_text()
    knn = {p.name for p in tmp_path.glob("syn-knn*")}
    assert {"syn-knn.md", "syn-knn.csv", "syn-knn.tex", "syn-knn.html"} <= knn
    assert "knn/top1" not in (tmp_path / "syn.md").read_text() and "knn/top1" in (tmp_path / "syn-knn.md").read_text()
    extra = {p.name: p.read_bytes() for p in tmp_path.glob("syn-extra*")}
    write_leaderboards(records, "syn", tmp_path)
    assert not list(tmp_path.glob("syn-knn*")) and "Other tables" not in (tmp_path / "syn.md").read_text()
    assert "knn/top1" in (tmp_path / "syn.md").read_text()
    assert {p.name: p.read_bytes() for p in tmp_path.glob("syn-extra*")} == extra


def test_a_suite_whose_every_run_failed_gets_a_table_of_failed_rows(tmp_path):
    """Every run NaN (e.g. a temperature of 0): the table lists each row with how many runs failed and why,
    no scores and no rank test, instead of failing on an empty frame of scores."""
    records = synthetic_records()
    for r in records:
        r.update(status="failed", reason="loss became nan at step 1", metrics={})
    display = write_leaderboard(records, "syn", tmp_path)
    assert list(display.index) == ["a", "b", "best"] and set(display["failed"]) == {"3: loss became nan at step 1"}
    assert set(display["rank"]) == {"–"} and "No Friedman test" in (tmp_path / "syn.md").read_text()


def test_compare_is_the_paired_difference_with_its_interval():
    """best - b on knn/top1: differences 0.19, 0.22, 0.22 -> 21.0 points, t interval 21 ± 4.3027 * 1.732 / sqrt 3,
    p of scipy's ttest_rel; p_holm over the two columns. Catches an unpaired difference of means' interval."""
    table = compare(synthetic_records(), "best", "b").set_index("column")
    knn = table.loc["digits knn/top1"]
    d = np.array([0.19, 0.22, 0.22])
    half = 100 * T_975_2 * d.std(ddof=1) / math.sqrt(3)
    assert knn["difference"] == pytest.approx(21.0) and knn["n"] == 3
    assert (knn["ci_low"], knn["ci_high"]) == pytest.approx((21.0 - half, 21.0 + half), abs=1e-4)
    p = st.ttest_rel(VALUES["best"]["knn/top1"], VALUES["b"]["knn/top1"]).pvalue
    assert knn["p"] == pytest.approx(p) and knn["test"] == "paired t"
    assert table["p_holm"].max() <= 1 and knn["p_holm"] >= knn["p"]
    with pytest.raises(UsageError, match="unknown row"):
        compare(synthetic_records(), "best", "nosuch")


def test_cli_compare_and_leaderboard_flags(tmp_path, capsys):
    """``compare`` and ``leaderboard --ci bootstrap --alpha 0.1`` on stored records; bad rows and alphas exit 2."""
    results = tmp_path / "results"
    (results / "syn").mkdir(parents=True)
    for r in synthetic_records():
        (results / "syn" / f"{r['run_id']}.json").write_text(json.dumps(r))
    assert main(["compare", "syn", "best", "b", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "best - b" in out and "digits knn/top1" in out and "21" in out
    # every percentage with two decimals: b's lbfgs mean 65.33 and the difference 19.67 (three significant
    # digits, the former format, printed 65.3 and 19.7, and 28 for 27.97 beside 20.67)
    lbfgs_line = next(line for line in out.splitlines() if "lbfgs/top1" in line).split()
    assert lbfgs_line[3:6] == ["85.00", "65.33", "19.67"]
    d = 100 * (np.array(VALUES["best"]["lbfgs/top1"]) - VALUES["b"]["lbfgs/top1"])
    half = T_975_2 * d.std(ddof=1) / math.sqrt(3)
    assert lbfgs_line[6:8] == [f"{d.mean() - half:.2f}", f"{d.mean() + half:.2f}"]
    assert f"{st.ttest_rel(VALUES['best']['lbfgs/top1'], VALUES['b']['lbfgs/top1']).pvalue:.3g}" in lbfgs_line
    assert main(["compare", "syn", "best", "zzz", "--results-dir", str(results)]) == 2
    assert "unknown row" in capsys.readouterr().err
    assert main(["leaderboard", "syn", "--results-dir", str(results), "--leaderboard-dir", str(tmp_path / "lb"),
                 "--ci", "bootstrap", "--alpha", "0.1"]) == 0
    md = (tmp_path / "lb" / "syn.md").read_text()
    assert "90% confidence interval" in md and "percentile bootstrap" in md and "alpha = 0.1" in md
    assert main(["leaderboard", "syn", "--results-dir", str(results), "--alpha", "2"]) == 2


def test_sensitivity_names_the_settings_that_change_the_top():
    """Under the grid point k10_t0.5 the order of three methods is reversed (tau = -1, top changes); under
    k20_t0.1 it is the headline order (tau = 1); the head features of "a" put it first."""
    records = []
    for seed in range(2):
        for label, headline, reversed_, head in (("x", 0.9, 0.5, None), ("y", 0.8, 0.6, None),
                                                 ("a", 0.7, 0.7, 0.95)):
            metrics = {"knn/top1": headline, "knn/grid/k20_t0.1/top1": headline,
                       "knn/grid/k10_t0.5/top1": reversed_}
            reps = {"head": {"knn/top1": head}} if head else None
            records.append(record(label, seed, metrics, reps))
    table = sensitivity(records).set_index("setting")
    assert table.at["knn k10_t0.5", "kendall_tau"] == pytest.approx(-1.0)
    assert table.at["knn k10_t0.5", "top"] == "a" and table.at["knn k10_t0.5", "top_changes"]
    assert table.at["knn k20_t0.1", "kendall_tau"] == pytest.approx(1.0)
    assert not table.at["knn k20_t0.1", "top_changes"]
    assert table.at["head features where a method has them", "top"] == "a"


def _stored(results: Path, suite, records: list[dict]) -> None:
    for r in records:
        path = results / suite.name / f"{r['run_id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))


def test_records_of_an_unimported_plugin_method_are_left_out_with_a_warning_naming_it(tmp_path):
    """A `methods: all` suite read without the --plugin that registered one of its methods plans no runs of it:
    its records are left out, and the warning names the method and the missing --plugin (it said only
    "other configurations, seeds or budgets")."""
    from harness.execution.runner import plan

    suite = make_suite(["random"], seeds=(0,), budget="epochs=1", protocols={"knn": {"k": 10}}, name="s")
    (job,) = plan(suite)
    mine = {**record("random", 0, {"knn/top1": 0.5}), "run_id": job.run_id, "spec": job.spec}
    plugin_row = {**mine, "run_id": "1" * 16, "spec": {**job.spec, "method": "my_byol", "label": "my_byol"}}
    _stored(tmp_path, suite, [mine, plugin_row])
    warnings: list[str] = []
    assert [r["run_id"] for r in current_records(suite, tmp_path, warn=warnings.append)] == [job.run_id]
    assert warnings == [f"left out 1 stored records of {tmp_path / 's'} that this suite does not plan now (other "
                        "configurations, seeds or budgets; of methods no imported module registers: my_byol, so pass "
                        "their --plugin); rerun the suite or delete them"]


def test_leaderboard_and_report_read_the_same_current_records(tmp_path):
    """Records of the runs the suite plans now (by Job.run_id) are read; one of an older configuration of the
    same run is left out with a warning, by leaderboard and report alike. Catches the report averaging
    superseded records in (n=2 in its cells) and a selection by (dataset, label, seed) that keeps both."""
    import yaml

    from harness.reporting.report import write_report
    from harness.execution.runner import plan

    suite_file = tmp_path / "s.yaml"
    suite_file.write_text(yaml.safe_dump({"name": "s", "datasets": ["digits"], "methods": ["random", "pixels"],
                                          "seeds": [0, 1, 2], "budget": "epochs=1",
                                          "protocols": {"knn": {"k": 10}}}))
    suite = make_suite(["random", "pixels"], seeds=(0, 1, 2), budget="epochs=1", protocols={"knn": {"k": 10}},
                       name="s")
    jobs = plan(suite)
    current = [{**record(j.entry.label, j.seed, {"knn/top1": 0.5 + 0.1 * (j.entry.label == "pixels") + 0.01 * j.seed}),
                "run_id": j.run_id, "spec": j.spec} for j in jobs]
    old = {**current[0], "run_id": "0" * 16, "spec": {**current[0]["spec"], "config": {"batch_size": 1}}}
    results = tmp_path / "results"
    _stored(results, suite, [*current, old])
    warnings: list[str] = []
    chosen = current_records(suite, results, warn=warnings.append)
    assert sorted(r["run_id"] for r in chosen) == sorted(j.run_id for j in jobs)
    assert len(warnings) == 1 and "left out 1 stored records" in warnings[0]
    lb = tmp_path / "lb"
    assert main(["leaderboard", str(suite_file), "--results-dir", str(results), "--leaderboard-dir", str(lb)]) == 0
    assert set(pd.read_csv(lb / "s.csv")["n"]) == {3}
    page = write_report(str(suite_file), results, tmp_path / "out", tmp_path / "data", features=False).read_text()
    assert "0" * 16 not in page and all(j.run_id in page for j in jobs)
    assert "(n&lt;3)</td>" not in page and ">51.0 [" in page and ">61.0 [" in page  # 3 seeds each


def test_a_suites_deviations_are_listed_one_per_line_in_the_header():
    """Paper-scale suites end their description with 'Deviations: (1) ...; (2) ...'; the table header lists
    each on its own line, so none hides in a run-on title."""
    from harness.reporting.leaderboard import split_deviations

    summary, items = split_deviations("CIFAR-10, 1000 epochs. Deviations: (1) warm-up from 0; (2) bf16 autocast "
                                      "where CLD uses fp16 (apex O1); (3) the final checkpoint.")
    assert summary == "CIFAR-10, 1000 epochs"
    assert items == ["warm-up from 0", "bf16 autocast where CLD uses fp16 (apex O1)", "the final checkpoint"]
    assert split_deviations("digits, 3 seeds") == ("digits, 3 seeds", [])
    # a number in brackets that is not the next item's stays in its item (it split cifar10-invcls's item 3)
    assert split_deviations("x. Deviations: (1) K (10) heads; (2) y (1) z.")[1] == ["K (10) heads", "y (1) z"]


#: Methods with official code whose deviations in docs/fidelity.md include the batched augmentation and bf16.
OFFICIAL_CODE_METHODS = {"cc", "cd", "sela", "npid", "npid_cld", "moco", "moco_cld", "supcon", "supcon_spread",
                         "cond_autoencoder"}
#: Deviations listed in docs/fidelity.md that a suite with such a row must name: a phrase of each (lower case).
REQUIRED_DEVIATIONS = {"augmentation runs batched": OFFICIAL_CODE_METHODS, "bf16": OFFICIAL_CODE_METHODS,
                       "last partial batch": {"cd", "sela"},  # CD's test loader, SeLa's training loader
                       "nn.linear's default": {"sela"}, "test images": {"sela"}}


@pytest.mark.parametrize("suite_name", ["cd-k-sweep", "cifar10-instance", "cifar10-invcls", "cifar100-instance",
                                        "clustering-cifar10", "clustering-cifar10-32px", "clustering-cifar100-20",
                                        "clustering-imagenet10", "clustering-stl10", "transfer-cifar10",
                                        "transfer-cifar100"])
def test_every_paper_scale_suite_numbers_its_deviations_and_names_its_methods_shared_ones(suite_name):
    """A paper-scale suite's description numbers its deviations (1), (2), ... with no other '(digits)' after
    'Deviations:' (one would split an item in two in the header), and names the deviations docs/fidelity.md
    lists for its rows' methods on every dataset. Catches: a dropped deviation (the clustering suites once left
    out the batched augmentation and CD's dropped test batch) and cifar10-invcls's "(10)" that split its item 3."""
    from harness.execution.suite import load_suite, shipped_suites
    from harness.reporting.leaderboard import split_deviations

    paper_suites = sorted(name for name, path in shipped_suites().items() if load_suite(str(path)).scale == "paper")
    assert suite_name in paper_suites and len(paper_suites) == 11  # a new paper-scale suite belongs in the list
    suite = load_suite(suite_name)
    _, deviations = split_deviations(suite.description)
    numbers = re.findall(r"\((\d+)\)", suite.description.split("Deviations:", 1)[1])
    assert numbers == [str(i) for i in range(1, len(deviations) + 1)] and deviations
    text = " ".join(deviations).lower()
    methods = {entry.name for entry in suite.methods}
    missing = [phrase for phrase, owners in REQUIRED_DEVIATIONS.items() if methods & owners and phrase not in text]
    assert not missing, missing


def test_budget_columns_follow_the_budget_amount_not_its_text():
    """A budget grid of 2, 4, 8 and 16 epochs gives its columns in that order (as text "16" sorts first)."""
    records = []
    for epochs in (16, 2, 8, 4):
        for label, base in (("a", 0.5), ("b", 0.3)):
            r = record(label, 0, {"knn/top1": base + epochs / 100})
            r["run_id"] += f"-{epochs}"
            r["spec"]["budget"] = {"epochs": epochs}
            records.append(r)
    columns = [c for c in leaderboard_table(records).display.columns if c.startswith("digits")]
    assert columns == [f'digits knn/top1 {{"epochs": {e}}}' for e in (2, 4, 8, 16)]


def test_a_row_without_two_common_seeds_keeps_the_best_from_bold():
    """Row "c" has seed 0 only: it cannot be paired with the best (one common seed), so it gets no p-value and no
    mark, and the best is not bold although it beats "b" significantly (p = scipy's ttest_rel, Holm over the one
    tested row). Catches bold without a test of every other row, and a paired test tried on a single pair."""
    records = [r for r in synthetic_records() if r["spec"]["label"] != "a"]
    records.append(record("c", 0, {"knn/top1": 0.5, "lbfgs/top1": 0.5}))
    cells = leaderboard_table(records).stats
    knn = cells[cells["metric"] == "knn/top1"].set_index("row")
    p_b = st.ttest_rel(VALUES["best"]["knn/top1"], VALUES["b"]["knn/top1"]).pvalue
    assert knn.at["b", "p_vs_best"] == pytest.approx(p_b) and p_b < 0.05 and math.isnan(knn.at["c", "p_vs_best"])
    assert knn["mark"].to_dict() == {"b": "", "best": "", "c": ""}


def test_intervals_and_marks_follow_alpha():
    """--alpha 0.1: the cells' intervals are 90% t intervals, 0.92 ± t_{0.95, 2} * 0.02 / sqrt 3 with t_{0.95, 2} =
    2.919986. --alpha 0.001: in knn/top1 the Holm-adjusted p of "a" (2 * 0.00026) is still <= alpha but that of "b"
    (0.00226) is not, so "b" is tied with the best and the best is no longer bold. Catches a 95% interval and a
    0.05 test that ignore --alpha."""
    cells = leaderboard_table(synthetic_records(), StatsOptions(alpha=0.1)).stats.set_index(["row", "metric"])
    half = 2.919986 * 0.02 / math.sqrt(3)
    assert tuple(cells.loc[("best", "knn/top1"), ["ci_low", "ci_high"]]) == pytest.approx((0.92 - half, 0.92 + half),
                                                                                          abs=1e-6)
    strict = leaderboard_table(synthetic_records(), StatsOptions(alpha=0.001)).stats
    marks = strict[strict["metric"] == "knn/top1"].set_index("row")["mark"].to_dict()
    assert marks == {"a": "", "b": "tied", "best": "tied"}


def test_intervals_are_cut_at_one():
    """Seeds (0.97, 0.99, 1.0): the t interval's upper end 0.9867 + 4.3027 * 0.01528 / sqrt 3 = 1.0246 is cut at
    1 (every score is at most 1), its lower end is kept. Catches intervals above 100%."""
    values = [0.97, 0.99, 1.0]
    records = [record("top", seed, {"knn/top1": v}) for seed, v in enumerate(values)]
    cell = leaderboard_table(records).stats.iloc[0]
    half = T_975_2 * np.std(values, ddof=1) / math.sqrt(3)
    assert np.mean(values) + half > 1.02 and cell["ci_high"] == 1.0
    assert cell["ci_low"] == pytest.approx(np.mean(values) - half)


def test_rows_with_equal_means_share_the_better_rank():
    """Rows "x" and "y" have the same mean in every column, "z" is below: x and y both rank 1, z ranks 3 (the
    leaderboard's rank is the minimum rank of tied rows, as in a sports table). Catches ties given the worse rank
    (2, 2, 3), which would leave the table without a first place."""
    records = [record(label, seed, {"knn/top1": v + 0.01 * seed, "lbfgs/top1": v})
               for label, v in (("x", 0.8), ("y", 0.8), ("z", 0.6)) for seed in range(3)]
    display = leaderboard_table(records).display
    assert display["rank"].to_dict() == {"x": "1.0", "y": "1.0", "z": "3.0"}


def test_validation_scores_are_not_ranked():
    """``sgd/val_top1`` (the accuracy used to pick the SGD probe's epoch) is model selection, not a test score: it
    is neither a score nor a headline, and gets no leaderboard column. Catches ranking methods on validation data."""
    from harness.reporting.leaderboard import is_headline, is_score

    assert is_score("sgd/top1@best_val") and not is_score("sgd/val_top1") and not is_headline("sgd/val_top1")
    records = [record(label, seed, {"knn/top1": v + 0.01 * seed, "sgd/val_top1": 1 - v})
               for label, v in (("p", 0.8), ("q", 0.6)) for seed in range(3)]
    assert [c for c in leaderboard_table(records).display.columns if c.startswith("digits")] == ["digits knn/top1"]


def test_headlines_are_each_protocols_top1_and_clustering_acc():
    """Both levels of coarse-to-fine under kNN and L-BFGS are headline columns (they rank methods across a suite, as in
    the committed quick-transfer table); top-5, NMI and validation accuracies are not. Catches a headline test that
    knows only the plain ``top1`` leaf."""
    from harness.reporting.leaderboard import is_headline

    for metric in ("knn/top1", "sgd/top1@best_val", "clustering/acc", "coarse_to_fine/fine_knn_top1",
                   "coarse_to_fine/coarse_lbfgs_top1"):
        assert is_headline(metric), metric
    for metric in ("knn/top5", "clustering/nmi", "sgd/val_top1", "knn/grid/k20_t0.07/top1", "clustering/acc_majority"):
        assert not is_headline(metric), metric


def test_compare_holm_and_interval_follow_the_columns_and_alpha():
    """best - b over two columns: p_knn = 0.00226, p_lbfgs = 0.000287 (scipy's ttest_rel); Holm: the smaller times 2,
    the larger max(itself, that). With --alpha 0.1 the interval of knn's differences (0.19, 0.22, 0.22) uses
    t_{0.95, 2} = 2.919986. Catches unadjusted p_holm (it would equal p) and a 95% interval under alpha 0.1."""
    table = compare(synthetic_records(), "best", "b", StatsOptions(alpha=0.1)).set_index("column")
    p = {m: st.ttest_rel(VALUES["best"][m], VALUES["b"][m]).pvalue for m in ("knn/top1", "lbfgs/top1")}
    assert 2 * p["lbfgs/top1"] < p["knn/top1"]  # so only lbfgs's adjusted value differs from its raw one
    assert table.at["digits lbfgs/top1", "p_holm"] == pytest.approx(2 * p["lbfgs/top1"])
    assert table.at["digits knn/top1", "p_holm"] == pytest.approx(max(p["knn/top1"], 2 * p["lbfgs/top1"]))
    d = np.array([0.19, 0.22, 0.22])
    half = 100 * 2.919986 * d.std(ddof=1) / math.sqrt(3)
    knn = table.loc["digits knn/top1"]
    assert (knn["ci_low"], knn["ci_high"]) == pytest.approx((21.0 - half, 21.0 + half), abs=1e-4)


def test_friedman_uses_complete_rows_and_alpha_names_the_verdict():
    """Row "c" lacks lbfgs/top1: it is left out of Friedman's test, which stays the one of rows a, b, best (chi2 = 4,
    p = exp(-2) = 0.135). That p is above 0.05 but below 0.2: the summary says the mean ranks differ only at
    alpha 0.2. Catches a missing score counted as 0 (rank last) and a verdict at a fixed 0.05."""
    records = synthetic_records() + [record("c", seed, {"knn/top1": 0.5}) for seed in range(3)]
    ranks = leaderboard_table(records).ranks
    assert ranks.rows == ["a", "b", "best"] and ranks.left_out == ["c"]
    assert ranks.friedman.chi2 == pytest.approx(4.0)
    assert "no difference in mean rank is shown at alpha = 0.05" in ranks.summary()
    loose = leaderboard_table(records, StatsOptions(alpha=0.2)).ranks
    assert "the mean ranks differ at alpha = 0.2" in loose.summary()


def test_friedman_over_one_data_set_says_it_is_a_description():
    """Demšar's blocks are independent data sets. Over one data set the blocks are its protocols scoring the same
    encoders, and the summary says to read the ranks as a description; over two data sets it does not. Catches a
    one-dataset p-value presented as a test of the methods."""
    one = leaderboard_table(synthetic_records()).ranks
    assert one.datasets == 1 and "read the ranks as a description, not as a test" in one.summary()
    two = synthetic_records() + [{**r, "run_id": r["run_id"] + "-other", "spec": {**r["spec"], "dataset": "other"}}
                                 for r in synthetic_records()]
    ranks = leaderboard_table(two).ranks
    assert ranks.datasets == 2 and ranks.friedman.n_blocks == 4 and "description" not in ranks.summary()


def test_the_best_is_bold_when_its_adjusted_p_equals_alpha():
    """Reject where the Holm-adjusted p is <= alpha: with one other row Holm leaves scipy's ttest_rel p as it is, so at
    alpha = that p the best is bold, and just below it the two rows are tied. Catches a strict ``p < alpha``."""
    records = [r for r in synthetic_records() if r["spec"]["label"] != "a"]
    p = st.ttest_rel(VALUES["best"]["knn/top1"], VALUES["b"]["knn/top1"]).pvalue

    def knn_marks(alpha: float) -> dict[str, str]:
        cells = leaderboard_table(records, StatsOptions(alpha=alpha)).stats
        return cells[cells["metric"] == "knn/top1"].set_index("row")["mark"].to_dict()

    assert knn_marks(p) == {"best": "best", "b": ""}
    assert knn_marks(p * (1 - 1e-9)) == {"best": "tied", "b": "tied"}


def test_two_seeds_keep_their_std_in_the_csv():
    """Two seeds get no interval but do have a spread: std (ddof=1) of (0.71, 0.70) = 0.00707. Catches a std that is
    left out (nan) below 3 seeds."""
    records = [r for r in synthetic_records() if r["spec"]["seed"] < 2]
    cells = leaderboard_table(records).stats.set_index(["row", "metric"])
    assert cells.loc[("b", "knn/top1"), "std"] == pytest.approx(np.std([0.71, 0.70], ddof=1))
    assert cells.loc[("b", "knn/top1"), "std"] == pytest.approx(0.0070711, abs=1e-7)


def test_rank_is_the_mean_of_the_column_ranks():
    """Three columns: x ranks (1, 1, 3), y (2, 2, 1), z (3, 3, 2), so mean ranks 1.7, 1.7, 2.7 (medians would be 1, 2,
    3). Catches a median or a two-column-only check of the rank."""
    scores = {"x": (0.9, 0.9, 0.1), "y": (0.8, 0.8, 0.9), "z": (0.7, 0.7, 0.5)}
    records = [record(label, seed, {"knn/top1": s[0], "lbfgs/top1": s[1], "clustering/acc": s[2] + 0.01 * seed})
               for label, s in scores.items() for seed in range(3)]
    assert leaderboard_table(records).display["rank"].to_dict() == {"x": "1.7", "y": "1.7", "z": "2.7"}


def test_rank_counts_each_protocol_once():
    """Rank averages the headline columns only: "x" leads kNN and L-BFGS, "y" leads clustering, whose ACC, AMI, ARI
    and NMI are four columns of one protocol. Over the headline columns x ranks (1, 1, 2) = 1.3 and y (2, 2, 1) =
    1.7; over every column y would lead (1.3 against x's 1.7). "z [cluster]" has clustering columns only: no rank,
    last. Catches a rank in which one protocol's correlated scores outvote the others."""
    def scores(label, knn, cluster):
        metrics = {"knn/top1": knn, "lbfgs/top1": knn} if knn else {}
        metrics.update({f"clustering/{m}": cluster for m in ("acc", "ami", "ari", "nmi")})
        return metrics

    records = [record(label, seed, {k: v + 0.001 * seed for k, v in scores(label, knn, cluster).items()})
               for label, knn, cluster in (("x", 0.9, 0.5), ("y", 0.8, 0.6), ("z [cluster]", None, 0.7))
               for seed in range(3)]
    display = leaderboard_table(records).display
    assert display["rank"].to_dict() == {"x": "1.3", "y": "1.7", "z [cluster]": "–"}
    assert list(display.index) == ["x", "y", "z [cluster]"]


def test_markdown_table_has_one_separator_per_column():
    from harness.reporting.leaderboard import to_markdown

    df = pd.DataFrame({"rank": ["1.0", "2.0"], "digits knn/top1": ["**92.0 [87.0, 97.0]**", "71.0 [68.5, 73.5]"]},
                      index=pd.Index(["best", "b"], name="method"))
    assert to_markdown(df) == ("| method | rank | digits knn/top1 |\n|---|---|---|\n"
                               "| best | 1.0 | **92.0 [87.0, 97.0]** |\n| b | 2.0 | 71.0 [68.5, 73.5] |")


def test_the_header_lists_every_deviation_run_count_seed_range_and_protocol(tmp_path):
    """Row "b" lacks seed 2 (2 seeds, the others 3) and "c" failed: 9 stored runs, 8 ok, seeds per cell 2–3. Every
    deviation of the title is a line of its own and every protocol of the records is named. Catches a dropped
    deviation or protocol line, failed runs counted as ok and a seed range that shows one end only; a parameter grid
    shows its floats as the run id reads them."""
    records = [r for r in synthetic_records() if not (r["spec"]["label"] == "b" and r["spec"]["seed"] == 2)]
    records[0]["spec"]["protocols"] = {**records[0]["spec"]["protocols"],
                                       "lbfgs": {"c": 1.0, "grid": [1e-3, 9.999999999999999e-06]}}
    records.append({**record("c", 0, {}), "status": "failed", "reason": "loss became nan", "metrics": {}})
    title = "Synthetic, 3 seeds. Deviations: (1) warm-up from 0; (2) bf16 autocast; (3) the final checkpoint."
    write_leaderboard(records, "syn", tmp_path, title)
    md = (tmp_path / "syn.md").read_text()
    assert md.startswith("# Leaderboard: Synthetic, 3 seeds\n")
    assert "(3; docs/fidelity.md gives the reasons):\n- warm-up from 0\n- bf16 autocast\n- the final checkpoint\n" in md
    assert "9 stored runs (8 ok)" in md and "seeds per cell: 2–3 (the csv's n column)" in md
    assert "- `knn`: k=20, temperature=0.1\n- `lbfgs`: c=1.0, grid=[0.001, 1e-05]\n" in md  # not 9.999999999999999e-06


def test_failed_runs_are_counted_per_run_over_a_budget_grid():
    """Row "c" failed with seed 0 at both budgets of a grid: 2 failed runs, though of one seed. Catches failed runs
    counted by distinct seed (a row whose every budget failed would say 1)."""
    records = []
    for epochs in (1, 2):
        for label in ("a", "b", "c"):
            r = record(label, 0, {"knn/top1": 0.5 + 0.1 * (label == "a")})
            r["run_id"] += f"-{epochs}"
            r["spec"]["budget"] = {"epochs": epochs}
            if label == "c":
                r.update(status="failed", reason="loss became nan", metrics={})
            records.append(r)
    display = leaderboard_table(records).display
    assert display["failed"].to_dict() == {"a": "", "b": "", "c": "2: loss became nan"}


def test_compare_tests_two_common_seeds():
    """Two seeds in common are enough for the paired t-test (no interval below 3): best - b on knn/top1 over seeds 0, 1
    has n = 2 and scipy's ttest_rel p. Catches a pair of seeds reported as untestable."""
    records = [r for r in synthetic_records() if r["spec"]["seed"] < 2]
    knn = compare(records, "best", "b").set_index("column").loc["digits knn/top1"]
    p = st.ttest_rel(VALUES["best"]["knn/top1"][:2], VALUES["b"]["knn/top1"][:2]).pvalue
    assert knn["n"] == 2 and knn["test"] == "paired t" and knn["p"] == pytest.approx(p)
    assert knn["difference"] == pytest.approx(20.5) and math.isnan(knn["ci_low"])


def test_the_header_says_when_a_probe_column_is_its_best_validation_epoch(tmp_path):
    """A table with the sgd probe's ``top1@best_val`` says that column is the head at its best validation epoch
    (its 'no best-epoch selection' would contradict it otherwise); a table without one keeps the plain sentence.
    Catches the unconditional 'no best-epoch selection' beside a column that is exactly that."""
    plain = "Every number is an offline evaluation of the final checkpoint (no online probes, no best-epoch selection)."
    write_leaderboard(synthetic_records(), "syn", tmp_path)
    assert plain in (tmp_path / "syn.md").read_text()
    probed = [record(label, seed, {"sgd/top1": v[seed], "sgd/top1@best_val": v[seed], "sgd/val_top1": v[seed]})
              for label, v in (("x", [0.5, 0.6, 0.7]), ("y", [0.4, 0.5, 0.6])) for seed in range(3)]
    write_leaderboard(probed, "probed", tmp_path)
    md = (tmp_path / "probed.md").read_text()
    assert plain not in md and "digits sgd/top1@best_val" in md
    assert ("no best-epoch selection of the encoder; a column ending in @best_val is the linear probe's head at the "
            "epoch of its best validation top-1, chosen without the test split)." in md)
