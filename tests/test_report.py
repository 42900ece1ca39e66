"""The HTML report (harness.reporting.report) on records of a tiny real run, and the optional training loggers."""
from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import make_suite
from harness.errors import UsageError
from harness.reporting.leaderboard import leaderboard_table
from harness.engine.logging_backends import NullLogger, check_backend, make_logger
from harness.reporting.report import metric_definition, write_report
from methods import METHODS, register_method

FAST = {"knn": {"k": 10}, "clustering": {}}
EMBED = 150  # a smaller t-SNE subsample than the default 500 keeps the test quick


@register_method("_report_clusterer")
class _Clusterer(METHODS.get("simclr")):
    """SimCLR plus a 10-way cluster head and a projector representation (a deep-clustering stand-in)."""

    description = "test double: SimCLR with a cluster head"

    def __init__(self, backbone, cfg, info) -> None:
        super().__init__(backbone, cfg, info)
        self.cluster = nn.Linear(backbone.out_dim, 10)

    def training_step(self, batch):
        loss = super().training_step(batch)
        p = F.softmax(self.cluster(self.backbone(batch.views[0])), 1).mean(0)
        return loss + (p * p.clamp_min(1e-8).log()).sum()  # minus the entropy of the mean assignment

    def representations(self, x):
        h = self.backbone(x)
        return {"backbone": h, "head": self.projector(h)}

    def cluster_heads(self, x):
        return {"cluster_head": self.cluster(self.backbone(x))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Records (and checkpoints) of random, pixels, simclr and the clusterer, 2 seeds, 3 steps; one report."""
    from harness.execution.runner import Runner, plan

    root = tmp_path_factory.mktemp("report")
    suite = make_suite(["random", "pixels", "simclr", "_report_clusterer"], seeds=(0, 1), budget="steps=3",
                       protocols=FAST, name="tiny")
    records = Runner(root / "results", root / "data", device="cpu", quiet=True, log=lambda s: None).run(plan(suite))
    index = write_report("tiny", root / "results", root / "out", root / "data", embed_samples=EMBED)
    return types.SimpleNamespace(root=root, records=records, index=index)


def _esc_text(text: str) -> str:
    return html.escape(text, quote=True)


def _figures(index: Path) -> set[str]:
    return {p.name for p in (index.parent / "figures").glob("*.png")}


def _img_srcs(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_report_writes_page_and_every_figure(tiny):
    index = tiny.index
    assert index == tiny.root / "out" / "tiny" / "index.html"
    page = index.read_text()
    board = leaderboard_table(tiny.records)
    display, stats = board.display, board.stats
    # the table: one row per leaderboard row, in rank order; two seeds each: a mean and "(n<3)", no interval
    table = page.split('<table id="leaderboard"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr><td>([^<]*)</td>", table)
    assert rows == [html.escape(r) for r in display.index]
    assert "_report_clusterer [cluster_head]" in display.index and "_report_clusterer [head]" in display.index
    assert re.search(r"<td [^>]*>\d+\.\d \(n&lt;3\)</td>", table) and not re.search(r"\d \[\d", table)
    assert "Wilcoxon signed-rank where it can reject after Holm" in page and "alpha = 0.05" in page
    # ranks across the suite: Friedman's sentence and the critical-difference diagram over the headline columns
    assert board.ranks is not None and _esc_text(board.ranks.summary()) in page
    assert '<img src="figures/critical-difference.png"' in page
    assert (index.parent / "figures" / "critical-difference.svg").is_file()
    # protocol sensitivity: every kNN grid point (k clamped to the memory set) against the headline ranking
    sensitivity = page.split('<table id="sensitivity"', 1)[1].split("</table>", 1)[0]
    assert "<td>knn k10_t0.07</td>" in sensitivity and "<td>knn k200_t0.5</td>" in sensitivity
    assert "<td>clustering (suite setting)</td>" in sensitivity
    # definitions, protocol parameters, environment and split hashes
    for metric in stats["metric"].unique():
        assert f"<dt>{metric}</dt>" in page
    assert "<code>k=10</code>" in page and "<code>temperature=0.1</code>" in page
    assert tiny.records[0]["split_sha256"] in page and tiny.records[0]["environment"]["packages"]["torch"] in page
    # every figure the page references exists, and every figure written is referenced
    srcs = _img_srcs(page)
    assert len(srcs) == len(set(srcs)) and {Path(s).name for s in srcs} == _figures(index)
    figures = _figures(index)
    assert len([f for f in figures if f.startswith("bar_")]) == stats["column"].nunique()
    assert {"curve_simclr_digits.png", "curve__report_clusterer_digits.png"} <= figures
    assert not any(f.startswith(("curve_random", "curve_pixels")) for f in figures)  # baselines do not train
    assert {f"embed_{m}_digits.png" for m in ("random", "pixels", "simclr", "_report_clusterer")} <= figures
    assert [f for f in figures if f.startswith("gallery_")] == ["gallery__report_clusterer_cluster_head_digits.png"]
    # backbone, head and the cluster-coloured backbone side by side: three panels wide
    from matplotlib.image import imread

    wide = imread(index.parent / "figures" / "embed__report_clusterer_digits.png").shape[1]
    narrow = imread(index.parent / "figures" / "embed_simclr_digits.png").shape[1]
    assert wide == 3 * narrow
    for name in figures:
        assert (index.parent / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_records_give_byte_identical_files(tiny):
    again = write_report("tiny", tiny.root / "results", tiny.root / "again", tiny.root / "data", embed_samples=EMBED)
    first, second = tiny.index.parent, again.parent
    names = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), f"{name} differs between two reports"


def test_missing_checkpoint_is_a_note_and_baselines_still_embed(tiny, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(tiny.root / "results", results)
    shutil.rmtree(results / "tiny" / ".ckpt")  # a fresh clone: records only
    index = write_report("tiny", results, tmp_path / "out", tiny.root / "data", embed_samples=EMBED)
    page, figures = index.read_text(), _figures(index)
    assert "no checkpoint of run" in page and "rerun it to see its features" in page
    assert {"embed_random_digits.png", "embed_pixels_digits.png"} <= figures
    assert not any(f.startswith(("embed_simclr", "embed__report", "gallery_")) for f in figures)
    assert "curve_simclr_digits.png" in figures  # curves come from the records alone


def test_fresh_clone_keeps_the_figures_an_earlier_report_drew_from_the_same_runs(tiny, tmp_path):
    """Checkpoints are not committed, figures are: a report on a fresh clone (records and the earlier report's
    figures, no checkpoints) keeps each embedding and gallery drawn from the same run, byte for byte, and writes
    the same page; a figure drawn with other samples or from another training of the run is not kept."""
    results, out = tmp_path / "results", tmp_path / "out"
    shutil.copytree(tiny.root / "results", results)
    shutil.rmtree(results / "tiny" / ".ckpt")
    shutil.copytree(tiny.index.parent, out / "tiny")
    index = write_report("tiny", results, out, tiny.root / "data", embed_samples=EMBED)
    assert index.read_bytes() == tiny.index.read_bytes()  # the page written where the weights are
    before = tiny.index.parent / "figures"
    assert _figures(index) == _figures(tiny.index)
    for name in _figures(index):
        assert (index.parent / "figures" / name).read_bytes() == (before / name).read_bytes(), name
    other = write_report("tiny", results, out, tiny.root / "data", embed_samples=EMBED - 1)
    assert not any(f.startswith(("embed_simclr", "gallery_")) for f in _figures(other))
    shutil.copytree(tiny.index.parent, out / "tiny", dirs_exist_ok=True)
    for path in (results / "tiny").glob("*.json"):  # the same runs trained again (--force): not the figures' runs
        path.write_text(path.read_text().replace('"created": "', '"created": "1'))
    rerun = write_report("tiny", results, out, tiny.root / "data", embed_samples=EMBED)
    assert not any(f.startswith(("embed_simclr", "gallery_")) for f in _figures(rerun))


def test_report_without_records_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no stored records"):
        write_report("nothing", tmp_path / "results", tmp_path / "out", tmp_path / "data")


def test_metric_definitions():
    assert "Hungarian" in metric_definition("clustering/acc")
    assert "coarse" in metric_definition("clustering/coarse_nmi@k20") and "20 clusters" in metric_definition(
        "clustering/coarse_nmi@k20")
    assert "top-1" in metric_definition("knn/top1").lower()
    assert metric_definition("lbfgs/something_new")  # unknown leaves still get a sentence


# ------------------------------------------------------------------------- the page in a real browser
def _browser() -> str | None:
    for name in (os.environ.get("HARNESS_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable", "/usr/bin/chromium"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_page_in_headless_chromium(tiny, tmp_path):
    """The page's own ``?selftest`` script sorts a column twice and checks images; --dump-dom returns its report."""
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set HARNESS_CHROMIUM to a Chrome binary)")
    url = tiny.index.resolve().as_uri() + "?selftest"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
           "--disable-extensions", "--mute-audio", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=10000", "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="selftest">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert found and found.group(1), f"selftest did not run (exit {proc.returncode}): {proc.stderr[-2000:]}"
    result = json.loads(html.unescape(found.group(1)))
    assert result["done"]

    board = leaderboard_table(tiny.records)
    display, stats = board.display, board.stats
    assert result["rows"] == list(display.index)  # every row, in rank order
    assert result["headers"] == ["method", *display.columns]
    # a click on the first metric column sorts it descending, a second click ascending; missing values last
    column = next(c for c in display.columns if c not in ("rank", "train s", "peak MB"))
    means = stats[stats["column"] == column].set_index("row")["mean"]
    original = list(display.index)

    def expected(sign: int) -> list[str]:
        return sorted(original, key=lambda r: (r not in means or math.isnan(means[r]),
                                               sign * means.get(r, 0.0), original.index(r)))

    down, up = result["clicks"]
    assert down["column"] == column and down["direction"] == "descending" and down["rows"] == expected(-1)
    assert up["direction"] == "ascending" and up["rows"] == expected(+1)
    assert down["rows"] != up["rows"]
    values = [float(v) for v in down["values"] if v]
    assert values == sorted(values, reverse=True)
    # every image loaded
    images = result["images"]
    assert {Path(i["src"]).name for i in images} == _figures(tiny.index)
    broken = [i["src"] for i in images if not i["complete"] or i["width"] <= 0]
    assert not broken, f"images that did not load: {broken}"


