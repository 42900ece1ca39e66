"""The harness end to end on bundled digits: determinism, resume, failures, plugins, the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_suite
from killable import Killed, KillableSimCLR
from harness.cli import main
from harness.data.datasets import load_dataset
from harness.errors import UsageError
from methods import Method, register_method

REPO = Path(__file__).resolve().parents[1]
FAST = {"knn": {"k": 10}}


def _cli(tmp_path: Path, *args: str, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def _suite_file(tmp_path: Path, methods, seeds=(0,), budget="steps=6", name="t") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"name": name, "datasets": ["digits"], "methods": list(methods),
                                "seeds": list(seeds), "budget": budget, "protocols": FAST}))
    return path


def test_same_seed_same_metrics(run_suite):
    a = run_suite(["simclr"], seeds=[3], budget="steps=5", protocols=FAST)
    b = run_suite(["simclr"], seeds=[3], budget="steps=5", protocols=FAST, name="again")
    assert a[0]["metrics"] == b[0]["metrics"]
    assert a[0]["train"]["history"][-1]["loss"] == b[0]["train"]["history"][-1]["loss"]


def test_budget_is_enforced_and_recorded(run_suite):
    for budget, unit, limit in (("steps=7", "steps", 7), ("samples=1000", "samples", 1000), ("epochs=1", "epochs", 1)):
        (rec,) = run_suite(["simclr"], budget=budget, protocols=FAST, name=f"b{unit}")
        used = rec["budget"]["used"]
        assert used[unit] >= limit and rec["budget"]["asked"] == {unit: limit}
        assert used["steps"] == {"steps": 7, "samples": 8, "epochs": 10}[unit]  # batch 128, 1295 train images
    (rec,) = run_suite(["simclr"], budget="seconds=2", protocols=FAST, name="bsec")
    assert 2 <= rec["budget"]["used"]["seconds"] < 10


def test_killed_training_resumes_exactly(tmp_path):
    from harness.execution.runner import Runner, plan
    from conftest import make_suite

    suite = make_suite(["_killable_simclr"], budget="steps=12", protocols=FAST)
    (job,) = plan(suite)
    straight = Runner(tmp_path / "a", tmp_path / "data", device="cpu", quiet=True, log=lambda s: None)
    KillableSimCLR.kill_at, KillableSimCLR.calls = None, 0
    ref = straight.run([job])[0]
    resumed = Runner(tmp_path / "b", tmp_path / "data", device="cpu", quiet=True, log=lambda s: None,
                     checkpoint_seconds=0.0)
    KillableSimCLR.kill_at, KillableSimCLR.calls = 8, 0
    with pytest.raises(Killed):
        resumed.run([job])
    assert not list((tmp_path / "b" / "test").glob("*.json"))  # no half record
    state = torch.load(tmp_path / "b" / "test" / ".ckpt" / f"{job.run_id}.pt", weights_only=False)
    assert state["usage"]["steps"] == 7
    KillableSimCLR.kill_at = None
    out = resumed.run([job])[0]
    assert out["metrics"] == ref["metrics"]
    assert out["budget"]["used"]["steps"] == 12


@register_method("_nan")
class _NaNLoss(Method):
    """Returns a NaN loss: the run must be stored as failed and the suite go on."""

    def __init__(self, backbone, cfg, info):
        super().__init__(backbone, cfg, info)
        backbone.requires_grad_(False)  # untrained: every trainable parameter must get a gradient
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch):
        return self.w * float("nan")


def test_nan_loss_fails_the_run_not_the_suite(run_suite):
    recs = run_suite(["_nan", "random"], protocols=FAST)
    status = {r["spec"]["method"]: (r["status"], r["reason"]) for r in recs}
    assert status["_nan"][0] == "failed" and "nan" in status["_nan"][1]
    assert status["random"] == ("ok", "")


PLUGIN = '''
"""A throwaway adapter written the way README's "Adding a method" section says."""
import torch.nn.functional as F

