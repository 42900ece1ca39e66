"""Leaderboards from stored records only: pandas tables written as Markdown, CSV, LaTeX and HTML.

One row per method (heads as separate rows), columns per dataset x metric, mean ± std over
seeds with the seed count, the best mean per column marked, the mean rank, training time and
peak memory. Every number is an offline evaluation of the final checkpoint.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from harness.errors import UsageError

#: Metric name endings that are scores (higher is better); other stored values (chosen l2, ...) are not ranked.
SCORE_SUFFIXES = ("top1", "top5", "acc", "nmi", "ami", "ari", "acc_majority")


def is_score(metric: str) -> bool:
    """Test-set scores only: validation accuracies used for model selection are not ranked."""
    leaf = metric.split("/")[-1]
    return not leaf.startswith("val_") and any(leaf == s or leaf.endswith("_" + s) or leaf.startswith(s + "@") for s in SCORE_SUFFIXES)


def row_label(record: dict[str, Any], rep: str) -> str:
    label = record["spec"]["label"]
    return label if rep == "backbone" else f"{label} [{rep}]"


def records_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Long table: one row per (record, representation, metric)."""
    rows = []
    for r in records:
        base = {"method": r["spec"]["label"], "dataset": r["spec"]["dataset"], "seed": r["spec"]["seed"],
                "budget": json.dumps(r["spec"]["budget"]), "split_sha256": r["split_sha256"], "status": r["status"],
                "train_seconds": r.get("train_seconds", np.nan),
                "peak_memory_mb": (r.get("train") or {}).get("peak_memory_mb", np.nan)}
        if r["status"] != "ok":
            rows.append({**base, "row": r["spec"]["label"], "metric": None, "value": np.nan})
        for rep, metrics in r.get("metrics", {}).items():
            for metric, value in metrics.items():
                rows.append({**base, "row": row_label(r, rep), "metric": metric, "value": value})
    return pd.DataFrame(rows)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """mean, std, n per (row, dataset, budget, metric); refuses cells that mix split hashes."""
    ok = frame[(frame["status"] == "ok") & frame["metric"].notna()]
    ok = ok[ok["metric"].map(is_score)]
    mixed = ok.groupby(["row", "dataset", "budget", "metric"])["split_sha256"].nunique()
    if (mixed > 1).any():
        row, dataset, _, metric = mixed[mixed > 1].index[0]
        raise UsageError(f"records of {row!r} on {dataset!r} ({metric}) come from different data splits "
                         f"(split hashes differ); rerun them or move the stale records out of the results dir")
    stats = ok.groupby(["row", "dataset", "budget", "metric"])["value"].agg(["mean", "std", "count"]).reset_index()
    stats["std"] = stats["std"].fillna(0.0)
    return stats


