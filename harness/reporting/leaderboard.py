"""Leaderboards from stored records only: pandas tables written as Markdown, CSV, LaTeX and HTML.

One row per method (heads as separate rows), columns per dataset x metric. Each cell is the mean over
seeds with its 95% confidence interval (Student t, or a seeded percentile bootstrap); the best mean is
bold only when a paired test by seed, Holm-corrected within the column, finds it better than every
other row, and rows the test cannot tell from the best are marked as tied with it. Across the suite,
Friedman's test over the headline columns and a critical-difference diagram (Demšar 2006) say which
differences in mean rank are real. Every number is an offline evaluation of the final checkpoint.
"""
from __future__ import annotations

import html
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from harness.reporting import stats
from harness.errors import UsageError, choices_error
from harness.execution.store import write_atomic, write_text_atomic

#: Metric name endings that are scores (higher is better); other stored values (chosen l2, ...) are not ranked.
SCORE_SUFFIXES = ("top1", "top5", "acc", "nmi", "ami", "ari", "acc_majority")
#: The path segment of a protocol's sensitivity grid (``knn/grid/k20_t0.07/top1``): data for the report's
#: sensitivity table, not leaderboard columns.
GRID = "/grid/"


def is_score(metric: str) -> bool:
    """Test-set scores only: validation accuracies used for model selection and grid points are not ranked."""
    leaf = metric.split("/")[-1]
    return GRID not in metric and not leaf.startswith("val_") and any(
        leaf == s or leaf.endswith("_" + s) or leaf.startswith(s + "@") for s in SCORE_SUFFIXES)


def is_headline(metric: str) -> bool:
    """The one number per protocol that ranks methods across a suite: top-1 of a classifier (kNN, a probe,
    the SGD probe at its validation-selected epoch, either level of coarse-to-fine) and clustering ACC."""
    leaf = metric.split("/")[-1]
    return is_score(metric) and (leaf in ("top1", "acc", "top1@best_val") or leaf.endswith("_top1"))


@dataclass(frozen=True)
class StatsOptions:
    """How cells get their intervals and how rows are compared: ``ci`` in :data:`harness.reporting.stats.CI_METHODS`,
    ``alpha`` the significance level of the paired tests, the Friedman test and the critical difference."""

    ci: str = "t"
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if self.ci not in stats.CI_METHODS:
            raise choices_error("interval method (--ci)", self.ci, stats.CI_METHODS)
        if not 0 < self.alpha < 1:
            raise UsageError(f"--alpha must be a number in (0, 1), got {self.alpha!r}")

    @property
    def ci_name(self) -> str:
        return "Student t" if self.ci == "t" else (f"percentile bootstrap ({stats.BOOTSTRAP_RESAMPLES} resamples of "
                                                   f"the seeds, seed {stats.BOOTSTRAP_SEED}; a 95% one from 3 seeds "
                                                   f"is their [min, max], which holds the mean of a symmetric seed "
                                                   f"distribution only 75% of the time)")