from methods import Method, register_method
from methods.heads import mlp


@register_method("toy_byol_lite")
class ToyAlign(Method):
    """Aligns two views' projections (cosine); a toy, not a real method."""

    description = "toy: negative cosine between two views' projections"
    defaults = {"method": {"proj_dim": 32}, "paper": {}, "cpu": {"batch_size": 64, "lr": 0.05}}

    def __init__(self, backbone, cfg, info):
        super().__init__(backbone, cfg, info)
        self.projector = mlp(backbone.out_dim, 64, cfg["proj_dim"])

    def training_step(self, batch):
        z1, z2 = (self.projector(self.backbone(v)) for v in batch.views)
        return -F.cosine_similarity(z1, z2.detach()).mean()

    def representations(self, x):
        h = self.backbone(x)
        return {"backbone": h, "head": self.projector(h)}
'''


def test_plugin_method_runs_through_a_suite_and_reaches_the_leaderboard(tmp_path):
    """A plugin loads as a module name before the command and as a file path after it (README, item 1).

    The file lies in a folder on no import path, under a name that is no module name, so only loading it
    from its path works, in the command and in its two worker processes (which train the runs)."""
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "my-plugin.py").write_text(PLUGIN)
    suite = _suite_file(tmp_path, ["toy_byol_lite", "random"])
    out = _cli(tmp_path, "run", str(suite), "--device", "cpu", "--quiet", "--workers", "2",
               "--data-dir", str(tmp_path / "data"), "--plugin", str(tmp_path / "elsewhere" / "my-plugin.py"))
    assert out.returncode == 0, out.stderr
    board = (tmp_path / "leaderboards" / "t.md").read_text()
    assert "| toy_byol_lite |" in board and "| toy_byol_lite [head] |" in board and "| random |" in board
    # The second run finds everything stored and only prints the table.
    again = _cli(tmp_path, "--plugin", "my_plugin", "run", str(suite), "--device", "cpu", "--quiet",
                 "--data-dir", str(tmp_path / "data"))
    assert again.returncode == 0 and "seed 0" not in again.stdout and "toy_byol_lite" in again.stdout
    assert len(list((tmp_path / "results" / "t").glob("*.json"))) == 2


def test_sigkill_midway_then_rerun_completes_without_loss_or_duplicates(tmp_path):
    suite = _suite_file(tmp_path, ["simclr"], seeds=[0, 1, 2, 3], budget="steps=10", name="k")
    args = ("run", str(suite), "--device", "cpu", "--quiet", "--data-dir", str(tmp_path / "data"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = tmp_path / "results" / "k"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(results.glob("*.json"))) < 1:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in results.glob("*.json")}
    assert 1 <= len(done_before) < 4
    out = _cli(tmp_path, *args)
    assert out.returncode == 0, out.stderr
    records = [json.loads(p.read_text()) for p in results.glob("*.json")]
    assert sorted(r["spec"]["seed"] for r in records) == [0, 1, 2, 3]
    assert done_before <= {p.name for p in results.glob("*.json")}
    assert not list(results.glob(".*.tmp"))


def test_two_processes_share_a_results_dir(tmp_path):
    suite = _suite_file(tmp_path, ["random", "pixels"], seeds=[0, 1, 2], name="c")
    args = [sys.executable, "-m", "harness", "run", str(suite), "--device", "cpu", "--quiet",
            "--data-dir", str(tmp_path / "data")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    load_dataset("digits", tmp_path / "data")
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        p.wait(timeout=600)
    assert all(p.returncode == 0 for p in procs), [p.stderr.read() for p in procs]
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "c").glob("*.json")]
    assert len(records) == 6 and len({r["run_id"] for r in records}) == 6


def test_a_suites_tables_are_read_and_written_under_its_tables_lock(tmp_path):
    """Processes finishing one suite write its tables one at a time, each from the records on disk when its turn
    comes. Here the tables lock is held (by this test process, alive) while ``run --methods random`` finishes: it
    waits, writing nothing; pixels' record appears during the wait, and the table written after the release has
    its row. Catches tables built from records read before the wait: a process that read just before another's
    last record and wrote just after that one's tables left its run out of the final table."""
    from harness.execution.store import ResultStore

    suite = _suite_file(tmp_path, ["random", "pixels"], name="t")
    args = ["run", str(suite), "--device", "cpu", "--quiet", "--data-dir", str(tmp_path / "data"),
            "--results-dir", str(tmp_path / "results"), "--leaderboard-dir", str(tmp_path / "tables")]
    assert main(args) == 0
    store = ResultStore(tmp_path / "results", "t")
    (pixels,) = [p for p in store.dir.glob("*.json") if json.loads(p.read_text())["spec"]["method"] == "pixels"]
    aside = pixels.rename(tmp_path / "pixels.json")
    table = tmp_path / "tables" / "t.md"
    table.unlink()
    lock = store.tables_lock()
    assert lock.acquire()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "harness", *args, "--methods", "random"], cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().startswith("suite t: 1 run")  # planned; its one run is stored
        time.sleep(10)  # far longer than reading one stored record and writing the tables takes
        assert proc.poll() is None and not table.exists(), "it wrote the tables while another process held them"
        aside.rename(pixels)
    finally:
        lock.release()
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert "| pixels |" in table.read_text() and "| random |" in table.read_text()


@pytest.mark.parametrize("args,match", [
    (["run", "--methods", "nope"], "unknown method"),
    (["run", "--datasets", "imagenet22k"], "unknown dataset 'imagenet22k'"),
    (["run", "--budget", "epochs=-2"], "positive number"),
    (["run", "no-such-suite"], "unknown suite 'no-such-suite'"),
    (["run", "--seeds", "a,b"], "seeds must be"),
    (["leaderboard", "never-run"], "unknown suite"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_usage_errors_are_one_line_exit_2(args, match, capsys, tmp_path):
    assert main(args + (["--results-dir", str(tmp_path)] if args[0] == "leaderboard" else [])) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


def test_malformed_yaml_and_missing_data_dir(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethods: [simclr\n")
    assert main(["run", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    suite = _suite_file(tmp_path, ["random"], name="m")
    suite.write_text(suite.read_text().replace('"digits"', '"cifar10"'))
    assert main(["run", str(suite), "--data-dir", str(tmp_path / "nowhere"), "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "cifar10" in err and "not found" in err and err.count("\n") == 1


def test_subprocess_error_has_no_traceback(tmp_path):
    out = _cli(tmp_path, "run", "--methods", "nope")
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("norm, mean, std", [("none", 0.0, 1.0), ("dataset", None, None)])
def test_eval_normalises_as_its_input_norm_says(tmp_path, monkeypatch, norm, mean, std):
    """``harness eval --input-norm none`` scores an encoder trained on pixels in [0, 1] (CC's and CD's recipe) on
    such pixels; the default keeps the dataset's mean and std. Catches the option ignored (every external CC or
    CD encoder scored on inputs it never saw)."""
    import harness.engine.evaluate as evaluate_module
    from harness.data.datasets import load_dataset
    from harness.models.backbones import create_backbone

    good = tmp_path / "good.pt"
    torch.save(create_backbone("small_cnn", 1).state_dict(), good)
    seen = {}

    def capture(ctx, protocols):
        seen["x"] = ctx.normalize(ctx.data.images[:3])
        return {}, {}

    monkeypatch.setattr(evaluate_module, "evaluate", capture)
    assert main(["eval", "--checkpoint", str(good), "--arch", "small_cnn", "--protocols", "knn", "--input-norm", norm,
                 "--data-dir", str(tmp_path / "d"), "--device", "cpu"]) == 0
    data = load_dataset("digits", tmp_path / "d")
    mean, std = (data.mean[0], data.std[0]) if mean is None else (mean, std)
    torch.testing.assert_close(seen["x"], (data.images[:3].float() / 255 - mean) / std, rtol=0, atol=1e-5)


def test_eval_checkpoint(tmp_path, capsys):
    from harness.models.backbones import create_backbone

    good = tmp_path / "good.pt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in create_backbone("small_cnn", 1).state_dict().items()}}, good)
    assert main(["eval", "--checkpoint", str(good), "--arch", "small_cnn", "--protocols", "knn",
                 "--data-dir", str(tmp_path / "d"), "--device", "cpu"]) == 0
    assert "knn/top1" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(good), "--arch", "resnet18", "--data-dir", str(tmp_path / "d")]) == 2
    assert "does not match architecture 'resnet18'" in capsys.readouterr().err

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    assert main(["eval", "--checkpoint", str(evil), "--arch", "small_cnn", "--data-dir", str(tmp_path / "d")]) == 2
    assert "weights-only" in capsys.readouterr().err and not (tmp_path / "pwned").exists()
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--arch", "small_cnn"]) == 2


def test_leaderboard_refuses_mixed_splits_and_marks_best(run_suite, tmp_path):
    from harness.errors import UsageError
    from harness.reporting.leaderboard import write_leaderboard

    recs = run_suite(["random", "pixels"], seeds=[0, 1], protocols=FAST)
    board = write_leaderboard(recs, "t", tmp_path / "lb")
    assert {"random", "pixels"} == set(board.index)
    mean = {row: float(board.at[row, "digits knn/top1"].strip("*_").split()[0]) for row in ("random", "pixels")}
    top = max(mean, key=mean.get)
    assert board.at[top, "digits knn/top1"].startswith(("**", "_"))  # the best mean: bold, or tied if not significant
    assert "(n<3)" in board.loc["random", "digits knn/top1"]  # 2 seeds: no interval
    for ext in ("md", "csv", "tex", "html"):
        assert (tmp_path / "lb" / f"t.{ext}").stat().st_size > 0
    recs[0]["split_sha256"] = "0" * 64
    with pytest.raises(UsageError, match="different data splits"):
        write_leaderboard(recs, "t", tmp_path / "lb")


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("options,expected,dtype", [
    ({"precision": "bf16"}, {"precision": "bf16", "compile": False}, torch.bfloat16),
    ({"compile": True}, {"precision": "fp32", "compile": True}, torch.float32)])
def test_precision_and_compile_are_applied_and_recorded(tmp_path, monkeypatch, options, expected, dtype):
    """Inside every training step the backbone's output has the dtype the record names (bf16
    autocast works on CPU too), and ``--compile`` hands the backbone to ``torch.compile`` once.

    Breakage tried (patched in a scratch run): train() resolving its precision to fp32 while
    the runner records bf16 (autocast off), and train() called without ``compile_backbone``;
    both pass the record check and fail this test.
    """
    from harness.execution.runner import Runner, plan
    from methods.simclr import SimCLR

    outputs, backbones, compiled = [], [], []
    training_step, torch_compile = SimCLR.training_step, torch.compile

    def hooked_step(self, batch):
        backbones.append(self.backbone)
        hook = self.backbone.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
        try:
            return training_step(self, batch)
        finally:
            hook.remove()

    def recording_compile(fn, *args, **kwargs):
        compiled.append(fn)
        return torch_compile(fn, *args, **kwargs)

    monkeypatch.setattr(SimCLR, "training_step", hooked_step)
    monkeypatch.setattr(torch, "compile", recording_compile)
    runner = Runner(tmp_path / "results", tmp_path / "data", device="cpu", quiet=True, log=lambda s: None, **options)
    (record,) = runner.run(plan(make_suite(["simclr"], budget="steps=2", protocols={"knn": {"k": 10}})))
    assert record["status"] == "ok"
    assert {k: record["train"][k] for k in expected} == expected and record["train"]["channels_last"] is False
    assert len(backbones) == 2 and len(outputs) == 2 * 2 and set(outputs) == {dtype}  # two views a step
    if expected["compile"]:
        assert len(compiled) == 1 and compiled[0].__self__ is backbones[0]
    else:
        assert compiled == []
    with pytest.raises(UsageError, match="unknown precision 'fp8'"):
        Runner(tmp_path / "results", tmp_path / "data", device="cpu", precision="fp8")


@pytest.mark.usefixtures("one_torch_thread")
def test_per_image_dataloader_pipeline_trains_and_resumes_at_its_step(tmp_path, monkeypatch):
    """``--pipeline per_image``: views come from the DataLoader path in train()'s order; a run killed
    at its 3rd step resumes with the batches it had not trained on (the feed checks the images)."""
    from harness.execution.runner import Runner, plan
    from methods.simclr import SimCLR

    calls = []
    original = SimCLR.training_step

    def dies_once(self, batch):
        calls.append(batch.index.clone())
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(SimCLR, "training_step", dies_once)
    runner = Runner(tmp_path / "results", tmp_path / "data", device="cpu", quiet=True, log=lambda s: None,
                    checkpoint_seconds=0.0, pipeline="per_image", loader_workers=1)
    jobs = plan(make_suite(["simclr"], budget="steps=12", protocols={"knn": {"k": 10}}))  # 10 steps per epoch
    with pytest.raises(KeyboardInterrupt):
        runner.run(jobs)
    (record,) = runner.run(jobs)
    assert record["status"] == "ok" and record["train"]["pipeline"] == "per_image"
    assert record["budget"]["used"]["steps"] == 12 and len(calls) == 3 + 10  # steps 3..12 after the restart
    assert torch.equal(calls[3], calls[2])  # the step that died is the first one trained after the resume
    with pytest.raises(UsageError, match="unknown pipeline 'pil'"):
        Runner(tmp_path / "results", tmp_path / "data", device="cpu", pipeline="pil")


def test_leaderboard_leaves_out_records_of_an_older_configuration(tmp_path, capsys):
    """A record whose run the suite now plans under another spec is not averaged in as a second seed."""
    import yaml

    suite_file = tmp_path / "s.yaml"
    suite_file.write_text(yaml.safe_dump({"name": "s", "datasets": ["digits"], "methods": ["random"], "seeds": [0],
                                          "budget": "epochs=1", "protocols": FAST}))
    dirs = ["--results-dir", str(tmp_path / "r"), "--leaderboard-dir", str(tmp_path / "lb")]
    assert main(["run", str(suite_file), "--quiet", "--data-dir", str(tmp_path / "d"), *dirs]) == 0
    (stored,) = (tmp_path / "r" / "s").glob("*.json")
    old = json.loads(stored.read_text())
    old["run_id"], old["spec"]["config"]["batch_size"] = "0" * 16, 1  # as if written before a config change
    (stored.parent / f"{old['run_id']}.json").write_text(json.dumps(old))
    capsys.readouterr()
    assert main(["leaderboard", str(suite_file), *dirs]) == 0
    out, err = capsys.readouterr()
    assert "left out 1 stored records" in err and "digits knn/top1" in out
    import csv

    with open(tmp_path / "lb" / "s.csv") as f:
        assert {row["n"] for row in csv.DictReader(f)} == {"1"}  # one seed, the superseded record not averaged in


def test_readme_shows_the_simclr_adapter_as_it_is_in_its_file():
    """README's "Adding a method" calls its code block the whole adapter: it must be methods/simclr.py's code."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Adding a method"):]
    block = section[section.index("```python\n") + len("```python\n"):section.index("\n```\n")]
    source = (REPO / "methods" / "simclr.py").read_text()
    assert block.strip() == source[source.index("from __future__"):].strip()


def test_dry_run_says_what_run_would_do_with_each_planned_run_and_writes_nothing(tmp_path, capsys):
    """``run --dry-run`` lists every planned run as stored, failed, to train or retrain (``--force``,
    ``--retry-failed``), estimates the runs to train from the stored runs of their rows, and leaves the results
    and tables as they were; the plain run's first line counts the same states. Methods that never train show
    no budget."""
    import yaml

    suite_file = tmp_path / "s.yaml"
    suite_file.write_text(yaml.safe_dump({"name": "s", "datasets": ["digits"], "methods": ["random", "pixels"],
                                          "seeds": [0], "budget": "epochs=1", "protocols": FAST}))
    dirs = ["--data-dir", str(tmp_path / "d"), "--results-dir", str(tmp_path / "r"),
            "--leaderboard-dir", str(tmp_path / "lb")]
    assert main(["run", str(suite_file), "--quiet", "--methods", "random", *dirs]) == 0
    assert "1 to train" in capsys.readouterr().out.splitlines()[0]
    (stored,) = (tmp_path / "r" / "s").glob("*.json")
    record = json.loads(stored.read_text())
    took = record["train_seconds"] + sum(record["eval_seconds"].values())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def dry_run(*extra: str) -> list[str]:
        assert main(["run", str(suite_file), "--dry-run", "--seeds", "0,1", *extra, *dirs]) == 0
        return capsys.readouterr().out.splitlines()

    lines = dry_run()
    assert lines[0] == "suite s: 4 runs: 1 stored, 3 to train (dry run: nothing trained)"
    assert [line.split()[0] for line in lines[1:5]] == ["stored", "to", "to", "to"]
    assert stored.stem in lines[1] and lines[1].endswith("random on digits seed 0 (no training)")
    assert lines[5].startswith(f"to train: about {took:.0f} s of training and evaluation for 1 of them")
    assert lines[6] == "to train: 2 runs whose rows have no stored run to tell their time"
    assert dry_run("--force")[0].startswith("suite s: 4 runs: 3 to train, 1 retrain")
    stored.write_text(json.dumps({**record, "status": "failed", "reason": "loss is NaN"}))
    assert dry_run()[0].startswith("suite s: 4 runs: 1 failed, 3 to train")
    assert dry_run("--retry-failed")[0].startswith("suite s: 4 runs: 3 to train, 1 retrain")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_run_options_replace_the_suites_datasets_seeds_and_budget(tmp_path):
    """``--datasets``, ``--seeds`` and ``--budget`` replace the suite's lists: the suite names a folder that does
    not exist, seeds 0 and 1 and 5 steps; the command runs digits, seed 4, 2 steps, and stores only that run.
    ``--methods`` runs a subset of the rows while the table still shows every row on disk. Catches an option
    parsed but not applied (the suite's own data, seeds or budget run instead) and a table cut to the subset."""
    path = tmp_path / "o.yaml"
    path.write_text(json.dumps({"name": "o", "datasets": [f"imagefolder:{tmp_path / 'absent'}"], "seeds": [0, 1],
                                "methods": ["random", {"name": "random", "as": "again"}], "budget": "steps=5",
                                "protocols": FAST}))
    for row in ("random", "again"):
        assert main(["run", str(path), "--methods", row, "--datasets", "digits", "--seeds", "4", "--budget", "steps=2",
                     "--quiet", "--device", "cpu", "--data-dir", str(tmp_path / "d"), "--results-dir",
                     str(tmp_path / "r"), "--leaderboard-dir", str(tmp_path / "l")]) == 0
    records = [json.loads(p.read_text()) for p in (tmp_path / "r" / "o").glob("*.json")]
    assert sorted((r["spec"]["label"], r["spec"]["dataset"], r["spec"]["seed"], r["spec"]["budget"]["steps"])
                  for r in records) == [("again", "digits", 4, 2), ("random", "digits", 4, 2)]
    board = (tmp_path / "l" / "o.md").read_text()
    assert "| random |" in board and "| again |" in board