def leaderboard_table(records: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(display table of strings, numeric summary). Values are shown in percent."""
    frame = records_frame(records)
    if frame.empty:
        raise UsageError("no stored records to build a leaderboard from; run the suite first")
    stats = summarize(frame)
    multi_budget = stats["budget"].nunique() > 1
    stats["column"] = stats.apply(lambda s: f"{s['dataset']} {s['metric']}" + (f" {s['budget']}" if multi_budget else ""),
                                  axis=1)
    means = stats.pivot(index="row", columns="column", values="mean")
    stds = stats.pivot(index="row", columns="column", values="std")
    counts = stats.pivot(index="row", columns="column", values="count")
    best = means.max()
    display = pd.DataFrame(index=means.index)
    for col in means.columns:
        cells = []
        for row in means.index:
            m = means.at[row, col]
            if np.isnan(m):
                cells.append("–")
                continue
            cell = f"{100 * m:.1f} ± {100 * stds.at[row, col]:.1f} ({int(counts.at[row, col])})"
            cells.append(f"**{cell}**" if np.isclose(m, best[col]) else cell)
        display[col] = cells
    rank = means.rank(ascending=False, method="min").mean(axis=1)
    display.insert(0, "rank", rank.map(lambda v: f"{v:.1f}"))
    per_row = frame.groupby("row")
    display["train s"] = per_row["train_seconds"].mean().reindex(means.index).map(lambda v: f"{v:.1f}")
    display["peak MB"] = per_row["peak_memory_mb"].mean().reindex(means.index).map(
        lambda v: "–" if not v or np.isnan(v) else f"{v:.0f}")
    failed = frame[frame["status"] != "ok"].groupby("row")["seed"].nunique()
    if len(failed):
        display["failed runs"] = failed.reindex(means.index).fillna(0).astype(int)
    order = rank.sort_values(kind="stable").index
    return display.loc[order], stats


def protocol_notes(records: list[dict[str, Any]]) -> list[str]:
    """One line per protocol with the parameters that produced the numbers."""
    seen: dict[str, str] = {}
    for r in records:
        for name, params in r["spec"]["protocols"].items():
            seen.setdefault(name, ", ".join(f"{k}={v}" for k, v in sorted(params.items())))
    return [f"- `{name}`: {params or 'defaults'}" for name, params in sorted(seen.items())]


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
                       tables: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """The main table ``<suite>.*`` plus one ``<suite>-<name>.*`` per entry of ``tables``.

    ``tables`` maps a table name to metric prefixes (``{"transfer": ["coarse_to_fine/"]}``); those
    metrics move from the main table to their own. Returns the main display table.
    """
    tables = tables or {}
    records = sorted(records, key=lambda r: r["run_id"])  # same input order, same float sums, same files
    claimed = tuple(p for prefixes in tables.values() for p in prefixes)
    for name, prefixes in tables.items():
        write_leaderboard(select_metrics(records, lambda k, p=tuple(prefixes): k.startswith(p)), f"{suite}-{name}",
                          out_dir, f"{title or suite}: {name}")
    main = select_metrics(records, lambda k: not k.startswith(claimed)) if claimed else records
    return write_leaderboard(main, suite, out_dir, title)


def write_leaderboard(records: list[dict[str, Any]], suite: str, out_dir: Path, title: str = "") -> pd.DataFrame:
    """Write ``<suite>.md/.csv/.tex/.html`` into ``out_dir``; return the display table."""
    display, stats = leaderboard_table(records)
    display.index.name = "method"
    n_ok = sum(r["status"] == "ok" for r in records)
    budgets = sorted({json.dumps(r["spec"]["budget"]) for r in records})
    hashes = sorted({f"{r['spec']['dataset']}: {r['split_sha256'][:12]}" for r in records})
    header = [f"# Leaderboard: {title or suite}", "",
              f"{len(records)} stored runs ({n_ok} ok). Mean ± std over seeds in percent, number of seeds in "
              f"parentheses, best mean per column in bold, rank = mean rank over columns. Every number is an offline "
              f"evaluation of the final checkpoint (no online probes, no best-epoch selection). Rows with [head] "
              f"evaluate that head's features or assignments instead of the backbone's pooled output.", "",
              f"Budget: {', '.join(budgets)}. Split manifests (sha256): {'; '.join(hashes)}.", "",
              "Protocols and parameters:", *protocol_notes(records), "",
              "`train s` is wall-clock training time per run; `peak MB` is GPU max allocated on CUDA, "
              "peak resident memory of the process on CPU.", ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    md = "\n".join(header) + to_markdown(display) + "\n"
    _write_text(out_dir / f"{suite}.md", md)
    _write_text(out_dir / f"{suite}.csv", stats.drop(columns=["column"]).to_csv(index=False))
    plain = display.map(lambda s: s.replace("**", "") if isinstance(s, str) else s)
    _write_text(out_dir / f"{suite}.tex", plain.to_latex(escape=True))
    body = plain.to_html(escape=True, classes="leaderboard")
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(suite)}</title>"
            f"<h1>Leaderboard: {html.escape(title or suite)}</h1>"
            + "".join(f"<p>{html.escape(line)}</p>" for line in header[2:] if line) + body)
    _write_text(out_dir / f"{suite}.html", page)
    return display


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