def current_records(suite, results_dir: Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The stored records of the runs ``suite`` plans now (by ``Job.run_id``), the one selection that
    ``leaderboard``, ``report`` and ``compare`` read. A record of another configuration (an older config
    or protocol, another budget or seed list) is left out, so it is never averaged in as an extra seed;
    ``warn`` hears how many were left out."""
    from harness.execution.runner import plan
    from harness.execution.store import ResultStore

    planned = {job.run_id for job in plan(suite)}
    stored = list(ResultStore(Path(results_dir), suite.name).records(for_tables=True))
    current = [r for r in stored if r.get("run_id") in planned]
    if warn and len(current) < len(stored):
        from methods import METHODS

        unregistered = sorted({method for r in stored  # a record of another tool's making may name no method
                               if (method := r["spec"].get("method")) is not None and method not in METHODS})
        plugin = (f"; of methods no imported module registers: {', '.join(unregistered)}, so pass their --plugin"
                  if unregistered else "")  # a plugin's rows in a `methods: all` suite, read without it
        warn(f"left out {len(stored) - len(current)} stored records of {Path(results_dir) / suite.name} that this "
             f"suite does not plan now (other configurations, seeds or budgets{plugin}); rerun the suite or delete them")
    if not current:
        raise UsageError(f"no stored records of the runs suite {suite.name!r} plans under "
                         f"{Path(results_dir) / suite.name}; run it first")
    return current


@dataclass(frozen=True)
class SuiteRecords:
    """What ``leaderboard``, ``report`` and ``compare`` read: the suite's name, title, extra tables and records."""

    name: str
    title: str
    tables: dict[str, list[str]]
    records: list[dict[str, Any]]


def suite_records(name_or_path: str, results_dir: Path, warn: Callable[[str], None] | None = None) -> SuiteRecords:
    """The records of a shipped suite or suite file through :func:`current_records`; for the name of a suite
    whose file is gone but whose records are stored, every record under ``results_dir/<name>``."""
    from harness.execution.store import ResultStore
    from harness.execution.suite import is_suite_name, load_suite

    try:
        suite = load_suite(name_or_path)
    except UsageError as exc:
        if Path(name_or_path).suffix in (".yaml", ".yml"):  # a suite file, not a results folder's name: its own error
            raise
        if not is_suite_name(name_or_path) or not (Path(results_dir) / name_or_path).is_dir():
            raise UsageError(f"{exc}; and no stored records under {Path(results_dir) / name_or_path}") from None
        records = list(ResultStore(Path(results_dir), name_or_path).records(for_tables=True))
        if not records:
            raise UsageError(f"no stored records under {Path(results_dir) / name_or_path}; "
                             f"run the suite first") from None
        return SuiteRecords(name_or_path, name_or_path, {}, records)
    return SuiteRecords(suite.name, suite.description or suite.name, suite.tables,
                        current_records(suite, results_dir, warn))


def row_label(record: dict[str, Any], rep: str) -> str:
    label = record["spec"]["label"]
    return label if rep == "backbone" else f"{label} [{rep}]"


def records_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Long table: one row per (record, representation, metric)."""
    rows = []
    for r in records:
        base = {"method": r["spec"]["label"], "dataset": r["spec"]["dataset"], "seed": r["spec"]["seed"],
                "budget": json.dumps(r["spec"]["budget"]), "split_sha256": r["split_sha256"], "status": r["status"],
                "reason": r.get("reason", ""),
                "train_seconds": r.get("train_seconds", np.nan),
                "peak_memory_mb": (r.get("train") or {}).get("peak_memory_mb", np.nan)}
        if r["status"] != "ok":
            rows.append({**base, "row": r["spec"]["label"], "rep": "backbone", "metric": None, "value": np.nan})
        for rep, metrics in r.get("metrics", {}).items():
            for metric, value in metrics.items():
                rows.append({**base, "row": row_label(r, rep), "rep": rep, "metric": metric, "value": value})
    return pd.DataFrame(rows)


def seed_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """The ok runs' test scores with their leaderboard ``column`` (dataset, metric and, when the records hold
    several budgets, the budget); refuses cells that mix split hashes."""
    ok = frame[(frame["status"] == "ok") & frame["metric"].notna()]
    ok = ok[ok["metric"].map(is_score).astype(bool)]  # a bool mask even when empty (else: a column selection)
    mixed = ok.groupby(["row", "dataset", "budget", "metric"])["split_sha256"].nunique()
    if (mixed > 1).any():
        row, dataset, _, metric = mixed[mixed > 1].index[0]
        raise UsageError(f"records of {row!r} on {dataset!r} ({metric}) come from different data splits "
                         f"(split hashes differ); rerun them or move the stale records out of the results dir")
    column = ok["dataset"] + " " + ok["metric"]
    if ok["budget"].nunique() > 1:
        column = column + " " + ok["budget"]
    return ok.assign(column=column)


@dataclass(frozen=True)
class ColumnTest:
    """The paired comparison of a column's best mean with every other row (Holm over those rows)."""

    p_vs_best: dict[str, float]
    marks: dict[str, str]
    tests: frozenset[str]


def column_test(values: pd.DataFrame, means: pd.Series, alpha: float) -> ColumnTest:
    """Compare the best row of one column with each other row, paired by seed (``values``: seeds x rows).

    The best row is ``best`` when every other row is significantly worse (Holm-adjusted p <= alpha);
    otherwise it and every row not significantly worse are ``tied``. A pair with fewer than 2 common
    seeds cannot be tested: it gets no mark and keeps the best from being ``best``.
    """
    best = means.idxmax()
    raw, tests = {}, set()
    top = values[best].to_numpy(dtype=np.float64)
    pairs = {}
    for row in means.index.drop(best):
        other = values[row].to_numpy(dtype=np.float64)
        paired = ~np.isnan(top) & ~np.isnan(other)
        if paired.sum() >= 2:
            pairs[row] = top[paired], other[paired]
    for row, (a, b) in pairs.items():
        result = stats.paired_test(a, b, 1 - alpha, comparisons=len(pairs))
        raw[row] = result.p_value
        tests.add(result.test)
    adjusted = dict(zip(raw, stats.holm(list(raw.values())))) if raw else {}
    marks = {row: "tied" for row, p in adjusted.items() if p > alpha}
    if len(means) > 1 and len(adjusted) == len(means) - 1 and not marks:
        marks[best] = "best"
    elif marks:
        marks[best] = "tied"
    return ColumnTest(adjusted, marks, frozenset(tests))