# ------------------------------------------------------------------------- training loggers
def test_logging_is_off_by_default_and_validated():
    for kind in (None, "none"):
        logger = make_logger(kind, Path("/nonexistent"), {})
        assert isinstance(logger, NullLogger)
        logger.log_scalars(1, {"loss": 1.0})
        logger.close()
        check_backend(kind)
    with pytest.raises(UsageError, match="unknown log backend 'mlflow'"):
        make_logger("mlflow", Path("."), {})
    with pytest.raises(UsageError, match="unknown log backend"):
        check_backend("mlflow")


def test_missing_backend_package_is_a_usage_error_with_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UsageError, match="pip install wandb"):
        make_logger("wandb", tmp_path, {})
    with pytest.raises(UsageError, match="pip install tensorboard"):
        check_backend("tensorboard")
    assert not any(tmp_path.iterdir())


def test_wandb_logger_calls(monkeypatch, tmp_path):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = make_logger("wandb", tmp_path / "abc123", {"label": "simclr", "seed": 0})
    logger.log_scalars(3, {"train/loss": torch.tensor(1.5), "train/lr": np.float32(0.1), "bad": float("nan"),
                           "text": "x"})
    logger.close()
    assert calls[0][0] == "init" and calls[0][1]["id"] == "abc123" and calls[0][1]["config"]["seed"] == 0
    assert calls[1] == ("log", {"train/loss": 1.5, "train/lr": pytest.approx(0.1)}, 3)
    assert calls[2] == ("finish",)


