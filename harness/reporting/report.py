"""A static HTML report of a suite from its stored records: ``leaderboards/<suite>/index.html``.

The page holds the leaderboard (mean ± std over seeds with seed counts, columns sortable by
clicking their headers, inline vanilla JS that works from ``file://``), each metric's
definition and the protocol parameters, the environment and split hashes, and figures
saved as PNG beside it under ``figures/``:

- a bar chart per leaderboard column with error bars (std over seeds) and each seed's value;
- training curves (loss and learning rate per epoch, one line per seed) per method;
- a 2-D t-SNE embedding per method of a fixed subsample's features, coloured by class, one
  panel per representation (backbone and head side by side), plus the backbone embedding
  coloured by cluster-head assignment for clustering methods;
- for methods with cluster heads, a gallery of a few samples per cluster.

Embeddings and galleries need features: the method is rebuilt from the record's spec with
the :class:`~harness.execution.runner.Runner`, its final weights loaded from the run's checkpoint
(``results/<suite>/.ckpt/<run_id>.pt``), and features extracted with
:class:`~harness.engine.evaluate.RunContext`; baselines that do not train are built directly. Each
embedding and gallery PNG names the run it was drawn from (and its caption) in its Description text
chunk: where a run's checkpoint is gone (a fresh clone: checkpoints are not committed, figures are),
the figures an earlier report drew from that same training of the run stay, and the page is the one
written where the weights are; without them the run is skipped with a note.

Everything is deterministic: the same records (and checkpoints) give byte-identical files.
Figures are drawn with matplotlib's Agg canvas without touching pyplot's global state, with
fixed rc parameters and no PNG metadata beyond that provenance; t-SNE uses a fixed seed and one thread.
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from harness.errors import UsageError
from harness.execution.store import write_atomic
from harness.reporting.leaderboard import (RANK_TEXT, Leaderboard, StatsOptions, checkpoint_text, is_headline,
                                           is_score, leaderboard_table, records_frame, row_label, sensitivity,
                                           significance_text, suite_records, write_cd_diagram)

#: Samples in the 2-D embeddings (drawn once per dataset with :data:`SUBSAMPLE_SEED`, the same for every method).
EMBED_SAMPLES = 500
#: Samples whose cluster assignments the galleries choose from (the embedding subsample comes first).
GALLERY_POOL = 2000
GALLERY_PER_CLUSTER = 8
GALLERY_MAX_CLUSTERS = 20
SUBSAMPLE_SEED = 0
TSNE_SEED = 0
FIGURES = "figures"

#: Fixed drawing settings so that every machine with the same matplotlib draws the same bytes.
RC = {"svg.hashsalt": "harness-report", "figure.dpi": 100, "savefig.dpi": 100, "font.family": "DejaVu Sans",
      "font.size": 9, "axes.titlesize": 10, "axes.spines.top": False, "axes.spines.right": False,
      "path.simplify": True, "image.interpolation": "nearest", "savefig.bbox": None}

#: Definitions of the metric leaves the harness's protocols report (``protocol/leaf``).
METRIC_BASES = {
    "top1": "top-1 accuracy: fraction of test samples whose predicted class is the true class",
    "top5": "top-5 accuracy: fraction of test samples whose true class is among the 5 highest-scored classes",
    "acc": "clustering accuracy (ACC): fraction of samples correctly labelled under the best one-to-one "
           "matching of clusters to classes (Hungarian algorithm on the class x cluster contingency table)",
    "acc_majority": "majority accuracy: every cluster is labelled with its most frequent class (many-to-one), "
                    "reported when the number of clusters differs from the number of classes",
    "nmi": "normalised mutual information between clusters and classes, normalised by the arithmetic mean of "
           "the two entropies (scikit-learn's default); 1 = identical partitions, 0 = independent",
    "ami": "adjusted mutual information: NMI corrected for the agreement expected by chance (arithmetic-mean "
           "normaliser); 0 = chance level",
    "ari": "adjusted Rand index: pair-counting agreement between clusters and classes corrected for chance; "
           "0 = chance level, 1 = identical partitions",
}

def metric_definition(metric: str) -> str:
    """A one-sentence definition of ``protocol/leaf`` (``clustering/coarse_acc@k20`` and the like)."""
    leaf = metric.rpartition("/")[2]
    base, coarse, at = leaf, False, ""
    if "@" in base:
        base, at = base.split("@", 1)
    if base.startswith("coarse_"):
        base, coarse = base[len("coarse_"):], True
    text = METRIC_BASES.get(base)
    if text is None:
        for suffix in sorted(METRIC_BASES, key=len, reverse=True):  # e.g. linear_top1
            if base.endswith("_" + suffix):
                text = f"{METRIC_BASES[suffix]} ({base[:-len(suffix) - 1]})"
                break
    if text is None:
        text = "score reported by the protocol (higher is better)" if is_score(metric) else "value reported by the protocol"
    if coarse:
        text += ", against the coarse (superclass) labels"
    if at:
        text += f", with {at.lstrip('k')} clusters" if at.startswith("k") else f" ({at})"
    return f"{text[0].upper()}{text[1:]}."


# ---------------------------------------------------------------------------- small helpers
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "x"


#: The longest figure file name stem kept as it is; a longer one (a row label or an image folder's path of hundreds of
#: characters) keeps its start and gets a hash of the whole, so that it stays far below the 255 bytes a name may have.
NAME_STEM_MAX = 150


class _Names:
    """Unique, readable, deterministic file names."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, *parts: str) -> str:
        base = "_".join(_slug(p) for p in parts if p)
        if len(base) > NAME_STEM_MAX:
            base = f"{base[:NAME_STEM_MAX - 13]}-{hashlib.sha256(base.encode()).hexdigest()[:12]}"
        name, i = f"{base}.png", 2
        while name in self.used:
            name, i = f"{base}-{i}.png", i + 1
        self.used.add(name)
        return name