def summarize(frame: pd.DataFrame, options: StatsOptions = StatsOptions()) -> tuple[pd.DataFrame, frozenset[str]]:
    """Per (row, column): mean, std (ddof=1), n, the interval, the Holm-adjusted p-value against the column's
    best row and its mark (``best``, ``tied`` or empty); and the names of the paired tests used."""
    scores = seed_scores(frame).sort_values(["row", "column", "seed"], kind="stable")
    keys = ["row", "rep", "dataset", "budget", "metric", "column"]
    cells = []
    for key, group in scores.groupby(keys, sort=True):
        values = group["value"].to_numpy(dtype=np.float64)
        low, high = stats.mean_interval(values, options.ci, 1 - options.alpha)
        high = min(high, 1.0)  # every score is at most 1: a t interval can overshoot it
        cells.append({**dict(zip(keys, key)), "mean": values.mean(),
                      "std": values.std(ddof=1) if len(values) > 1 else np.nan,
                      "n": len(values), "ci_low": low, "ci_high": high})
    table = pd.DataFrame(cells, columns=[*keys, "mean", "std", "n", "ci_low", "ci_high"])
    table["p_vs_best"], table["mark"], used = np.nan, "", set()
    for column, part in scores.groupby("column", sort=True):
        values = part.pivot_table(index="seed", columns="row", values="value", aggfunc="first")
        means = table[table["column"] == column].set_index("row")["mean"]
        result = column_test(values, means, options.alpha)
        used |= result.tests
        at = table["column"] == column
        table.loc[at, "p_vs_best"] = table.loc[at, "row"].map(result.p_vs_best).astype(float)
        table.loc[at, "mark"] = table.loc[at, "row"].map(lambda row: result.marks.get(row, ""))
    return table, frozenset(used)


def _cell(mean: float, low: float, high: float, mark: str) -> str:
    """``94.1 [93.3, 94.9]`` in percent; ``(n<3)`` instead of an interval; bold for ``best``, italics for ``tied``."""
    text = f"{100 * mean:.1f} " + ("(n<3)" if np.isnan(low) else f"[{100 * low:.1f}, {100 * high:.1f}]")
    return f"**{text}**" if mark == "best" else f"_{text}_" if mark == "tied" else text


#: What a table's rank column is, said in its header and the report.
RANK_TEXT = ("Rank = mean rank over the headline columns (each protocol's top-1 or clustering ACC per dataset, the "
             "columns of Friedman's test; tied means share the better rank); – for a row that lacks one of them.")


def headline_means(table: pd.DataFrame) -> pd.DataFrame:
    """Rows x headline columns (:func:`is_headline`: one number per protocol and dataset) of the cells' means,
    NaN where a row lacks one: what the rank column and Friedman's test both rank."""
    head = table[table["metric"].map(is_headline).astype(bool)]
    return head.pivot(index="row", columns="column", values="mean")


def headline_rank(table: pd.DataFrame, means: pd.DataFrame) -> pd.Series:
    """Each row's mean rank (1 = best; tied means share the better rank, as in a sports table) over the headline
    columns (so clustering's four correlated scores and a classifier's top-5 do not outvote the others), among
    the rows that have all of them; NaN for the rest. A table without a headline column ranks over every column
    of ``means``."""
    head = headline_means(table)
    ranked = head.dropna() if head.shape[1] else means
    return ranked.rank(ascending=False, method="min").mean(axis=1)


@dataclass(frozen=True)
class Leaderboard:
    """A built table: ``display`` (strings, rows in rank order), ``stats`` (one numeric row per cell, the csv),
    the paired tests used and the suite-level rank comparison (None, with ``ranks_note`` saying why)."""

    display: pd.DataFrame
    stats: pd.DataFrame
    tests: frozenset[str]
    ranks: "SuiteRanks | None"
    ranks_note: str


def _column_order(table: pd.DataFrame):
    """Sort key of leaderboard columns: dataset, metric, then the budget by its amounts (2 before 16 epochs)."""
    key = {c.column: (c.dataset, c.metric, sorted(json.loads(c.budget).items()))
           for c in table[["column", "dataset", "metric", "budget"]].drop_duplicates().itertuples()}
    return lambda column: key[column]