def test_tensorboard_logger_writes_events(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = make_logger("tensorboard", tmp_path / "run", {"label": "simclr"})
    for step in (1, 2, 3):
        logger.log_scalars(step, {"train/loss": 1.0 / step, "skip": float("inf")})
    logger.close()
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert events.Tags()["scalars"] == ["train/loss"]
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.3333)]


def test_cli_report_without_features(tiny, tmp_path, capsys):
    from harness.cli import main

    rc = main(["report", "tiny", "--results-dir", str(tiny.root / "results"), "--leaderboard-dir", str(tmp_path),
               "--data-dir", str(tiny.root / "data"), "--no-features"])
    assert rc == 0
    index = tmp_path / "tiny" / "index.html"
    assert capsys.readouterr().out.count(f"written {index}") == 1  # once: the CLI printed it a second time
    assert "embeddings and cluster galleries were not drawn" in index.read_text()
    assert not any(f.startswith(("embed_", "gallery_")) for f in _figures(index))


def test_training_streams_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from harness.execution.runner import Runner, plan

    suite = make_suite(["simclr"], budget="steps=3", protocols={"knn": {"k": 10}}, name="tb")
    (job,) = plan(suite)
    Runner(tmp_path / "results", tmp_path / "data", device="cpu", quiet=True, log=lambda s: None,
           log_backend="tensorboard").run([job])
    events = EventAccumulator(str(tmp_path / "results" / "tb" / ".logs" / job.run_id))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def test_budget_grid_gets_a_learning_curve_per_headline_metric(tmp_path, monkeypatch):
    """A suite with a budget grid: one learning-curve chart per dataset and headline metric (kNN top-1
    here, not top-5), x at the budgets' amounts; the untrained random encoder is dashed, the trained rows
    solid; budgets that mix units have no common axis."""
    from harness.reporting import report
    from harness.reporting.report import budget_axis
    from harness.execution.runner import Runner, plan

    suite = make_suite(["random", "simclr"], budget=[{"steps": 1}, {"steps": 3}], protocols={"knn": {"k": 10}},
                       name="grid")
    Runner(tmp_path / "results", tmp_path / "data", device="cpu", quiet=True, log=lambda s: None).run(plan(suite))
    save, styles = report._save, {}

    def save_and_read_styles(fig, path):
        if path.name.startswith("budget_"):
            styles.update({line.get_label(): line.get_linestyle() for line in fig.axes[0].get_lines()})
        save(fig, path)

    monkeypatch.setattr(report, "_save", save_and_read_styles)
    index = write_report("grid", tmp_path / "results", tmp_path / "out", tmp_path / "data", features=False)
    assert styles == {"random (untrained)": "--", "simclr": "-"}, styles
    page = index.read_text()
    assert "<h2 id=\"budgets\">Learning curves</h2>" in page and "href='#budgets'" in page
    assert [f for f in _figures(index) if f.startswith("budget_")] == ["budget_digits_knn-top1.png"]
    assert '<img src="figures/budget_digits_knn-top1.png"' in page
    assert budget_axis(['{"steps": 3}', '{"steps": 1}']) == ([3.0, 1.0], "steps")
    assert budget_axis(['{"steps": 3}', '{"epochs": 1}']) is None


