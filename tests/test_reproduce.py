"""`harness reproduce` and where a run's tables go: the CLI on a tiny digits suite."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.cli import default_leaderboard_dir, main
from harness.execution.reproduce import _final_loss, one_sample, reproduce, verdict


def _suite(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps({"name": "tiny", "datasets": ["digits"], "seeds": [0, 1],
                                "methods": [{"name": "simclr", "config": {"batch_size": 128}}, "random"],
                                "budget": "steps=3", "protocols": {"knn": {"k": 10}}}))
    return path


def test_verdicts():
    assert verdict(0.5, 0.5, 0.01) == "identical"
    assert verdict(0.5, 0.515, 0.01) == "within seed noise"
    assert verdict(0.5, 0.53, 0.01) == "outside"
    assert verdict(0.5, 0.5001, float("nan")) == "outside"  # one seed: no spread to be within


def test_verdict_bounds_are_two_stds_inclusive_and_nan_is_identical_only_to_nan():
    """|diff| = 0.125 = 2 x 0.0625 exactly (binary fractions, no rounding) is within seed noise; 2.5 std is outside; a
    metric that became nan (or came back from nan) is outside. Catches ``<`` for ``<=``, a wider band than 2 std
    and nan on one side taken as identical."""
    assert verdict(0.5, 0.625, 0.0625) == "within seed noise" and verdict(0.5, 0.375, 0.0625) == "within seed noise"
    assert verdict(0.5, 0.525, 0.01) == "outside"
    assert verdict(float("nan"), float("nan"), 0.01) == "identical"
    assert verdict(0.5, float("nan"), 0.01) == "outside" and verdict(float("nan"), 0.5, 0.01) == "outside"


def test_a_difference_of_one_evaluated_image_is_within_one_sample():
    """The smallest difference an accuracy over n images can show is 1/n (computed in floats, c/n - (c-1)/n may
    exceed 1/n by an ulp); two images apart is outside, and seed noise is still named first."""
    n = 359
    assert verdict(300 / n, 301 / n, 0.0, 1 / n) == "within one sample"
    assert verdict(301 / n, 300 / n, float("nan"), 1 / n) == "within one sample"
    assert verdict(300 / n, 302 / n, 0.0, 1 / n) == "outside" and verdict(0.5, 0.5001, 0.0) == "outside"
    assert verdict(300 / n, 301 / n, 1 / n, 1 / n) == "within seed noise"


def test_one_sample_is_one_over_the_split_the_metric_is_scored_on(tmp_path):
    """kNN, probes and coarse-to-fine score the test split; clustering the split its ``split`` parameter names."""
    from harness.data.datasets import load_split_data

    _, manifest = load_split_data("digits", tmp_path, 0.1)
    test, everything = len(manifest.test), len(manifest.test) + len(manifest.train) + len(manifest.val)
    assert test < everything
    assert one_sample("knn/top1", {"knn": {"k": 20}}, manifest) == 1 / test
    assert one_sample("coarse_to_fine/fine_lbfgs_top1", {}, manifest) == 1 / test
    assert one_sample("sgd/top1@best_val", {}, manifest) == 1 / test
    assert one_sample("clustering/acc", {"clustering": {"split": "all"}}, manifest) == 1 / everything
    assert one_sample("clustering/acc", {"clustering": {"split": "test"}}, manifest) == 1 / test


@pytest.mark.parametrize("images_off,verdict_seen,code", [(1, "within one sample", 0), (2, "outside", 1)])
def test_a_row_whose_seeds_score_the_same_is_one_image_off_within_one_sample(tmp_path, capsys, images_off,
                                                                             verdict_seen, code):
    """pixels trains nothing, so its seeds' kNN scores are equal (seed std 0) and any rerun difference used to be
    "outside" (exit 1), also one test image's, the least another CPU's float rounding can move it. Its stored kNN
    top-1 edited one test image up reproduces "within one sample" (exit 0); two images up stays outside."""
    suite = tmp_path / "px.yaml"
    suite.write_text(json.dumps({"name": "px", "datasets": ["digits"], "seeds": [0, 1], "methods": ["pixels"],
                                 "budget": "steps=1", "protocols": {"knn": {"k": 10}}}))
    results, data = tmp_path / "out", ["--data-dir", str(tmp_path / "data")]
    assert main(["run", str(suite), "--results-dir", str(results), "--quiet", *data]) == 0
    from harness.data.datasets import load_split_data

    test_images = len(load_split_data("digits", tmp_path / "data", 0.1)[1].test)
    for path in (results / "px").glob("*.json"):
        r = json.loads(path.read_text())
        r["metrics"]["backbone"]["knn/top1"] += images_off / test_images
        path.write_text(json.dumps(r))
    capsys.readouterr()
    assert main(["reproduce", str(suite), "--results-dir", str(results), "--quiet", *data]) == code
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("pixels/digits/s0")]
    assert row.endswith(verdict_seen), row


def test_final_loss_is_the_last_epochs():
    assert _final_loss({"train": {"history": [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}]}}) == 1.5
    assert _final_loss({"train": {"history": []}}) is None and _final_loss({}) is None


def test_rerun_on_the_same_machine_is_bit_identical_and_tables_go_beside_the_results(tmp_path, capsys):
    """Same machine, same versions: the retrained run's final loss and metrics equal the record's bits. The run
    wrote its tables beside its --results-dir, not into the repository's leaderboards/."""
    suite, results = _suite(tmp_path), tmp_path / "out"
    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["run", str(suite), "--results-dir", str(results), "--quiet", *data]) == 0
    assert (tmp_path / "out-leaderboards" / "tiny.md").is_file()
    capsys.readouterr()
    assert main(["reproduce", str(suite), "--runs", "2", "--results-dir", str(results), "--quiet", *data]) == 0
    out = capsys.readouterr().out
    assert "final_loss" in out and "knn/top1" in out
    assert "outside" not in out.split("\n\n")[0] and "within seed noise" not in out.split("\n\n")[0]
    assert out.count("identical") >= 3  # simclr's loss and kNN, random's kNN