def leaderboard_table(records: list[dict[str, Any]], options: StatsOptions = StatsOptions()) -> Leaderboard:
    """The leaderboard of ``records``. Values are shown in percent."""
    frame = records_frame(records)
    if frame.empty:
        raise UsageError("no stored records to build a leaderboard from; run the suite first")
    table, tests = summarize(frame, options)
    means = table.pivot(index="row", columns="column", values="mean")
    means = means[sorted(means.columns, key=_column_order(table))]
    runs_failed = frame[(frame["status"] != "ok") & frame["metric"].isna()]  # records_frame's one row per failed run
    failed = runs_failed.groupby("row").agg(runs=("seed", "size"), reason=("reason", "first"))
    rows = means.index.append(failed.index.difference(means.index))  # rows whose every run failed come last
    cells = {(c.row, c.column): _cell(c.mean, c.ci_low, c.ci_high, c.mark) for c in table.itertuples()}
    display = pd.DataFrame(index=rows)
    for col in means.columns:
        display[col] = [cells.get((row, col), "–") for row in rows]
    rank = headline_rank(table, means).reindex(rows)
    display.insert(0, "rank", rank.map(lambda v: "–" if np.isnan(v) else f"{v:.1f}"))
    per_row = frame.groupby("row")
    display["train s"] = per_row["train_seconds"].mean().reindex(rows).map(lambda v: f"{v:.1f}")
    display["peak MB"] = per_row["peak_memory_mb"].mean().reindex(rows).map(
        lambda v: "–" if not v or np.isnan(v) else f"{v:.0f}")
    if len(failed):  # a failed run is a row's fact, not a missing number: say how many and why
        display["failed"] = [f"{failed.at[row, 'runs']}: {failed.at[row, 'reason']}" if row in failed.index else ""
                             for row in rows]
    order = rank.sort_values(kind="stable", na_position="last").index
    ranks, note = suite_ranks(table, options.alpha)
    return Leaderboard(display.loc[order], table, tests, ranks, note)


@dataclass(frozen=True)
class SuiteRanks:
    """Friedman's test over a suite's headline columns and the Nemenyi critical difference of mean ranks."""

    rows: list[str]
    columns: list[str]
    friedman: stats.FriedmanResult
    critical_difference: float
    alpha: float
    left_out: list[str]
    datasets: int

    def groups(self) -> list[tuple[int, int]]:
        """Maximal runs (i, j) of rows, in rank order, whose mean ranks differ by less than the critical
        difference: the bars of the diagram (Demšar 2006, Fig. 1)."""
        order = np.sort(self.friedman.average_ranks)
        spans, reach = [], -1
        for i in range(len(order)):
            j = int(np.searchsorted(order, order[i] + self.critical_difference, side="left")) - 1
            if j > i and j > reach:
                spans.append((i, j))
                reach = j
        return spans

    def summary(self) -> str:
        f = self.friedman
        verdict = "the mean ranks differ" if f.p_value <= self.alpha else "no difference in mean rank is shown"
        left = f" Left out (missing a headline column): {', '.join(self.left_out)}." if self.left_out else ""
        one = (" Demšar's blocks are independent data sets; these columns are protocols scoring the same encoders on "
               "one data set, so read the ranks as a description, not as a test." if self.datasets == 1 else "")
        return (f"Friedman's test over {f.n_blocks} headline columns ({', '.join(self.columns)}) and {len(self.rows)} "
                f"rows: chi2 = {f.chi2:.2f}, p = {f.p_value:.3g} ({verdict} at alpha = {self.alpha:g}); Nemenyi "
                f"critical difference of mean ranks CD = {self.critical_difference:.2f} (Demšar 2006).{one}{left}")


def suite_ranks(table: pd.DataFrame, alpha: float) -> tuple[SuiteRanks | None, str]:
    """Friedman and Nemenyi over the headline columns (datasets x :func:`is_headline` metrics); rows missing a
    headline column are left out. None and the reason when fewer than 2 columns or 2 rows remain."""
    means = headline_means(table)
    complete = means.dropna()
    if means.shape[1] < 2 or len(complete) < 2:
        return None, (f"No Friedman test or critical-difference diagram: it needs at least 2 headline columns "
                      f"(top-1 or clustering ACC per dataset) and 2 rows with all of them; here "
                      f"{means.shape[1]} columns, {len(complete)} complete rows.")
    result = stats.friedman(complete.to_numpy().T)
    cd = stats.nemenyi_critical_difference(len(complete), means.shape[1], alpha)
    left_out = sorted(set(means.index) - set(complete.index))
    return SuiteRanks(list(complete.index), list(complete.columns), result, cd, alpha, left_out,
                      table.loc[table["column"].isin(means.columns), "dataset"].nunique()), ""