def test_single_budget_suite_has_no_learning_curve_section(tiny):
    page = tiny.index.read_text()
    assert "Learning curves" not in page and not any(f.startswith("budget_") for f in _figures(tiny.index))


def _synthetic_results(tmp_path: Path) -> Path:
    """test_leaderboard's three rows x three seeds stored as the records of a suite named "syn", with a kNN grid point
    that reverses their kNN order."""
    from test_leaderboard import synthetic_records

    results = tmp_path / "results"
    (results / "syn").mkdir(parents=True)
    for r in synthetic_records():
        r["metrics"]["backbone"]["knn/grid/k10_t0.5/top1"] = 1 - r["metrics"]["backbone"]["knn/top1"]
        (results / "syn" / f"{r['run_id']}.json").write_text(json.dumps(r))
    return results


def test_report_table_marks_cells_and_follows_alpha(tmp_path):
    """The page's leaderboard carries the table's marks as classes (best's kNN cell bold, the lbfgs best and "a" tied,
    "b" unmarked), sorts rank ascending first, and ``options`` reach it: at alpha 0.1 the intro says 90% and the cells
    are 90% intervals, mean ± t_{0.95, 2} * std / sqrt 3 with t_{0.95, 2} = 2.919986: best's kNN 92.0 ± 3.37 = [88.6, 95.4],
    its lbfgs 85.0 ± 8.43 = [76.6, 93.4]. Catches marks lost on the page, a
    report that ignores --alpha/--ci, and rank sorted worst first."""
    from harness.reporting.leaderboard import StatsOptions

    index = write_report("syn", _synthetic_results(tmp_path), tmp_path / "out", tmp_path / "data", features=False,
                         options=StatsOptions(alpha=0.1))
    page = index.read_text()
    table = page.split('<table id="leaderboard"', 1)[1].split("</table>", 1)[0]
    cells = {row: re.findall(r"<td data-sort=\"[^\"]*\"( class=\"\w+\")?>([^<]*)</td>", cells)
             for row, cells in re.findall(r"<tr><td>([^<]*)</td>(.*?)</tr>", table)}
    metric = {row: [(cls.strip(), text) for cls, text in found if "[" in text] for row, found in cells.items()}
    assert metric["best"] == [('class="best"', "92.0 [88.6, 95.4]"), ('class="tied"', "85.0 [76.6, 93.4]")]
    assert metric["a"][1][0] == 'class="tied"' and [cls for cls, _ in metric["b"]] == ["", ""]
    assert "with its 90% confidence interval" in page and "alpha = 0.1" in page
    assert re.search(r'<th data-type="num" data-first="asc" data-kind="rank"', table)