def test_default_leaderboard_dir():
    assert default_leaderboard_dir(Path("results")) == Path("leaderboards")
    assert default_leaderboard_dir(Path("/scratch/me/results")) == Path("/scratch/me/leaderboards")
    assert default_leaderboard_dir(Path("/tmp/x")) == Path("/tmp/x-leaderboards")


def test_each_rerun_uses_the_thread_count_its_record_was_written_with(tmp_path, monkeypatch, capsys):
    """A CPU sum split over another number of threads rounds differently, so a rerun on the writing machine is
    bit-identical only at the record's thread count: reproduce retrains with ``environment.threads`` of the record
    and gives the caller's count back. Catches a rerun at the machine's default count."""
    import torch

    from harness.execution.runner import Runner

    suite, results = _suite(tmp_path), tmp_path / "out"
    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["run", str(suite), "--methods", "random", "--seeds", "0", "--results-dir", str(results), "--quiet",
                 *data]) == 0
    (path,) = (results / "tiny").glob("*.json")
    record = json.loads(path.read_text())
    written_with = torch.get_num_threads() + 2
    path.write_text(json.dumps({**record, "environment": {**record["environment"], "threads": written_with}}))
    seen, run_job = [], Runner.run_job
    monkeypatch.setattr(Runner, "run_job", lambda self, *a: seen.append(torch.get_num_threads()) or run_job(self, *a))
    before = torch.get_num_threads()
    assert main(["reproduce", str(suite), "--methods", "random", "--results-dir", str(results), "--quiet", *data]) == 0
    assert seen == [written_with] and torch.get_num_threads() == before
    assert "used its record's torch thread count" in capsys.readouterr().out


def test_reproduce_compares_with_the_seed_spread_of_the_same_row(tmp_path):
    """Three seeds of random and pixels; random's seed 0 is stored as failed (no metrics) and seed 1's stored kNN top-1
    is edited 0.01 above what it reproduces. ``reproduce(runs=1)`` retrains the first ok run, random's seed 1:
    diff = rerun - stored = -0.01, and the seed std is that of random's two stored kNN scores (ddof=1), not pooled with
    pixels'; the final loss's spread leaves out the failed run's history. Catches a failed run retrained, a std over
    every method, with ddof=0 or over failed runs too, and diff's sign."""
    suite = tmp_path / "tiny.yaml"
    suite.write_text(json.dumps({"name": "tiny", "datasets": ["digits"], "seeds": [0, 1, 2], "methods": ["random", "pixels"],
                                 "budget": "steps=3", "protocols": {"knn": {"k": 10}}}))
    results, data = tmp_path / "out", ["--data-dir", str(tmp_path / "data")]
    assert main(["run", str(suite), "--results-dir", str(results), "--quiet", *data]) == 0
    records = {}
    for path in (results / "tiny").glob("*.json"):
        r = json.loads(path.read_text())
        if r["spec"]["label"] == "random":  # a final loss per seed (random trains none): 99 for the failed seed
            r = {**r, "train": {**r["train"], "history": [{"epoch": 1, "loss": [99.0, 2.0, 3.0][r["spec"]["seed"]]}]}}
            if r["spec"]["seed"] == 0:
                r = {**r, "status": "failed", "reason": "loss became nan", "metrics": {}}
            elif r["spec"]["seed"] == 1:
                r = {**r, "metrics": {**r["metrics"], "backbone": {**r["metrics"]["backbone"],
                                                                  "knn/top1": r["metrics"]["backbone"]["knn/top1"] + 0.01}}}
            path.write_text(json.dumps(r))
        records[(r["spec"]["label"], r["spec"]["seed"])] = r
    from harness.execution.suite import load_suite

    table = reproduce(load_suite(str(suite)), results, tmp_path / "data", runs=1, log=lambda s: None)
    (row,) = table[table["metric"] == "knn/top1"].to_dict("records")
    scores = [records[("random", seed)]["metrics"]["backbone"]["knn/top1"] for seed in (1, 2)]
    assert row["run"] == "random/digits/s1" and row["stored"] == scores[0]
    assert row["diff"] == pytest.approx(-0.01) and row["rerun"] == pytest.approx(scores[0] - 0.01)
    assert row["seeds"] == 2 and row["seed std"] == pytest.approx(abs(scores[0] - scores[1]) / np.sqrt(2))
    (loss,) = table[table["metric"] == "final_loss"].to_dict("records")
    assert loss["stored"] == 2.0 and loss["seeds"] == 2 and loss["seed std"] == pytest.approx(1 / np.sqrt(2))