def _write_bytes(path: Path, data: bytes) -> None:
    """Atomic write that leaves an identical file untouched."""
    if path.is_file() and path.read_bytes() == data:
        return
    write_atomic(path, lambda f: f.write(data), binary=True)


def _save(fig, path: Path, provenance: dict[str, str] | None = None) -> None:
    """PNG without a Software tag; ``provenance`` (the run a figure was drawn from and its caption) goes into
    its Description text chunk, so a report without that run's checkpoint can keep the figure."""
    import io

    buf = io.BytesIO()
    description = {"Description": json.dumps(provenance, sort_keys=True)} if provenance else {}
    fig.savefig(buf, format="png", metadata={"Software": None, **description})
    _write_bytes(path, buf.getvalue())


def drawn_figures(fig_dir: Path) -> dict[str, list[dict[str, str]]]:
    """The figures under ``fig_dir`` drawn from one run's features, by run id: each one's provenance
    (``name``, ``run_id``, ``section``, ``caption``, ``alt``, ``samples``). Figures without it are left out."""
    from PIL import Image

    found: dict[str, list[dict[str, str]]] = {}
    for path in sorted(fig_dir.glob("*.png")):
        try:
            with Image.open(path) as image:
                about = json.loads(image.text.get("Description", "null"))
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(about, dict) and {"run_id", "section", "caption", "alt", "samples"} <= set(about):
            found.setdefault(about["run_id"], []).append({**about, "name": path.name})
    return found


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _budget_text(budget: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in budget.items())


def _group_key(record: dict) -> tuple[str, str, str]:
    spec = record["spec"]
    return spec["label"], spec["dataset"], json.dumps(spec["budget"], sort_keys=True)


def _class_colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return [cmap(i if n <= 20 else i / max(1, n - 1)) for i in range(n)]


# ---------------------------------------------------------------------------- figures
def bar_chart(stats_rows, frame_rows, column: str, path: Path) -> None:
    """Horizontal bars of one leaderboard column: mean with std error bars, seeds as dots, n annotated."""
    rows = sorted(stats_rows, key=lambda s: (-s["mean"], s["row"]))
    fig = _figure(5.8, 1.1 + 0.3 * len(rows))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    means = np.array([100 * s["mean"] for s in rows])
    stds = np.nan_to_num(np.array([100 * s["std"] for s in rows]))  # one seed: no spread to draw
    ax.barh(y, means, xerr=stds, color="#4c72b0", alpha=0.85, height=0.65,
            error_kw={"ecolor": "#222222", "capsize": 3, "elinewidth": 1})
    top = float(np.nanmax(means + stds)) if len(rows) else 100.0
    xmax = max(10.0, min(100.0, top) * 1.2) if top <= 100 else top * 1.2
    for yi, s, sd in zip(y, rows, stds):
        vals = [100 * v for v in frame_rows.get(s["row"], [])]
        if vals:
            ax.scatter(vals, np.full(len(vals), yi), s=14, color="#c44e52", zorder=3, linewidths=0)
        ax.text(100 * s["mean"] + sd + 0.015 * xmax, yi, f"{100 * s['mean']:.1f} (n={int(s['n'])})",
                va="center", fontsize=8)
    ax.set_yticks(y, [s["row"] for s in rows])
    ax.set_xlim(min(0.0, float(np.nanmin(means - stds)) * 1.1) if len(rows) else 0.0, xmax)
    ax.set_xlabel("percent: bar = mean, whiskers = ±1 std, dots = seeds")
    ax.set_title(column)
    _save(fig, path)


def budget_axis(budgets: list[str]) -> tuple[list[float], str] | None:
    """x positions of budgets (JSON text) that all count one unit (epochs, steps, samples or seconds),
    and the unit; None when they mix units, so no curve over budget can be drawn."""
    parsed = [json.loads(b) for b in budgets]
    units = {unit for b in parsed for unit in b}
    if len(units) != 1 or any(len(b) != 1 for b in parsed):
        return None
    unit = units.pop()
    return [float(b[unit]) for b in parsed], unit