def draw_cd_diagram(ranks: SuiteRanks, title: str = ""):
    """A critical-difference diagram (Demšar 2006, Fig. 1) as a matplotlib Figure: the rank axis (1 = best, on
    the left), each row's mean rank with its label (better half left, rest right), the CD as a bar, and a thick
    line joining each maximal group of rows whose mean ranks differ by less than CD."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = np.argsort(ranks.friedman.average_ranks, kind="stable")
    avg = ranks.friedman.average_ranks[order]
    names = [ranks.rows[i] for i in order]
    k, half = len(names), (len(names) + 1) // 2
    label_in = 0.35 + 0.065 * max(len(n) + 6 for n in names)  # inches for a label and its rank
    axis_in = max(3.0, 0.45 * k)
    groups = ranks.groups()
    width, height = axis_in + 2 * label_in, (1.5 if title else 1.3) + 0.22 * (half + len(groups))
    fig = Figure(figsize=(width, height), layout=None)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    per_in = (k - 1) / axis_in if k > 1 else 1.0
    ax.set_xlim(1 - label_in * per_in, k + label_in * per_in)
    ax.set_axis_off()
    y_axis, step = 0.55, 0.22
    ax.plot([1, k], [y_axis, y_axis], color="k", lw=1)
    for r in range(1, k + 1):
        ax.plot([r, r], [y_axis, y_axis + 0.06], color="k", lw=1)
        ax.text(r, y_axis + 0.09, str(r), ha="center", va="bottom", fontsize=8)
    cd = ranks.critical_difference
    ax.plot([1, 1 + cd], [0.92, 0.92], color="k", lw=1.5)
    for x in (1, 1 + cd):
        ax.plot([x, x], [0.89, 0.95], color="k", lw=1)
    ax.text(1 + cd / 2, 0.96, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=8)
    bottom = y_axis - step * (len(groups) + 1)
    for g, (i, j) in enumerate(groups):
        y = y_axis - step * (g + 0.6)
        ax.plot([avg[i] - 0.03, avg[j] + 0.03], [y, y], color="k", lw=3, solid_capstyle="round")
    for idx, (name, r) in enumerate(zip(names, avg)):
        left = idx < half
        level = idx if left else k - 1 - idx
        y = bottom - step * level
        edge = 1 - 0.2 * per_in if left else k + 0.2 * per_in
        ax.plot([r, r, edge], [y_axis, y, y], color="#444444", lw=0.8)
        ax.text(edge + (-0.05 if left else 0.05) * per_in, y, f"{name} ({r:.2f})", ha="right" if left else "left",
                va="center", fontsize=8)
    ax.set_ylim(bottom - step * half, 1.3 if title else 1.1)
    if title:
        ax.text((1 + k) / 2, 1.28, title, ha="center", va="top", fontsize=9)
    return fig


def write_cd_diagram(ranks: SuiteRanks, stem: Path, title: str = "") -> list[Path]:
    """``<stem>.png`` and ``<stem>.svg`` of :func:`draw_cd_diagram`, byte-identical for the same ranks."""
    import matplotlib

    written = []
    with matplotlib.rc_context({"svg.hashsalt": "harness-cd", "font.family": "DejaVu Sans", "path.simplify": True}):
        fig = draw_cd_diagram(ranks, title)
        for fmt, meta in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, metadata=meta, dpi=100)
            path = stem.with_name(f"{stem.name}.{fmt}")
            _write_bytes(path, buf.getvalue())
            written.append(path)
    return written


def compare(records: list[dict[str, Any]], a: str, b: str, options: StatsOptions = StatsOptions()) -> pd.DataFrame:
    """The paired difference a - b on every column both rows have (seeds in common), in percentage points:
    its mean, interval (t over the per-seed differences), the test, its p-value and the Holm-adjusted one
    over the columns."""
    scores = seed_scores(records_frame(records))
    rows = sorted(scores["row"].unique())
    for name in (a, b):
        if name not in rows:
            raise choices_error("row (method label, heads as 'label [head]')", name, rows)
    if a == b:
        raise UsageError(f"compare needs two different rows, got {a!r} twice")
    pairs = {}
    for column, part in scores.groupby("column", sort=True):
        values = part.pivot_table(index="seed", columns="row", values="value", aggfunc="first")
        if a in values and b in values:
            pairs[column] = values[[a, b]].dropna()
    testable = sum(len(pair) >= 2 for pair in pairs.values())  # the columns Holm adjusts together
    out = []
    for column, pair in pairs.items():
        if len(pair) < 2:
            out.append({"column": column, "n": len(pair), "test": "n<2"})
            continue
        res = stats.paired_test(pair[a].to_numpy(), pair[b].to_numpy(), 1 - options.alpha, comparisons=testable)
        out.append({"column": column, "n": res.n, f"{a} mean": 100 * pair[a].mean(), f"{b} mean": 100 * pair[b].mean(),
                    "difference": 100 * res.mean_difference, "ci_low": 100 * res.ci_low,
                    "ci_high": 100 * res.ci_high, "test": res.test, "p": res.p_value})
    table = pd.DataFrame(out)
    if table.empty:
        raise UsageError(f"{a!r} and {b!r} share no column with scores")
    if not table["n"].any():  # nothing to pair: a table of n=0 would look like a result
        seeds = {name: ", ".join(map(str, sorted(scores.loc[scores["row"] == name, "seed"].unique()))) for name in (a, b)}
        raise UsageError(f"{a!r} and {b!r} share no seed (seeds {a}: {seeds[a]}; {b}: {seeds[b]}); "
                         f"run both on the same seeds to pair them")
    if "p" in table:
        tested = table["p"].notna()
        table.loc[tested, "p_holm"] = stats.holm(table.loc[tested, "p"].to_numpy())
    return table


def sensitivity(records: list[dict[str, Any]]) -> pd.DataFrame:
    """How the ranking of methods moves with the protocol setting.

    The headline ranking is the methods' (backbone rows') mean rank over the headline columns. Each other
    setting ranks the same methods by mean rank over the datasets under one metric: every kNN grid point
    (``knn/grid/k20_t0.07/top1``), kNN, L-BFGS, SGD and clustering at their suite settings, and the headline
    columns read from each method's ``head`` features where it has them. Per setting: Kendall's tau with the
    headline ranking, the methods ranked and the top method.
    """
    frame = records_frame(records)
    ok = frame[(frame["status"] == "ok") & frame["metric"].notna()]
    means = ok.groupby(["method", "rep", "dataset", "budget", "metric"])["value"].mean().reset_index()
    means["column"] = means["dataset"] + " " + means["budget"] + " " + means["metric"]

    def ranking(part: pd.DataFrame) -> pd.Series:
        """Mean rank (1 = best) of each method with every column of ``part``."""
        wide = part.pivot_table(index="method", columns="column", values="value", aggfunc="first").dropna()
        if wide.empty:
            return pd.Series(dtype=float)
        return pd.Series(stats.average_ranks(wide.to_numpy().T), index=wide.index)

    backbone = means[means["rep"] == "backbone"]
    headline = ranking(backbone[backbone["metric"].map(is_headline).astype(bool)])
    settings: dict[str, pd.Series] = {}
    for metric in sorted(m for m in backbone["metric"].unique() if GRID in m and m.endswith("/top1")):
        settings[f"{metric.split(GRID)[0]} {metric.split(GRID)[1].rsplit('/', 1)[0]}"] = \
            ranking(backbone[backbone["metric"] == metric])
    for protocol, metric in (("knn", "knn/top1"), ("lbfgs", "lbfgs/top1"), ("sgd", "sgd/top1@best_val"),
                             ("clustering", "clustering/acc")):
        if (backbone["metric"] == metric).any():
            settings[f"{protocol} (suite setting)"] = ranking(backbone[backbone["metric"] == metric])
    heads = means[(means["rep"] == "head") & means["metric"].map(is_headline)]
    if not heads.empty:
        swapped = pd.concat([backbone[backbone["metric"].map(is_headline).astype(bool) & ~backbone["method"].isin(heads["method"])],
                             heads])
        settings["head features where a method has them"] = ranking(swapped)
    rows = []
    top = headline.idxmin() if len(headline) else None
    for name, ranks in settings.items():
        common = sorted(set(ranks.index) & set(headline.index))
        if len(common) < 2:
            continue
        best = ranks.loc[common].idxmin()
        rows.append({"setting": name, "methods": len(common),
                     "kendall_tau": stats.kendall_tau(headline.loc[common], ranks.loc[common]),
                     "top": best, "top_changes": best != top})
    return pd.DataFrame(rows, columns=["setting", "methods", "kendall_tau", "top", "top_changes"])


def protocol_notes(records: list[dict[str, Any]]) -> list[str]:
    """One line per protocol with the parameters that produced the numbers."""
    seen: dict[str, str] = {}
    for r in records:
        for name, params in r["spec"]["protocols"].items():
            seen.setdefault(name, ", ".join(f"{k}={_parameter(v)}" for k, v in sorted(params.items())))
    return [f"- `{name}`: {params or 'defaults'}" for name, params in sorted(seen.items())]


def _parameter(value: Any) -> str:
    """A protocol parameter as its record's run id reads it: floats at 12 significant digits (a grid value stored as
    9.999999999999999e-06 shows 1e-05), lists element by element."""
    if isinstance(value, float):
        return repr(float(f"{value:.12g}"))
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(map(_parameter, value))}]"
    return str(value)


def to_markdown(df: pd.DataFrame) -> str:
    cols = [df.index.name or "method", *map(str, df.columns)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples():
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def select_metrics(records: list[dict[str, Any]], keep) -> list[dict[str, Any]]:
    """Copies of ``records`` holding only the metrics for which ``keep(metric)`` is true."""
    return [{**r, "metrics": {rep: {k: v for k, v in m.items() if keep(k)} for rep, m in r.get("metrics", {}).items()}}
            for r in records]


def write_leaderboards(records: list[dict[str, Any]], suite: str, out_dir: Path, title: str = "",
                       tables: dict[str, list[str]] | None = None,
                       options: StatsOptions = StatsOptions()) -> pd.DataFrame:
    """The main table ``<suite>.*`` plus one ``<suite>-<name>.*`` per entry of ``tables``.

    ``tables`` maps a table name to metric prefixes (``{"transfer": ["coarse_to_fine/"]}``); those
    metrics move from the main table to their own. Returns the main display table.
    """
    tables = tables or {}
    records = sorted(records, key=lambda r: r["run_id"])  # same input order, same float sums, same files
    claimed = tuple(p for prefixes in tables.values() for p in prefixes)
    others = [f"{suite}-{name}" for name in tables]
    for dropped in sorted(set(listed_tables(Path(out_dir) / f"{suite}.md")) - set(others)):
        remove_leaderboard(Path(out_dir), dropped)  # an entry gone from the suite's ``tables``
    for name, prefixes in tables.items():
        write_leaderboard(select_metrics(records, lambda k, p=tuple(prefixes): k.startswith(p)), f"{suite}-{name}",
                          out_dir, f"{title or suite}: {name}", options)
    main = select_metrics(records, lambda k: not k.startswith(claimed)) if claimed else records
    return write_leaderboard(main, suite, out_dir, title, options, others)


#: The main table's line naming the suite's other tables (read back to remove those a suite no longer has).
OTHER_TABLES = "Other tables of this suite:"


def listed_tables(main_md: Path) -> list[str]:
    """The other tables a main table ``<suite>.md`` names (none if it is missing or names none)."""
    try:
        lines = main_md.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    line = next((x for x in lines if x.startswith(OTHER_TABLES)), "")
    return re.findall(r"`([^`]+)\.md`", line)


def remove_leaderboard(out_dir: Path, name: str) -> None:
    """Delete the files :func:`write_leaderboard` writes for ``name``."""
    for suffix in (".md", ".csv", ".tex", ".html", "-cd.png", "-cd.svg"):
        (out_dir / f"{name}{suffix}").unlink(missing_ok=True)


def significance_text(board: Leaderboard, options: StatsOptions, markdown: bool = True) -> str:
    """The sentence that says how cells are compared, naming the tests the table used and alpha."""
    bold, italics = ("**Bold**", "_Italics_") if markdown else ("Bold", "Italics")
    tests = " and ".join(sorted(board.tests)) or "none (no column has 2 seeds in common between rows)"
    return (f"Significance: each column's best mean against every other row, paired by seed, two-sided "
            f"(Wilcoxon signed-rank where it can reject after Holm, 2^(1-n) m <= alpha for n seeds and m "
            f"comparisons, else the paired t-test; used here: {tests}), Holm-corrected within the column, "
            f"alpha = {options.alpha:g}. {bold}: significantly better than every other row. {italics}: the best "
            f"mean and the rows not significantly worse than it (tied).")


def checkpoint_text(board: Leaderboard) -> str:
    """The sentence that says which checkpoint and which epoch of a probe the numbers come from: the final
    checkpoint always; a probe's ``@best_val`` columns (the sgd head at its best validation epoch) say so."""
    text = "Every number is an offline evaluation of the final checkpoint (no online probes, no best-epoch selection"
    if any("@best_val" in metric for metric in board.stats["metric"]):
        return (f"{text} of the encoder; a column ending in @best_val is the linear probe's head at the epoch of its "
                f"best validation top-1, chosen without the test split).")
    return f"{text})."