def test_one_sample_allows_the_ulp_that_float_division_adds():
    """Over 359 images, 300/359 - 299/359 is one image apart but exceeds 1/359 by an ulp in floats (301/359 -
    300/359 does not): it is still within one sample. Catches: one_sample compared without its 1e-9 slack."""
    n = 359
    assert 300 / n - 299 / n > 1 / n
    assert verdict(299 / n, 300 / n, float("nan"), 1 / n) == "within one sample"
    assert verdict(300 / n, 299 / n, 0.0, 1 / n) == "within one sample"


def test_the_seed_spread_is_over_runs_of_the_same_budget(tmp_path):
    """Two seeds of random at two budgets (four records): the rerun of seed 0 at steps=3 is compared with the spread
    of the two steps=3 records, not all four. Catches: runs of another budget counted as seeds of the row."""
    from harness.execution.suite import load_suite

    suite = tmp_path / "tiny.yaml"
    suite.write_text(json.dumps({"name": "tiny", "datasets": ["digits"], "seeds": [0, 1], "methods": ["random"],
                                 "budget": ["steps=3", "steps=4"], "protocols": {"knn": {"k": 10}}}))
    results, data = tmp_path / "out", tmp_path / "data"
    assert main(["run", str(suite), "--results-dir", str(results), "--quiet", "--data-dir", str(data)]) == 0
    assert len(list((results / "tiny").glob("*.json"))) == 4
    table = reproduce(load_suite(str(suite)), results, data, runs=1, log=lambda s: None)
    (row,) = table[table["metric"] == "knn/top1"].to_dict("records")
    assert row["run"] == "random/digits/s0" and row["seeds"] == 2 and row["verdict"] == "identical"


def test_a_record_without_a_usable_thread_count_reruns_with_the_current_one():
    """A record naming 0 threads (or none) reruns with torch's current thread count, which is left as it was.
    Catches: 0 passed on to torch, whose set_num_threads refuses it (the rerun then fails)."""
    from harness.execution.reproduce import torch_threads

    import torch

    before = torch.get_num_threads()
    for threads in (0, None, True, -2):
        with torch_threads(threads):
            assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_a_final_loss_that_changed_is_outside_however_small_the_change(tmp_path):
    """One simclr run whose stored final loss is edited 0.5 above what training gives: its rerun's final loss differs
    by -0.5 and, with no seed spread and no image count to allow, is outside (the accuracy metrics of the rerun are
    identical). Catches: the final loss given an accuracy's one-sample slack (a change below it called within one
    sample)."""
    from harness.execution.suite import load_suite

    suite = tmp_path / "tiny.yaml"
    suite.write_text(json.dumps({"name": "tiny", "datasets": ["digits"], "seeds": [0],
                                 "methods": [{"name": "simclr", "config": {"batch_size": 512}}],
                                 "budget": "epochs=1", "protocols": {"knn": {"k": 10}}}))
    results, data = tmp_path / "out", tmp_path / "data"
    assert main(["run", str(suite), "--results-dir", str(results), "--quiet", "--data-dir", str(data)]) == 0
    (path,) = (results / "tiny").glob("*.json")
    record = json.loads(path.read_text())
    record["train"]["history"][-1]["loss"] += 0.5
    path.write_text(json.dumps(record))
    table = reproduce(load_suite(str(suite)), results, data, runs=1, log=lambda s: None)
    (loss,) = table[table["metric"] == "final_loss"].to_dict("records")
    assert loss["diff"] == pytest.approx(-0.5, abs=1e-9) and loss["verdict"] == "outside"
    assert set(table[table["metric"] != "final_loss"]["verdict"]) == {"identical"}