def budget_chart(stats_rows, frame_rows, title: str, path: Path, untrained: frozenset[str] = frozenset()) -> bool:
    """A learning curve over a budget grid: one line per row through its mean at each budget, seeds as
    dots; ``untrained`` rows (random encoder, raw pixels) are dashed: flat lines to beat. False when the
    budgets mix units (nothing drawn)."""
    budgets = sorted({s["budget"] for s in stats_rows})
    axis = budget_axis(budgets)
    if axis is None:
        return False
    xs, unit = axis
    where = dict(zip(budgets, xs))
    rows = sorted({s["row"] for s in stats_rows})
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    colors = _class_colors(len(rows))
    for color, row in zip(colors, rows):
        mine = sorted((s for s in stats_rows if s["row"] == row), key=lambda s: where[s["budget"]])
        ax.plot([where[s["budget"]] for s in mine], [100 * s["mean"] for s in mine], "--" if row in untrained else "-o",
                ms=4, color=color, label=row + (" (untrained)" if row in untrained else ""))
        for s in mine:
            vals = [100 * v for v in frame_rows.get((row, s["budget"]), [])]
            ax.scatter([where[s["budget"]]] * len(vals), vals, s=9, color=color, alpha=0.5, linewidths=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
    ax.set_xlabel(f"training budget ({unit}), one run per budget")
    ax.set_ylabel("percent: line = mean, dots = seeds")
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(title)
    _save(fig, path)
    return True


def curve_chart(runs: list[dict], title: str, path: Path) -> None:
    """Loss and learning rate per epoch, one line per seed (failed runs dashed), and a third panel
    with the other scalars the method logged (their values at the epoch's last step) if any."""
    runs = sorted(runs, key=lambda r: r["spec"]["seed"])
    extras = sorted({k for r in runs for h in r["train"]["history"] for k, v in h.items()
                     if k not in ("epoch", "loss", "lr", "seconds") and isinstance(v, (int, float))})
    fig = _figure(12.0 if extras else 8.0, 3.0)
    axes = fig.subplots(1, 3 if extras else 2)
    ax_loss, ax_lr = axes[0], axes[1]
    colors = _class_colors(max(10, len(runs), len(extras)))
    for i, r in enumerate(runs):
        hist = r["train"]["history"]
        epochs = [h["epoch"] for h in hist]
        style = "-" if r["status"] == "ok" else "--"
        label = f"seed {r['spec']['seed']}" + ("" if r["status"] == "ok" else " (failed)")
        ax_loss.plot(epochs, [h["loss"] for h in hist], style, marker="o", ms=3, color=colors[i], label=label)
        ax_lr.plot(epochs, [h.get("lr", float("nan")) for h in hist], style, marker="o", ms=3, color=colors[i])
        for j, key in enumerate(extras):
            axes[2].plot(epochs, [h.get(key, float("nan")) for h in hist], style, marker="o", ms=2, color=colors[j],
                         alpha=1.0 if i == 0 else 0.5, label=key if i == 0 else None)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (mean over the epoch)")
    ax_loss.legend(fontsize=7, frameon=False)
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate (end of the epoch)")
    if extras:
        axes[2].set_xlabel("epoch")
        axes[2].set_ylabel("logged by the method (epoch's last step)")
        axes[2].legend(fontsize=7, frameon=False)
    fig.suptitle(title)
    _save(fig, path)


def tsne(features: np.ndarray, seed: int = TSNE_SEED) -> np.ndarray:
    """2-D t-SNE of ``features`` (PCA to 50 dims first when wider), seeded and single-threaded."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.nan_to_num(np.asarray(features, dtype=np.float64))
    x = x.reshape(len(x), -1)
    with threadpool_limits(1):  # Barnes-Hut sums in thread order: one thread is bitwise reproducible
        if x.shape[1] > 50 and len(x) > 50:
            x = PCA(50, svd_solver="full", random_state=seed).fit_transform(x)
        if np.allclose(x, x[:1]):  # a constant representation (collapsed): nothing to embed
            return np.zeros((len(x), 2))
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def embedding_chart(panels: list[tuple[str, np.ndarray, np.ndarray, list[str]]], title: str, path: Path,
                    provenance: dict[str, str] | None = None) -> None:
    """Scatter panels side by side: (panel title, (n, 2) coordinates, int colours, legend names)."""
    fig = _figure(4.4 * len(panels), 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (name, xy, colors, names) in zip(axes, panels):
        k = max(int(colors.max()) + 1 if len(colors) else 1, len(names))
        palette = np.array(_class_colors(k))
        ax.scatter(xy[:, 0], xy[:, 1], c=palette[colors], s=7, linewidths=0)
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ("left", "bottom"):
            ax.spines[side].set_visible(False)
        ax.set_title(name)
        if len(names) <= 20:
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], marker="o", ls="", ms=4, color=palette[i]) for i in range(len(names))]
            ax.legend(handles, names, fontsize=6, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title)
    _save(fig, path, provenance)


def gallery_chart(images: np.ndarray, assignments: np.ndarray, labels: np.ndarray, classes: tuple[str, ...],
                  title: str, path: Path, per_cluster: int = GALLERY_PER_CLUSTER,
                  max_clusters: int = GALLERY_MAX_CLUSTERS, provenance: dict[str, str] | None = None) -> tuple[int, int]:
    """A mosaic: one row per cluster (largest first) with its first samples; returns (shown, total) clusters."""
    ids, counts = np.unique(assignments, return_counts=True)
    order = sorted(range(len(ids)), key=lambda i: (-counts[i], ids[i]))[:max_clusters]
    c, h, w = images.shape[1:]
    pad = max(1, h // 8)
    mosaic = np.full((len(order) * (h + pad) + pad, per_cluster * (w + pad) + pad, 3), 255, np.uint8)
    ticks, names = [], []
    for row, i in enumerate(order):
        members = np.flatnonzero(assignments == ids[i])
        top, n_top = np.unique(labels[members], return_counts=True)
        major = int(top[np.argmax(n_top)])
        purity = n_top.max() / len(members)
        for col, m in enumerate(members[:per_cluster]):
            img = np.asarray(images[m]).transpose(1, 2, 0)
            img = np.repeat(img, 3, axis=2) if c == 1 else img[:, :, :3]
            y0, x0 = pad + row * (h + pad), pad + col * (w + pad)
            mosaic[y0:y0 + h, x0:x0 + w] = img
        ticks.append(pad + row * (h + pad) + h / 2)
        names.append(f"cluster {ids[i]}: n={counts[i]}, mostly '{classes[major]}' ({100 * purity:.0f}%)")
    scale = (0.55 if h <= 32 else 0.9) / h  # inches per image pixel: small images enlarged, large ones reduced
    width, height = mosaic.shape[1] * scale, mosaic.shape[0] * scale
    left = 0.25 + 0.056 * max(map(len, names), default=0)  # room for the row labels (7 pt DejaVu Sans)
    top = 0.4
    fig = _figure(left + width + 0.1, height + top + 0.1, layout=None)
    fw, fh = fig.get_size_inches()
    ax = fig.add_axes((left / fw, 0.1 / fh, width / fw, height / fh))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks(ticks, names, fontsize=7)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(title)
    _save(fig, path, provenance)
    return len(order), len(ids)


# ---------------------------------------------------------------------------- features
@dataclass
class Extracted:
    """Features and cluster assignments of one run on the report's sample pool."""

    features: dict[str, np.ndarray] = field(default_factory=dict)
    assignments: dict[str, np.ndarray] = field(default_factory=dict)
    note: str = ""
    #: The run's weights (or a component's) are not here: figures an earlier report drew from them may stand.
    weights_missing: bool = False


def _subset(data, idx: np.ndarray):
    from harness.data.datasets import ImageData

    t = __import__("torch").as_tensor(idx)
    return ImageData(data.name, data.images[t], data.labels[idx],
                     None if data.coarse_labels is None else data.coarse_labels[idx], data.is_train[idx],
                     data.classes, data.mean, data.std,
                     None if data.is_labeled is None else data.is_labeled[idx])


def sample_pool(manifest, n: int = GALLERY_POOL, seed: int = SUBSAMPLE_SEED) -> tuple[np.ndarray, str]:
    """A fixed random order of the test split (of all samples when the test split is smaller than the
    embedding subsample), cut to ``n``, and which of the two it is; its first samples are the embedding's."""
    test = manifest.split("test")
    source, idx = ("test-split", test) if len(test) >= EMBED_SAMPLES else ("dataset-wide", manifest.split("all"))
    rng = np.random.default_rng(seed)
    return idx[rng.permutation(len(idx))[:n]], source


def extract(runner, record: dict, pool: np.ndarray, device: str) -> Extracted:
    """Rebuild ``record``'s method, load its final weights and extract features on ``pool``."""
    import torch

    from harness.data.datasets import with_input_norm
    from harness.engine.budget import Budget
    from harness.engine.evaluate import RunContext
    from harness.execution.runner import Job
    from harness.execution.store import NEUTRAL_CONFIG, ResultStore, run_id
    from harness.execution.suite import MethodEntry
    from methods import METHODS

    spec = record["spec"]
    try:
        cls = METHODS.get(spec["method"])
    except (UsageError, KeyError):
        return Extracted(note=f"method {spec['method']!r} is not registered here (a plugin?); no features")
    store = ResultStore(runner.results_dir, record["suite"])
    ckpt = store.checkpoint_path(record["run_id"])
    if cls.trains and not ckpt.is_file():
        return Extracted(note=f"no checkpoint of run {record['run_id']} (seed {spec['seed']}) under "
                              f"{ckpt.parent}; rerun it to see its features", weights_missing=True)
    for comp in spec.get("components", []):
        comp_cls = METHODS.get(comp["method"]) if comp["method"] in METHODS.names() else None
        if comp_cls is None or (comp_cls.trains and not store.checkpoint_path(run_id(comp)).is_file()) \
                or not store.has(run_id(comp)):
            return Extracted(note=f"component {comp['label']!r} has no stored record or checkpoint; no features",
                             weights_missing=True)
    job = Job(record["suite"], spec["dataset"], MethodEntry(spec["method"], spec["label"], {}, {}), spec["seed"],
              Budget.parse(spec["budget"]), spec)
    data, manifest = runner.dataset(spec["dataset"], spec["val_fraction"])
    # as the run saw its images (a record stored before the key existed holds none: the neutral value)
    data = with_input_norm(data, spec["config"].get("input_norm", NEUTRAL_CONFIG["input_norm"]))
    method, _, _ = runner.build(job, data, manifest)
    if cls.trains:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        method.load_state_dict(state["model"])
    ctx = RunContext(method, _subset(data, pool), manifest, device, spec["seed"], image_size=spec.get("image_size"))
    features, heads = ctx.representation_names()
    note = "" if manifest.sha256 == record["split_sha256"] else \
        "the data on disk differs from the run's (split hash mismatch); features are of today's data"
    return Extracted({k: ctx.features(k) for k in features}, {k: ctx.assignments(k) for k in heads}, note)


# ---------------------------------------------------------------------------- page
JS = r"""
(function () {
  function cellValue(row, col) {
    var cell = row.cells[col];
    var v = cell.getAttribute('data-sort');
    if (v === null) { v = cell.textContent.trim(); }
    return v;
  }
  function sortTable(table, col, dir) {
    var body = table.tBodies[0];
    var numeric = table.tHead.rows[0].cells[col].getAttribute('data-type') === 'num';
    var rows = Array.prototype.slice.call(body.rows);
    rows.forEach(function (r, i) { if (!r.hasAttribute('data-index')) { r.setAttribute('data-index', i); } });
    rows.sort(function (a, b) {
      var x = cellValue(a, col), y = cellValue(b, col), c;
      if (numeric) {
        x = x === '' ? NaN : parseFloat(x); y = y === '' ? NaN : parseFloat(y);
        if (isNaN(x) && isNaN(y)) { c = 0; }
        else if (isNaN(x)) { return 1; }           /* missing values last in both directions */
        else if (isNaN(y)) { return -1; }
        else { c = x - y; }
      } else {
        c = x < y ? -1 : x > y ? 1 : 0;
      }
      if (c === 0) { return a.getAttribute('data-index') - b.getAttribute('data-index'); }
      return dir === 'asc' ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    var ths = table.tHead.rows[0].cells;
    for (var i = 0; i < ths.length; i++) { ths[i].removeAttribute('aria-sort'); }
    ths[col].setAttribute('aria-sort', dir === 'asc' ? 'ascending' : 'descending');
  }
  function onHeader(event) {
    var th = event.currentTarget, table = th.closest('table');
    var current = th.getAttribute('aria-sort');
    var dir = current === 'ascending' ? 'desc' : current === 'descending' ? 'asc' : th.getAttribute('data-first');
    sortTable(table, th.cellIndex, dir);
  }
  function rowLabels(table) {
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return r.cells[0].textContent.trim(); });
  }
  function selftest() {
    var table = document.getElementById('leaderboard');
    var out = {rows: rowLabels(table), headers: [], clicks: [], images: []};
    var ths = table.tHead.rows[0].cells;
    for (var i = 0; i < ths.length; i++) { out.headers.push(ths[i].textContent.trim()); }
    var metric = table.querySelector('th[data-kind="metric"]');
    if (metric) {
      for (var k = 0; k < 2; k++) {
        metric.click();
        out.clicks.push({column: metric.textContent.trim(), direction: metric.getAttribute('aria-sort'),
                         rows: rowLabels(table),
                         values: Array.prototype.map.call(table.tBodies[0].rows,
                                  function (r) { return cellValue(r, metric.cellIndex); })});
      }
      table.querySelector('th[data-kind="rank"]').click();
    }
    Array.prototype.forEach.call(document.images, function (img) {
      out.images.push({src: img.getAttribute('src'), complete: img.complete, width: img.naturalWidth});
    });
    out.done = true;
    document.getElementById('selftest').textContent = JSON.stringify(out);
  }
  document.addEventListener('DOMContentLoaded', function () {
    var ths = document.querySelectorAll('table.sortable th');
    for (var i = 0; i < ths.length; i++) {
      ths[i].addEventListener('click', onHeader);
      ths[i].addEventListener('keydown', function (e) { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); onHeader(e); } });
    }
  });
  if (/[?&]selftest\b/.test(window.location.search)) { window.addEventListener('load', selftest); }
})();
"""

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; font-size: .9em; margin: .8em 0; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
table.sortable th { cursor: pointer; background: #f4f4f4; user-select: none; }
table.sortable th:hover { background: #e8eefc; }
th[aria-sort="ascending"]::after { content: " \\25B2"; } th[aria-sort="descending"]::after { content: " \\25BC"; }
td.best { font-weight: bold; } td.tied { font-style: italic; }
#leaderboard td:first-child { position: sticky; left: 0; background: #fff; }
#leaderboard th:first-child { position: sticky; left: 0; z-index: 1; }
.wrap { overflow-x: auto; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
.note { color: #8a5a00; } code { background: #f4f4f4; padding: 0 .2em; }
dl dt { font-weight: bold; margin-top: .5em; } dl dd { margin-left: 1.5em; }
#selftest { display: none; }
"""


def _leaderboard_html(board: Leaderboard) -> str:
    display, stats = board.display, board.stats
    means = stats.pivot(index="row", columns="column", values="mean").reindex(display.index)
    marks = stats.pivot(index="row", columns="column", values="mark").reindex(display.index)
    metric_cols = list(means.columns)
    head = ['<th data-type="text" data-first="asc" data-kind="method" tabindex="0" scope="col">method</th>']
    kinds = {"rank": ("rank", "asc"), "train s": ("cost", "asc"), "peak MB": ("cost", "asc"),
             "failed": ("cost", "asc")}
    for col in display.columns:
        kind, first = kinds.get(col, ("metric", "desc"))
        sort = ' aria-sort="ascending"' if col == "rank" else ""
        head.append(f'<th data-type="num" data-first="{first}" data-kind="{kind}" tabindex="0" scope="col"{sort}>'
                    f"{_esc(col)}</th>")
    body = []
    for row in display.index:
        cells = [f"<td>{_esc(row)}</td>"]
        for col in display.columns:
            text = str(display.at[row, col])
            if col in metric_cols:
                m = means.at[row, col]
                key = "" if np.isnan(m) else repr(float(m))
                mark = marks.at[row, col] if isinstance(marks.at[row, col], str) else ""
                cls = f' class="{mark}"' if mark else ""
                cells.append(f'<td data-sort="{key}"{cls}>{_esc(text.replace("**", "").strip("_"))}</td>')
            else:
                try:
                    key = repr(float(text))
                    key = "" if math.isnan(float(text)) else key
                except ValueError:
                    key = ""
                cells.append(f'<td data-sort="{key}">{_esc(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="wrap"><table id="leaderboard" class="sortable"><thead><tr>{"".join(head)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _sensitivity_html(records: list[dict]) -> str:
    """Kendall's tau of each protocol setting's method ranking against the headline ranking, and the
    settings under which the top method changes."""
    table = sensitivity(records)
    if table.empty:
        return "<p class='note'>No other protocol setting ranks the same methods (no kNN grid, one protocol).</p>"
    rows = "".join(
        f"<tr><td>{_esc(r.setting)}</td><td>{r.methods}</td><td>{r.kendall_tau:.2f}</td><td>{_esc(r.top)}</td>"
        f"<td>{'yes' if r.top_changes else ''}</td></tr>" for r in table.itertuples())
    changed = [r.setting for r in table.itertuples() if r.top_changes]
    verdict = (f"The top method changes under: {', '.join(changed)}." if changed else
               "The top method is the same under every setting.")
    return (f'<div class="wrap"><table id="sensitivity" class="sortable"><thead><tr>'
            f'<th data-type="text" data-first="asc" scope="col">setting</th>'
            f'<th data-type="num" data-first="desc" scope="col">methods</th>'
            f'<th data-type="num" data-first="desc" scope="col">Kendall tau vs headline</th>'
            f'<th data-type="text" data-first="asc" scope="col">top method</th>'
            f'<th data-type="text" data-first="desc" scope="col">top changes</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></div><p>{_esc(verdict)}</p>")


def _runs_html(records: list[dict]) -> str:
    rows = []
    for r in sorted(records, key=lambda r: (*_group_key(r), r["spec"]["seed"], r["run_id"])):
        spec = r["spec"]
        rows.append("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in (
            spec["label"], spec["method"], spec["dataset"], _budget_text(spec["budget"]), spec["seed"], r["status"],
            f"{r.get('train_seconds', float('nan')):.1f}", r["run_id"], r.get("reason", ""))) + "</tr>")
    head = "".join(f'<th data-type="{t}" data-first="asc" scope="col">{h}</th>' for h, t in (
        ("label", "text"), ("method", "text"), ("dataset", "text"), ("budget", "text"), ("seed", "num"),
        ("status", "text"), ("train s", "num"), ("run id", "text"), ("reason", "text")))
    return (f'<details><summary>every stored run ({len(records)})</summary><div class="wrap">'
            f'<table id="runs" class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
            f"</table></div></details>")


def _protocols_html(records: list[dict], metrics: list[str]) -> str:
    try:
        from protocols import PROTOCOLS
    except ImportError:  # pragma: no cover - the harness always has it
        PROTOCOLS = None
    given: dict[str, dict] = {}
    for r in records:
        for name, params in r["spec"]["protocols"].items():
            given.setdefault(name, params)
    items = []
    for name in sorted(given):
        spec = None
        if PROTOCOLS is not None and name in PROTOCOLS.names():
            spec = PROTOCOLS.get(name)
        params = {**(spec.defaults if spec else {}), **given[name]}
        shown = ", ".join(f"<code>{_esc(k)}={_esc(json.dumps(v))}</code>" + ("" if k in given[name] else " (default)")
                          for k, v in sorted(params.items())) or "defaults"
        desc = _esc(spec.description) if spec and spec.description else ""
        items.append(f"<dt>{_esc(name)}</dt><dd>{desc}<br>parameters: {shown}</dd>")
    defs = "".join(f"<dt>{_esc(m)}</dt><dd>{_esc(metric_definition(m))}</dd>" for m in metrics)
    return (f"<h3>Protocols and the parameters that produced the numbers</h3><dl>{''.join(items)}</dl>"
            f"<h3>Metrics</h3><dl>{defs}</dl>")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _environment_html(records: list[dict]) -> str:
    values: dict[str, dict[str, int]] = {}
    for r in records:
        for k, v in _flatten(r.get("environment") or {}).items():
            values.setdefault(k, {})
            values[k][str(v)] = values[k].get(str(v), 0) + 1
    rows = []
    for k in sorted(values):
        seen = values[k]
        text = "; ".join(f"{_esc(v) or '–'}" + (f" ({n} runs)" if len(seen) > 1 else "")
                         for v, n in sorted(seen.items()))
        rows.append(f"<tr><td>{_esc(k)}</td><td style='text-align:left'>{text}</td></tr>")
    splits: dict[tuple[str, str, str], int] = {}
    for r in records:
        key = (r["spec"]["dataset"], r["split_sha256"], r.get("data_fingerprint", ""))
        splits[key] = splits.get(key, 0) + 1
    split_rows = "".join(f"<tr><td>{_esc(d)}</td><td><code>{_esc(s)}</code></td><td><code>{_esc(f)}</code></td>"
                         f"<td>{n}</td></tr>" for (d, s, f), n in sorted(splits.items()))
    return (f"<h3>Split manifests</h3><table><thead><tr><th>dataset</th><th>split sha256</th><th>data fingerprint</th>"
            f"<th>runs</th></tr></thead><tbody>{split_rows}</tbody></table>"
            f"<h3>Environment of the runs</h3><p>Values that differ between runs list how many runs had each.</p>"
            f"<table><tbody>{''.join(rows)}</tbody></table>")


def _figure_html(src: str, caption: str, alt: str) -> str:
    return (f'<figure><img src="{_esc(src)}" alt="{_esc(alt)}" loading="eager">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def write_report(suite_name: str, results_dir: Path, out_dir: Path, data_dir: Path, device: str = "cpu", *,
                 features: bool = True, embed_samples: int = EMBED_SAMPLES,
                 log: Callable[[str], None] | None = None, options: StatsOptions = StatsOptions()) -> Path:
    """Write ``out_dir/<suite_name>/index.html`` and its ``figures/``; return the page's path.

    ``features=False`` leaves out the embeddings and galleries (no model is rebuilt). The records are the
    ones ``leaderboard`` reads (:func:`harness.reporting.leaderboard.suite_records`); ``options`` set the intervals and
    the significance level as there.
    """
    import matplotlib

    log = log or (lambda s: None)
    chosen = suite_records(suite_name, results_dir, warn=log)
    suite_name, title, records = chosen.name, chosen.title, chosen.records
    root = Path(out_dir) / suite_name
    fig_dir = root / FIGURES
    fig_dir.mkdir(parents=True, exist_ok=True)
    names = _Names()
    sections: dict[str, list[str]] = {"ranks": [], "bars": [], "budgets": [], "curves": [], "embeddings": [],
                                        "galleries": []}
    notes: list[str] = []

    with matplotlib.rc_context(RC):
        board = leaderboard_table(records, options)
        stats = board.stats
        table = _leaderboard_html(board)
        if board.ranks is not None:
            cd_png, _ = write_cd_diagram(board.ranks, fig_dir / "critical-difference", f"suite {suite_name}: mean ranks")
            sections["ranks"] = [_figure_html(
                f"{FIGURES}/{cd_png.name}", "critical-difference diagram: mean rank over the headline columns "
                "(1 = best); rows joined by a thick line are not significantly different (Nemenyi)",
                "critical-difference diagram")]
        # ---- bar charts: one per leaderboard column
        frame = records_frame(records)
        multi_budget = stats["budget"].nunique() > 1
        for column in sorted(stats["column"].unique()):
            part = stats[stats["column"] == column]
            dataset, budget, metric = part.iloc[0][["dataset", "budget", "metric"]]
            cell = frame[(frame["dataset"] == dataset) & (frame["budget"] == budget) & (frame["metric"] == metric)
                         & (frame["status"] == "ok")]
            seeds = {row: list(g.sort_values("seed")["value"]) for row, g in cell.groupby("row")}
            name = names("bar", column)
            log(f"report: bar chart {column}")
            bar_chart(part.to_dict("records"), seeds, column, fig_dir / name)
            sections["bars"].append(_figure_html(f"{FIGURES}/{name}", column, f"bar chart of {column}"))

        # ---- learning curves over a budget grid: one chart per dataset and headline metric
        if multi_budget:
            untrained = frozenset(row_label(r, rep) for r in records if r["status"] == "ok"
                                  and not (r.get("train") or {}).get("used") for rep in r.get("metrics", {}))
            for (dataset, metric), part in stats.groupby(["dataset", "metric"]):
                if not is_headline(metric):
                    continue
                cell = frame[(frame["dataset"] == dataset) & (frame["metric"] == metric) & (frame["status"] == "ok")]
                seeds = {key: list(g["value"]) for key, g in cell.groupby(["row", "budget"])}
                name = names("budget", dataset, metric)
                log(f"report: learning curve {dataset} {metric}")
                if budget_chart(part.to_dict("records"), seeds, f"{dataset} {metric}", fig_dir / name, untrained):
                    sections["budgets"].append(_figure_html(f"{FIGURES}/{name}", f"{dataset} {metric} over the budget grid",
                                                            f"learning curve of {dataset} {metric}"))

        groups: dict[tuple[str, str, str], list[dict]] = {}
        for r in records:
            groups.setdefault(_group_key(r), []).append(r)
        order = sorted(groups)
        # ---- training curves per method
        for key in order:
            label, dataset, budget = key
            runs = [r for r in groups[key] if (r.get("train") or {}).get("history")]
            if not runs:
                continue
            what = f"{label} on {dataset}" + (f", {_budget_text(json.loads(budget))}" if multi_budget else "")
            name = names("curve", label, dataset, *( [_budget_text(json.loads(budget))] if multi_budget else []))
            log(f"report: training curves {what}")
            curve_chart(runs, what, fig_dir / name)
            sections["curves"].append(_figure_html(f"{FIGURES}/{name}",
                                                   f"{what}: loss and lr per epoch ({len(runs)} seed{'s' * (len(runs) != 1)})",
                                                   f"training curves of {what}"))
        no_curves = [k[0] for k in order if not any((r.get("train") or {}).get("history") for r in groups[k])]
        if no_curves:
            notes.append(f"no training curves for {', '.join(sorted(set(no_curves)))} (not trained: baselines or "
                         f"evaluation-time combinations)")

        # ---- embeddings and galleries
        if features:
            from harness.execution.runner import Runner

            runner = Runner(Path(results_dir), Path(data_dir), device, quiet=True, log=lambda s: None)
            pools: dict[tuple[str, float], tuple[np.ndarray, str]] = {}
            drawn = drawn_figures(fig_dir)

            def keep_drawn(record: dict) -> bool:
                """Keep the figures an earlier report drew from ``record``'s run, the same training of it (a
                rerun with --force keeps its id, not its ``created`` time) and samples, if any: they are what
                this report would draw, so the page is the same as where the weights are."""
                kept = [f for f in drawn.get(record["run_id"], [])
                        if f["samples"] == str(embed_samples) and f.get("created") == record.get("created")]
                for figure in kept:
                    names.used.add(figure["name"])
                    sections[figure["section"]].append(_figure_html(f"{FIGURES}/{figure['name']}", figure["caption"],
                                                                    figure["alt"]))
                return bool(kept)

            for key in order:
                label, dataset, budget = key
                ok = sorted((r for r in groups[key] if r["status"] == "ok"), key=lambda r: r["spec"]["seed"])
                if not ok:
                    notes.append(f"{label} on {dataset}: no successful run, no embedding")
                    continue
                record = ok[0]
                spec = record["spec"]
                try:
                    data, manifest = runner.dataset(dataset, spec["val_fraction"])
                except (UsageError, OSError) as exc:
                    if not keep_drawn(record):
                        notes.append(f"{label} on {dataset}: dataset not available here ({exc}); no embedding")
                    continue
                pk = (dataset, spec["val_fraction"])
                if pk not in pools:
                    pools[pk] = sample_pool(manifest, max(GALLERY_POOL, embed_samples))
                pool, source = pools[pk]
                what = (f"{label} on {dataset}" + (f", {_budget_text(json.loads(budget))}" if multi_budget else "")
                        + f", seed {spec['seed']}")
                log(f"report: features of {what}")
                try:
                    got = extract(runner, record, pool, runner.device)
                except (RuntimeError, UsageError, KeyError, ValueError, OSError) as exc:  # e.g. code changed since
                    got = Extracted(note=f"could not rebuild the method from its record and checkpoint: "
                                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                if got.weights_missing and keep_drawn(record):
                    continue
                if got.note:
                    notes.append(f"{what}: {got.note}")
                if not got.features:
                    continue
                n = min(embed_samples, len(pool))
                labels = data.labels[pool]
                panels = []
                for rep, feats in got.features.items():
                    xy = tsne(feats[:n])
                    panels.append((f"{rep} ({feats.shape[1]}-d), by class", xy, labels[:n], list(data.classes)))
                for head, assign in got.assignments.items():
                    ids, inv = np.unique(assign[:n], return_inverse=True)
                    panels.append((f"backbone, by {head} assignment", panels[0][1], inv,
                                   [f"cluster {i}" for i in ids]))
                name = names("embed", label, dataset, *([_budget_text(json.loads(budget))] if multi_budget else []))
                figure = {"run_id": record["run_id"], "created": record.get("created"),  # this training of it
                          "samples": str(embed_samples), "section": "embeddings",
                          "caption": f"{what}: t-SNE of {n} fixed {source} samples", "alt": f"t-SNE of {what}"}
                embedding_chart(panels, f"{label} (seed {spec['seed']})", fig_dir / name, figure)
                sections["embeddings"].append(_figure_html(f"{FIGURES}/{name}", figure["caption"], figure["alt"]))
                for head, assign in got.assignments.items():
                    name = names("gallery", label, head, dataset,
                                 *([_budget_text(json.loads(budget))] if multi_budget else []))
                    total = len(np.unique(assign))
                    shown = min(total, GALLERY_MAX_CLUSTERS)
                    more = f" (the {shown} largest of {total})" if shown < total else ""
                    figure = {**figure, "section": "galleries", "alt": f"cluster gallery of {what}",
                              "caption": f"{what}, {head}: first {GALLERY_PER_CLUSTER} of {len(pool)} fixed {source} "
                                         f"samples per cluster{more}"}
                    gallery_chart(data.images[pool].numpy(), assign, labels, data.classes,
                                  f"{label} (seed {spec['seed']}): {head}", fig_dir / name, provenance=figure)
                    sections["galleries"].append(_figure_html(f"{FIGURES}/{name}", figure["caption"], figure["alt"]))
        else:
            notes.append("embeddings and cluster galleries were not drawn (features off)")

    written = {Path(s.split('src="', 1)[1].split('"', 1)[0]).name for part in sections.values() for s in part}
    written |= {Path(name).with_suffix(".svg").name for name in written}  # the diagram's vector copy
    for stale in [*fig_dir.glob("*.png"), *fig_dir.glob("*.svg")]:
        if stale.name not in written:
            stale.unlink()

    metrics = sorted(stats["metric"].unique())
    n_ok = sum(r["status"] == "ok" for r in records)
    budgets = sorted({_budget_text(r["spec"]["budget"]) for r in records})
    datasets = sorted({r["spec"]["dataset"] for r in records})
    methods = sorted({r["spec"]["label"] for r in records})
    seeds = sorted({r["spec"]["seed"] for r in records})

    def section(title: str, anchor: str, items: list[str], intro: str, empty: str) -> str:
        inner = "".join(items) if items else f"<p class='note'>{_esc(empty)}</p>"
        return f'<h2 id="{anchor}">{_esc(title)}</h2><p>{intro}</p>{inner}'

    note_html = "".join(f"<li>{_esc(n)}</li>" for n in notes)
    page = "".join([
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_esc(suite_name)} report</title><style>{CSS}</style><script>{JS}</script></head><body>",
        f"<h1>Suite <code>{_esc(suite_name)}</code></h1><p>{_esc(title)}</p>",
        (f"<p>{len(records)} stored runs ({n_ok} ok): {len(methods)} methods on {', '.join(map(_esc, datasets))}, "
         f"seeds {', '.join(map(str, seeds))}, budget {_esc('; '.join(budgets))}.</p>"),
        ("<nav>Contents: <a href='#leaderboard-section'>leaderboard</a> · <a href='#ranks'>ranks across the "
         "suite</a> · <a href='#sensitivity-section'>protocol sensitivity</a> · <a href='#definitions'>metrics and "
         "protocols</a> · <a href='#bars'>bar charts</a> · " + ("<a href='#budgets'>learning curves</a> · "
         if multi_budget else "") + "<a href='#curves'>training curves</a> · "
         "<a href='#embeddings'>embeddings</a> · <a href='#galleries'>cluster galleries</a> · "
         "<a href='#environment'>environment</a></nav>"),
        "<h2 id='leaderboard-section'>Leaderboard</h2>",
        (f"<p>Mean over seeds in percent with its {100 * (1 - options.alpha):g}% confidence interval in brackets "
         f"({_esc(options.ci_name)}); (n&lt;3): fewer than 3 seeds, no interval; intervals are cut at 100. "
         f"{_esc(significance_text(board, options, markdown=False))} "
         f"{_esc(RANK_TEXT)} Click a column header to sort by it (again to reverse). "
         f"{_esc(checkpoint_text(board))} Rows with [head] evaluate that head's features or assignments instead of the backbone's pooled output. "
         "<code>train s</code> is wall-clock training time per run; <code>peak MB</code> is GPU max allocated on "
         "CUDA, peak resident memory of the process on CPU.</p>"),
        table, _runs_html(records),
        (f"<h3>Notes</h3><ul class='note'>{note_html}</ul>" if notes else ""),
        "<h2 id='ranks'>Ranks across the suite</h2>",
        (f"<p>{_esc(board.ranks.summary())}</p>" if board.ranks is not None
         else f"<p class='note'>{_esc(board.ranks_note)}</p>"), *sections["ranks"],
        "<h2 id='sensitivity-section'>Protocol sensitivity</h2>",
        ("<p>How the ranking of methods (backbone rows) moves with the evaluation: Kendall's tau between the headline "
         "ranking (mean rank over the headline columns: top-1 and clustering ACC per dataset) and the ranking under "
         "each kNN grid point (k, temperature), each protocol at the suite's setting, and the headline columns read "
         "from a method's head features where it has them. 1 = the same order, 0 = unrelated, -1 = reversed.</p>"),
        _sensitivity_html(records),
        "<h2 id='definitions'>Metrics and protocols</h2>", _protocols_html(records, metrics),
        section("Bar charts", "bars", sections["bars"],
                "One chart per leaderboard column: bars are the mean over seeds, whiskers ±1 std, dots the seeds.",
                "no scores to chart"),
        (section("Learning curves", "budgets", sections["budgets"],
                 "One chart per dataset and headline metric over the suite's budget grid (each budget a run of its "
                 "own, trained from scratch): lines join the means over seeds, dots are the seeds.",
                 "the budgets mix units (epochs and steps, say): no common axis") if multi_budget else ""),
        section("Training curves", "curves", sections["curves"],
                "Training loss (mean over each epoch's steps) and learning rate per epoch, one line per seed "
                "(failed runs dashed), and the other scalars a method logs, at each epoch's last step.",
                "no method with a training history"),
        section("Embeddings", "embeddings", sections["embeddings"],
                f"t-SNE (scikit-learn, perplexity 30, PCA to 50 dimensions first, seed {TSNE_SEED}) of the same fixed "
                f"random subsample (seed {SUBSAMPLE_SEED}) for every method, from the lowest-seed successful run's "
                "final checkpoint, coloured by class; one panel per representation, and for clustering methods the "
                "backbone embedding coloured by the cluster head's assignments.", "no embeddings (see notes)"),
        section("Cluster galleries", "galleries", sections["galleries"],
                "Methods with cluster heads: one row per cluster (largest first), its first samples of the fixed "
                "pool, with the cluster's size and majority class.", "no method with a cluster head"),
        "<h2 id='environment'>Environment and data</h2>", _environment_html(records),
        "<pre id='selftest'></pre></body></html>\n",
    ])
    index = root / "index.html"
    _write_bytes(index, page.encode())
    log(f"report: written {index}")
    return index