def write_leaderboard(records: list[dict[str, Any]], suite: str, out_dir: Path, title: str = "",
                      options: StatsOptions = StatsOptions(), others: list[str] = ()) -> pd.DataFrame:
    """Write ``<suite>.md/.csv/.tex/.html`` into ``out_dir``, and ``<suite>-cd.png/.svg`` when the table
    allows Friedman's test; return the display table. ``others`` are the names of the suite's other tables,
    listed in the header."""
    board = leaderboard_table(records, options)
    display = board.display
    display.index.name = "method"
    n_ok = sum(r["status"] == "ok" for r in records)
    budgets = sorted({json.dumps(r["spec"]["budget"]) for r in records})
    hashes = sorted({f"{r['spec']['dataset']}: {r['split_sha256'][:12]}" for r in records})
    counts = sorted(board.stats["n"].unique())
    seeds = ("none (no run succeeded)" if not counts else f"{counts[0]}" if len(counts) == 1
             else f"{counts[0]}–{counts[-1]} (the csv's n column)")
    confidence = f"{100 * (1 - options.alpha):g}%"
    out_dir.mkdir(parents=True, exist_ok=True)
    cd_stem = out_dir / f"{suite}-cd"
    if board.ranks is not None:
        write_cd_diagram(board.ranks, cd_stem, f"suite {suite}: mean ranks")
        ranks_text = f"{board.ranks.summary()} Diagram: `{cd_stem.name}.png` (`.svg`)."
    else:  # a diagram left from earlier records would contradict this table's note
        ranks_text = board.ranks_note
        for ext in ("png", "svg"):
            cd_stem.with_suffix(f".{ext}").unlink(missing_ok=True)
    summary, deviations = split_deviations(title or suite)
    header = [f"# Leaderboard: {summary}", "",
              *([f"Deviations from the official code ({len(deviations)}; docs/fidelity.md gives the reasons):",
                 *[f"- {d}" for d in deviations], ""] if deviations else []),
              f"{len(records)} stored runs ({n_ok} ok). Cells: mean over seeds in percent with its {confidence} "
              f"confidence interval in brackets ({options.ci_name}); seeds per cell: {seeds}; \"(n<3)\": fewer than "
              f"3 seeds, no interval; intervals are cut at 100. {RANK_TEXT} "
              f"{checkpoint_text(board)} Rows with [head] evaluate that head's features or assignments instead of the backbone's pooled output.", "",
              significance_text(board, options), "", ranks_text, "",
              f"Budget: {', '.join(budgets)}. Split manifests (sha256): {'; '.join(hashes)}.", "",
              *([f"{OTHER_TABLES} {', '.join(f'`{name}.md`' for name in others)}.", ""] if others else []),
              "Protocols and parameters:", *protocol_notes(records), "",
              "`train s` is wall-clock training time per run; `peak MB` is GPU max allocated on CUDA, "
              "peak resident memory of the process on CPU.", ""]
    md = "\n".join(header) + to_markdown(display) + "\n"
    _write_text(out_dir / f"{suite}.md", md)
    csv = board.stats.drop(columns=["column", "rep"])
    _write_text(out_dir / f"{suite}.csv", csv.to_csv(index=False))
    plain = display.map(lambda s: s.replace("**", "").strip("_") if isinstance(s, str) else s)
    _write_text(out_dir / f"{suite}.tex", plain.to_latex(escape=True))
    body = plain.to_html(escape=True, classes="leaderboard")
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(suite)}</title>"
            f"<h1>Leaderboard: {html.escape(summary)}</h1>"
            + "".join(f"<p>{html.escape(line)}</p>" for line in header[2:] if line) + body)
    _write_text(out_dir / f"{suite}.html", page)
    return display


def _write_bytes(path: Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data), binary=True)


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def split_deviations(title: str) -> tuple[str, list[str]]:
    """A suite description's summary and its numbered deviations from the official code (the text after
    ``Deviations:`` or ``Deviation:``, items ``(1) ...; (2) ...``), so tables can list them one per line."""
    match = re.search(r"Deviations?:", title)
    if match is None:
        return title.strip(), []
    text, items, number = title[match.end():], [], 1
    start = text.find("(1)")
    while start >= 0:  # each item runs to the next number in sequence: a "(10)" inside an item stays in it
        following = text.find(f"({number + 1})", start)
        items.append(text[start + len(f"({number})"):following if following >= 0 else None].strip().rstrip(";.").strip())
        start, number = following, number + 1
    return title[:match.start()].strip().rstrip("."), [item for item in items if item]
