"""harness.execution.tune: an Optuna study of simclr on digits scored on the validation split, resumed after a
stop, with its best trial written to results/tune/<study>.json."""
from __future__ import annotations

import json

import pytest
import torch

optuna = pytest.importorskip("optuna", reason="harness tune needs Optuna (a dependency of ssl-harness)")

from harness.engine.budget import Budget
from harness.errors import UsageError
from methods import Method, register_method
from harness.execution.tune import _final_epoch, default_study_name, suggest, tune


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_study_resumes_counts_finished_trials_and_writes_best(tmp_path):
    kw = dict(results_dir=tmp_path / "results", data_dir=tmp_path / "data", seed=0, scale="cpu", device="cpu",
              config={"batch_size": 32}, knn={"k": 20}, log=lambda s: None)
    first = tune("simclr", "digits", 2, "steps=3", study_name="s", **kw)
    assert first["n_trials"] == 2 and first["counts"]["complete"] == 2
    storage = f"sqlite:///{(tmp_path / 'results' / 'tune' / 's.db').resolve()}"
    study = optuna.load_study(study_name="s", storage=storage)
    study.ask()  # a trial left RUNNING, as by a killed process: not counted as finished

    second = tune("simclr", "digits", 4, "steps=3", study_name="s", **kw)
    trials = optuna.load_study(study_name="s", storage=storage).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4 and second["n_trials"] == 4  # only two more ran
    assert [t.params for t in complete[:2]] == [t["params"] for t in first["trials"]]
    assert complete[2].params != complete[0].params  # the resumed sampler draws new points
    for t in complete:
        assert set(t.params) == {"lr", "temperature"} and 0.01 <= t.params["lr"] <= 1.0

    saved = json.loads((tmp_path / "results" / "tune" / "s.json").read_text())
    assert saved["n_trials"] == 4 and saved["trials_asked"] == 4 and saved["counts"]["running"] == 1
    best = max(complete, key=lambda t: t.value)
    assert saved["best"]["number"] == best.number and saved["best"]["value"] == best.value
    assert saved["best"]["params"] == best.params and saved["best"]["config"]["batch_size"] == 32
    assert saved["best"]["config"]["lr"] == best.params["lr"]
    # trials are stored runs scored on the validation split only: no test metric was computed
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "tune-s").glob("*.json")]
    assert len(records) == 4
    assert all(set(r["metrics"]["backbone"]) == {"val_knn/top1", "val_knn/top5"} for r in records)
    assert all(list(r["spec"]["protocols"]) == ["val_knn"] for r in records)

    again = tune("simclr", "digits", 4, "steps=3", study_name="s", **kw)  # nothing left to do
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 5 and again["best"] == saved["best"]


@register_method("_tune_toy")
class _Toy(Method):
    """Trains one scalar (nearly free); its backbone stays at its random initialisation."""

    search_space = {"lr": ("log", 0.01, 0.1)}

    def __init__(self, backbone, cfg, info):
        super().__init__(backbone, cfg, info)
        backbone.requires_grad_(False)  # untrained: every trainable parameter must get a gradient
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch):
        return (self.w ** 2).sum()


def test_median_pruning_on_intermediate_val_knn(tmp_path):
    storage = f"sqlite:///{tmp_path / 'p.db'}"
    study = optuna.create_study(storage=storage, study_name="p", direction="maximize")
    for _ in range(5):  # five finished trials that scored a perfect 1.0 after epoch 1
        study.add_trial(optuna.trial.create_trial(
            params={"lr": 0.05}, distributions={"lr": optuna.distributions.FloatDistribution(0.01, 0.1, log=True)},
            value=1.0, intermediate_values={1: 1.0}))
    # one step per epoch (batch >= 1,295 training images): epoch 1 is reported, then pruned below the median
    out = tune("_tune_toy", "digits", 6, "epochs=2", storage=storage, study_name="p", results_dir=tmp_path / "r",
               data_dir=tmp_path / "data", device="cpu", config={"batch_size": 2048}, knn={"k": 20},
               log=lambda s: None)
    last = optuna.load_study(study_name="p", storage=storage).trials[-1]
    assert last.state == optuna.trial.TrialState.PRUNED and list(last.intermediate_values) == [1]
    assert out["counts"]["pruned"] == 1 and out["n_trials"] == 6 and out["best"]["value"] == 1.0
    assert not list((tmp_path / "r" / "tune-p").rglob("*.json")) and not list((tmp_path / "r").rglob("*.pt"))


