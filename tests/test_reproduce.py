"""`harness reproduce` and where a run's tables go: the CLI on a tiny digits suite."""
from __future__ import annotations

import json
from pathlib import Path

from harness.cli import default_leaderboard_dir, main
from harness.execution.reproduce import verdict


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