def test_report_sensitivity_rows_give_tau_with_its_sign_and_where_the_top_changes(tmp_path):
    """The grid point k10_t0.5 reverses the headline order (best, a, b): tau = -1 and the top changes to b; kNN at the
    suite setting keeps it: tau = 1, no change. Catches a lost sign of tau and a "top changes" column that says yes
    where the top stays."""
    index = write_report("syn", _synthetic_results(tmp_path), tmp_path / "out", tmp_path / "data", features=False)
    table = index.read_text().split('<table id="sensitivity"', 1)[1].split("</table>", 1)[0]
    assert "<tr><td>knn k10_t0.5</td><td>3</td><td>-1.00</td><td>b</td><td>yes</td></tr>" in table
    assert "<tr><td>knn (suite setting)</td><td>3</td><td>1.00</td><td>best</td><td></td></tr>" in table


def test_bar_chart_orders_rows_by_mean_and_whiskers_are_one_std(tmp_path, monkeypatch):
    """Bars top to bottom from the highest mean; whiskers mean ± 1 std (the axis label's promise), here 80 ± 2 and
    60 ± 5 points, not ± std / sqrt(n). Catches an ascending order and the standard error drawn as the std."""
    from matplotlib.container import ErrorbarContainer

    from harness.reporting import report

    drawn = {}
    monkeypatch.setattr(report, "_save", lambda fig, path, provenance=None: drawn.update(fig=fig))
    rows = [{"row": "a", "mean": 0.6, "std": 0.05, "n": 4}, {"row": "b", "mean": 0.8, "std": 0.02, "n": 4}]
    report.bar_chart(rows, {"a": [0.55, 0.6, 0.6, 0.65], "b": [0.78, 0.8, 0.8, 0.82]}, "digits knn/top1",
                     tmp_path / "bar.png")
    ax = drawn["fig"].axes[0]
    ticks = sorted(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels())), reverse=True)
    assert [label for _, label in ticks] == ["b", "a"]
    (errorbar,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    whiskers = {round(float(seg[0][1])): (float(seg[0][0]), float(seg[1][0])) for seg in errorbar.lines[2][0].get_segments()}
    assert whiskers == {1: pytest.approx((78.0, 82.0)), 0: pytest.approx((55.0, 65.0))}


@pytest.mark.parametrize("norm", ["none", "dataset"])
def test_the_reports_features_are_of_the_images_as_the_run_normalised_them(tmp_path, norm):
    """The report re-extracts a run's features with the run's own ``input_norm``: the ``pixels`` baseline's features
    are its input images, so with ``none`` they are the pixels in [0, 1] and with ``dataset`` digits' standardised
    pixels. Catches the report extracting with the dataset's normalisation whatever the run used (figures of
    inputs the encoder never saw)."""
    from harness.data.datasets import load_dataset
    from harness.execution.runner import Runner, plan
    from harness.reporting.report import extract

    suite = make_suite([{"name": "pixels", "config": {"input_norm": norm}}], protocols=FAST, name="norm")
    runner = Runner(tmp_path / "results", tmp_path / "data", device="cpu", quiet=True, log=lambda s: None)
    (record,) = runner.run(plan(suite))
    pool = np.arange(5)
    features = extract(runner, record, pool, "cpu").features["backbone"]
    data = load_dataset("digits", tmp_path / "data")
    pixels = data.images[:5].flatten(1).numpy() / 255
    expected = pixels if norm == "none" else (pixels - data.mean[0]) / data.std[0]
    np.testing.assert_allclose(features, expected, rtol=0, atol=1e-5)


def test_figure_names_of_long_row_labels_stay_short_and_distinct():
    """A row label of thousands of characters (a suite may give one) or an image folder's long path names its
    figures: each name keeps its start, stays far below the 255 bytes a file name may have, and two labels that
    differ only at their end get two names. Catches the report that stopped with 'File name too long' after it had
    written some of its figures (a CLI sweep)."""
    from harness.reporting.report import _Names

    names = _Names()
    first, second = names("curve", "x" * 3000, "digits"), names("curve", "x" * 2999 + "y", "digits")
    assert first.startswith("curve_xxx") and first.endswith(".png") and len(first.encode()) <= 200
    assert first != second and len(second.encode()) <= 200
    assert _Names()("curve", "x" * 3000, "digits") == first  # deterministic: a report run again names it alike
    assert names("curve", "simclr", "digits") == "curve_simclr_digits.png"  # short names are as they were