def test_suggest_maps_every_kind_of_search_space():
    space = {"lr": ("log", 1e-3, 1.0), "temperature": ("float", 0.1, 1.0), "views": ("int", 2, 4),
             "augment_overrides": ("categorical", [{}, {"crop_scale": [0.2, 1.0]}])}
    trial = optuna.trial.FixedTrial({"lr": 0.01, "temperature": 0.5, "views": 3,
                                     "augment_overrides": repr({"crop_scale": [0.2, 1.0]})})
    assert suggest(trial, space) == {"lr": 0.01, "temperature": 0.5, "views": 3,
                                     "augment_overrides": {"crop_scale": [0.2, 1.0]}}
    with pytest.raises(UsageError, match="unknown kind"):
        suggest(trial, {"lr": ("uniform", 0, 1)})


def test_final_epoch_and_bad_arguments(tmp_path):
    assert _final_epoch(Budget("epochs", 20), 1295, 128) == 19
    assert _final_epoch(Budget("steps", 3), 1295, 512) == 1 and _final_epoch(Budget("steps", 3), 1295, 128) == 0
    assert _final_epoch(Budget("samples", 2560), 1295, 128) == 1 and _final_epoch(Budget("seconds", 9), 10, 2) is None
    kw = dict(results_dir=tmp_path, data_dir=tmp_path / "data")
    with pytest.raises(UsageError, match="does not train"):
        tune("pixels", "digits", 2, "steps=3", **kw)
    with pytest.raises(UsageError, match="trials"):
        tune("simclr", "digits", 0, "steps=3", **kw)


def test_a_default_study_name_fits_a_file_name_and_stays_distinct():
    """The default name spells out method, dataset, budget, scale and seed; an image folder's long path as the dataset
    is cut to 70 characters plus a hash of the whole, so it still names a file and two such folders two studies."""
    budget = Budget.parse("steps=1")
    assert default_study_name("simclr", "digits", budget, "cpu", 0) == "simclr-digits-steps1-cpu-s0"
    long_a, long_b = (default_study_name("simclr", f"imagefolder:/data/{'x' * 200}{end}", budget, "cpu", 0)
                      for end in "ab")
    assert len(long_a) <= 95 and long_a.startswith("simclr-imagefolder__data_xxx") and long_a != long_b


def test_the_final_epoch_of_a_samples_budget_holds_its_last_partial_step():
    """2,600 samples at 128 a step are 20.3 steps, so training takes 21 steps; at 10 steps an epoch (1,295 images)
    step 21 is in epoch 2 (0-based), the epoch whose value comes from the record. Catches: the step count rounded
    down (epoch 1 taken as the last, so the last epoch would be evaluated twice)."""
    assert _final_epoch(Budget("samples", 2600), 1295, 128) == 2
    assert _final_epoch(Budget("samples", 2560), 1295, 128) == 1


def test_a_trial_reports_after_every_epoch_but_its_last(tmp_path):
    """Three epochs of one step each (a batch of 2,048 covers digits' 1,295 training images): the study's first trial
    (which the median pruner cannot prune, having nothing to compare with) reports validation kNN after epochs 1 and
    2 only; its value after epoch 3 is the record's. Catches: the last epoch evaluated a second time for a report."""
    storage = f"sqlite:///{tmp_path / 'e.db'}"
    out = tune("_tune_toy", "digits", 1, "epochs=3", storage=storage, study_name="e", results_dir=tmp_path / "r",
               data_dir=tmp_path / "data", device="cpu", config={"batch_size": 2048}, knn={"k": 20},
               log=lambda s: None)
    (trial,) = optuna.load_study(study_name="e", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and sorted(trial.intermediate_values) == [1, 2]
    assert out["best"]["value"] == out["best"]["metrics"]["backbone"]["val_knn/top1"]


def test_a_search_space_naming_no_config_key_is_refused_before_a_study_is_made(tmp_path):
    """An adapter whose search space misspells a config key ('temprature') is refused in one line naming the key,
    before the study's storage or any result is written. Catches: the space's keys unchecked (every trial would then
    fail on the unknown key, after the data was loaded and the study created)."""
    from methods import METHODS

    class _Misspelt(_Toy):
        search_space = {"temprature": ("float", 0.1, 1.0)}

    register_method("_tune_misspelt")(_Misspelt)
    try:
        with pytest.raises(UsageError, match="search space of '_tune_misspelt' names 'temprature', which is not a "
                                             "config key"):
            tune("_tune_misspelt", "digits", 1, "steps=1", results_dir=tmp_path / "r", data_dir=tmp_path / "data",
                 device="cpu", log=lambda s: None)
    finally:
        METHODS.unregister("_tune_misspelt")
    assert not (tmp_path / "r").exists()


def test_a_storage_password_never_appears_in_an_error():
    """A storage URL whose scheme no driver serves is one line naming the URL with its password masked. Catches: the
    URL printed as given (a database password in a log)."""
    from harness.execution.tune import make_storage

    with pytest.raises(UsageError) as refused:
        make_storage("nosuchdb://alice:hunter2@db.example/optuna")
    assert "nosuchdb://alice:***@db.example/optuna" in str(refused.value) and "hunter2" not in str(refused.value)
