"""The result store: portable run ids, the run lock under real races, atomic writes, unreadable records."""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.execution.store import (ResultStore, RunLock, canonical_spec, remove_stale_temp_files, run_id,
                                     write_json_atomic)
from harness.execution.suite import load_suite, shipped_suites
from methods import METHODS

REPO = Path(__file__).resolve().parents[1]


def _floats(value, path=()):
    """Every float in a nested spec with its path."""
    if isinstance(value, float):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _floats(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _floats(v, path + (i,))


def _replace(spec, path, new):
    out = json.loads(json.dumps(spec))
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return out


def test_ids_ignore_float_noise_and_key_order_but_not_values():
    """The machine that wrote the committed records computed 9.999999999999999e-06 where another CPU gets 1e-05
    (np.logspace); both must name the same run. A real change of a value must still change the id."""
    a = {"lbfgs": {"l2": [9.999999999999999e-06, 0.1]}, "seed": 0, "lr": 0.06}
    b = {"seed": 0, "lr": 0.06, "lbfgs": {"l2": [1e-05, 0.1]}}
    assert run_id(a) == run_id(b)
    assert run_id({**b, "lr": 0.061}) != run_id(b)
    assert run_id({**b, "seed": 1}) != run_id(b)
    # numpy scalars and tuples hash as the plain values they stand for
    assert run_id({"x": np.float64(0.5), "n": np.int64(3), "t": (1, 2)}) == run_id({"x": 0.5, "n": 3, "t": [1, 2]})
    assert canonical_spec({"x": math.inf}) == {"x": "inf"}


def test_a_config_key_added_later_keeps_stored_ids_at_its_neutral_value():
    """A config key added after records were stored (``warmup_start``) hashes as absent at the value that keeps
    the old behaviour (None), in a run's config and in a combination's component configs, so the committed
    records keep their names; any other value is another run. Catches every record orphaned by a new key, or a
    set value ignored by the id."""
    from harness.execution.store import NEUTRAL_CONFIG

    old = {"method": "npid_cld", "config": {"lr": 0.06, "warmup": 0.025}, "seed": 0,
           "components": [{"method": "supcon", "config": {"lr": 0.1}}]}
    new = {**old, "config": {**old["config"], "warmup_start": None},
           "components": [{"method": "supcon", "config": {"lr": 0.1, "warmup_start": None}}]}
    assert NEUTRAL_CONFIG == {"warmup_start": None, "lr_update": "step", "input_norm": "dataset"}
    assert run_id(new) == run_id(old)
    assert run_id({**new, "config": {**new["config"], "warmup_start": 0.01}}) != run_id(old)
    assert run_id({**new, "components": [{"method": "supcon", "config": {"lr": 0.1, "warmup_start": 0.01}}]}) \
        != run_id(old)


@pytest.mark.parametrize("suite_name", sorted(shipped_suites()))
def test_one_ulp_on_any_float_of_a_shipped_spec_keeps_its_id(suite_name):
    """Perturb every float of the first planned spec of each shipped suite by one ulp, up and down."""
    from harness.execution.runner import plan

    spec = json.loads(json.dumps(plan(load_suite(suite_name))[0].spec, default=str))
    rid = run_id(spec)
    floats = list(_floats(spec))
    for path, value in floats:
        for direction in (math.inf, -math.inf):
            assert run_id(_replace(spec, path, math.nextafter(value, direction))) == rid, (path, value)


def test_committed_records_of_every_shipped_suite_are_found_by_plan():
    """A fresh clone on any machine finds every committed record: each record's file name is the id that `plan`
    gives its run now, and every run `plan` gives has a record (so `harness run` trains nothing)."""
    from harness.execution.runner import plan

    suites = shipped_suites()
    committed = [d for d in (REPO / "results").iterdir() if d.is_dir() and d.name in suites and any(d.glob("*.json"))]
    assert committed, "no committed records found"
    for directory in committed:
        planned = {job.run_id for job in plan(load_suite(directory.name))  # 'methods: all' takes in the throwaway
                   if METHODS.get(job.entry.name).__module__.startswith("methods.")}  # adapters tests register
        stored = {p.stem for p in directory.glob("*.json")}
        assert stored == planned, (directory.name, sorted(stored - planned)[:3], sorted(planned - stored)[:3])
        for path in directory.glob("*.json"):
            record = json.loads(path.read_text())
            assert record["run_id"] == path.stem == run_id(record["spec"])


def test_migrate_renames_records_and_checkpoints_to_current_ids(tmp_path):
    store = ResultStore(tmp_path, "s")
    spec = {"seed": 0, "l2": 9.999999999999999e-06}
    store.write({"run_id": "0123456789abcdef", "spec": spec, "metrics": {}})
    store.checkpoint_path("0123456789abcdef").parent.mkdir(parents=True)
    store.checkpoint_path("0123456789abcdef").write_bytes(b"weights")
    assert store.migrate_run_ids() == ([("0123456789abcdef", run_id(spec))], [])
    assert sorted(p.name for p in store.dir.glob("*.json")) == [f"{run_id(spec)}.json"]
    assert store.load(run_id(spec))["run_id"] == run_id(spec)
    assert store.checkpoint_path(run_id(spec)).read_bytes() == b"weights"
    assert store.migrate_run_ids() == ([], [])


def test_migrate_makes_a_whole_float_budget_the_int_a_plan_now_names(tmp_path):
    """A record of ``{epochs: 20.0}`` written before whole limits became ints is renamed to the id of
    ``epochs=20``, so the suite finds it instead of training it again; an unreadable budget is left alone."""
    store = ResultStore(tmp_path, "s")
    old_spec, odd_spec = {"seed": 0, "budget": {"epochs": 20.0}}, {"seed": 1, "budget": {"fortnights": 2}}
    store.write({"run_id": run_id(old_spec), "spec": old_spec, "metrics": {}})
    store.write({"run_id": run_id(odd_spec), "spec": odd_spec, "metrics": {}})
    now = run_id({"seed": 0, "budget": {"epochs": 20}})
    assert now != run_id(old_spec) and store.migrate_run_ids() == ([(run_id(old_spec), now)], [])
    assert store.load(now)["spec"]["budget"] == {"epochs": 20} and store.has(run_id(odd_spec))


def test_unreadable_and_foreign_json_are_skipped_with_a_line_naming_them(tmp_path):
    store = ResultStore(tmp_path, "s")
    store.write({"run_id": "a", "spec": {"seed": 0}})
    (store.dir / "broken.json").write_text('{"run_id": ')
    (store.dir / "foreign.json").write_text('{"name": "package.json"}')
    (store.dir / "binary.json").write_bytes(b"\xff\xfe\x00")
    warnings = []
    assert [r["run_id"] for r in store.records(warn=warnings.append)] == ["a"]
    assert len(warnings) == 3 and all(w.startswith("warning: skipped ") for w in warnings)
    assert {Path(w.split()[2].rstrip(":")).name for w in warnings} == {"broken.json", "foreign.json", "binary.json"}


def test_a_failed_write_leaves_no_temp_file_and_the_old_record(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"v": 1})
    with pytest.raises(TypeError):  # json.dump fails after writing "{" (a tuple key), as a full disk would
        write_json_atomic(path, {("tuple", "key"): 1})
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f".abc.json~{host}~{int(dead.stdout)}.tmp"
    live = tmp_path / f".def.json~{host}~{os.getpid()}.tmp"
    other_host = tmp_path / f".ghi.json~not-{host}~{int(dead.stdout)}.tmp"
    for p in (stale, live, other_host):
        p.write_text("")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_host.name])


# ---------------------------------------------------------------- the lock under a race of two processes
def _contender(lock_dir: str, trials: int, barrier, results) -> None:
    held = []
    for trial in range(trials):
        barrier.wait()  # the parent has set up the trial (maybe with a stale lock)
        lock = RunLock(Path(lock_dir) / f"{trial}.lock")
        got = lock.acquire()
        held.append(got)
        barrier.wait()  # both have tried while the holder still holds
        lock.release()
    results.put((os.getpid(), held))


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


@pytest.mark.parametrize("stale", ["none", "stale", "stale-old-format"])
def test_two_processes_racing_for_a_lock_exactly_one_holds_it(tmp_path, stale):
    """300 trials of two processes released by a barrier at once. The old lock created an empty file and wrote
    its owner afterwards; the second process read the empty file, judged it stale and took it: both held it
    in 293 of 300 trials (21 of 300 with a stale lock present)."""
    trials = 300
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(str(tmp_path), trials, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    dead = _dead_pid()
    host = socket.gethostname()
    for trial in range(trials):
        if stale == "stale":
            (tmp_path / f"{trial}.lock").write_text(f"{host} {dead} 12345 deadbeefdeadbeef")
        elif stale == "stale-old-format":
            (tmp_path / f"{trial}.lock").write_text(f"{host} {dead}")
        barrier.wait()
        barrier.wait()
    held = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    a, b = held.values()
    assert [x + y for x, y in zip(a, b)] == [1] * trials


def test_a_lock_of_a_live_process_or_another_host_is_never_broken(tmp_path):
    mine = RunLock(tmp_path / "x.lock")
    assert mine.acquire()
    assert not RunLock(tmp_path / "x.lock").acquire()
    (tmp_path / "y.lock").write_text(f"other-host-{socket.gethostname()} {_dead_pid()} 1 ab")
    assert not RunLock(tmp_path / "y.lock").acquire()
    mine.release()
    assert not (tmp_path / "x.lock").exists()
    assert RunLock(tmp_path / "x.lock").acquire()


@pytest.mark.parametrize("content", ["{host}", "{host} {dead} 1", "{host} {dead} 1 ab extra", "{host} pid{dead} 1 ab"])
def test_a_lock_file_this_code_did_not_write_is_never_broken(tmp_path, content):
    """A lock whose content is not "host pid" or "host pid start token" (another tool's, or a truncated one) is
    left alone however dead the pid it seems to name, and taking it fails without an error. Catches a staleness
    check that parses any content (breaking a foreign lock, or an IndexError on a one-field file)."""
    path = tmp_path / "x.lock"
    path.write_text(content.format(host=socket.gethostname(), dead=_dead_pid()))
    assert not RunLock(path).acquire()
    assert path.exists()


def test_negative_floats_and_booleans_keep_their_own_run_ids():
    """Only magnitudes below 1e-200 are zero: -0.5 is not 0.0 (a negative hyperparameter or score is a real
    value), -1e-300 is; and True is not 1. Catches a signed comparison with ZERO_BELOW and booleans hashed as
    integers."""
    assert run_id({"x": -0.5}) != run_id({"x": 0.0}) and run_id({"x": -1e-300}) == run_id({"x": 0.0})
    assert canonical_spec({"x": -0.5, "flag": True}) == {"x": -0.5, "flag": True}
    assert run_id({"flag": True}) != run_id({"flag": 1})


def test_a_record_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """The data must be on disk before the rename makes it the record: a crash after the rename must never leave
    an empty or partial record under the real name. The calls are observed, not replaced: the temporary file is
    fsynced, then renamed over the target."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_json_atomic(tmp_path / "r.json", {"v": 1})
    assert [c[0] for c in calls] == ["fsync", "replace"]
    assert calls[0][1] == calls[1][1] != str(tmp_path / "r.json") == calls[1][2]
    assert json.loads((tmp_path / "r.json").read_text()) == {"v": 1}


def test_a_lock_of_a_reused_pid_is_stale_and_a_live_old_format_lock_is_not(tmp_path):
    """A lock naming this host and a running pid whose process started at another time belongs to a process that
    is gone (the pid was reused): it is broken. An old-format lock ("host pid", no start time) of a running pid
    is kept. Catches a liveness check that ignores the start time, and one that treats a missing start as dead."""
    host = socket.gethostname()
    (tmp_path / "reused.lock").write_text(f"{host} {os.getpid()} 1 deadbeefdeadbeef")
    assert RunLock(tmp_path / "reused.lock").acquire()
    (tmp_path / "old.lock").write_text(f"{host} {os.getpid()}")
    assert not RunLock(tmp_path / "old.lock").acquire()


def test_release_leaves_a_lock_that_another_process_now_holds(tmp_path):
    """A holder judged stale (e.g. its pid looked dead from a container) may find its lock broken and taken by
    another process: releasing must then leave the new owner's lock in place."""
    lock = RunLock(tmp_path / "x.lock")
    assert lock.acquire()
    other = f"{socket.gethostname()} 1 - 0123456789abcdef"
    (tmp_path / "x.lock").write_text(other)
    lock.release()
    assert (tmp_path / "x.lock").read_text() == other


def test_mapping_keys_that_are_not_strings_hash_as_their_strings():
    """JSON keys are strings: a spec with an int key (a per-class or per-epoch mapping) names the same run as its
    JSON form read back, and mixed int and str keys still sort. Catches keys left as they are (json's sort_keys
    then fails on 1 < 'b', and a record read back from disk would get another id)."""
    spec = {"per_epoch": {1: 0.5, "b": 2}, "seed": 0}
    assert canonical_spec(spec) == {"per_epoch": {"1": 0.5, "b": 2}, "seed": 0}
    assert run_id(spec) == run_id(json.loads(json.dumps({"per_epoch": {"1": 0.5, "b": 2}, "seed": 0})))


def test_a_record_whose_seed_is_not_an_integer_is_skipped(tmp_path):
    """A hand-edited record with ``seed: "0"`` would put a string among the integer seeds the tables sort and pair
    on; it is skipped with a line naming it. Catches a record check that leaves out the seed."""
    store = ResultStore(tmp_path, "s")
    store.write({"run_id": "a", "spec": {"seed": 0}, "metrics": {}})
    store.write({"run_id": "b", "spec": {"seed": "0"}, "metrics": {}})
    warnings = []
    assert [r["run_id"] for r in store.records(warn=warnings.append)] == ["a"]
    assert len(warnings) == 1 and "b.json" in warnings[0] and "'seed'" in warnings[0]


def test_a_record_whose_metric_is_a_boolean_is_skipped(tmp_path):
    """A hand-edited metric ``true`` is a number to Python (1, averaged in as 100%); the record is skipped with a
    line naming it. Catches a metric check that takes booleans for numbers."""
    store = ResultStore(tmp_path, "s")
    store.write({"run_id": "a", "spec": {"seed": 0}, "metrics": {"backbone": {"knn/top1": 0.5}}})
    store.write({"run_id": "b", "spec": {"seed": 1}, "metrics": {"backbone": {"knn/top1": True}}})
    warnings = []
    assert [r["run_id"] for r in store.records(warn=warnings.append)] == ["a"]
    assert len(warnings) == 1 and "b.json" in warnings[0] and "numbers" in warnings[0]


_KILLED_WRITER = """
import os, sys
from pathlib import Path
from harness.execution.store import ResultStore, write_atomic
store = ResultStore(Path(sys.argv[1]), "s")
def die(f):
    f.write(b"half a file")
    f.flush()
    os._exit(9)  # killed mid-write: no except clause, no cleanup
write_atomic(store.record_path("r") if sys.argv[2] == "record" else store.checkpoint_path("r"), die, binary=True)
"""


def test_temp_files_of_a_writer_killed_mid_write_are_removed_on_the_next_start(tmp_path):
    """Two writers killed mid-write (one of a record, one of a checkpoint under .ckpt/) leave their temporary files;
    ``clean_temp_files`` of the next start removes both and nothing else, and no record appeared meanwhile. Catches
    a temporary name the cleanup's pattern does not match (no leading dot) and a cleanup that forgets .ckpt/."""
    for what in ("record", "checkpoint"):
        done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path), what], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 9
    store = ResultStore(tmp_path, "s")
    left = sorted(p.name for p in store.dir.rglob("*") if p.is_file())
    assert len(left) == 2 and not store.has("r") and not store.checkpoint_path("r").exists()
    assert sorted(p.name for p in store.clean_temp_files()) == left
    assert [p for p in store.dir.rglob("*") if p.is_file()] == []


def test_breaking_a_lock_that_was_replaced_meanwhile_puts_the_new_one_back(tmp_path):
    """Between judging a lock stale and renaming it aside, its owner may have released it and a live process taken
    it: what was renamed is then not the judged content, so it goes back in place and the break fails. Catches a
    break that deletes whatever it renamed."""
    path = tmp_path / "x.lock"
    live = f"{socket.gethostname()} {os.getpid()} - 0123456789abcdef"
    path.write_text(live)
    assert not RunLock(path)._break(f"{socket.gethostname()} {_dead_pid()} 1 deadbeefdeadbeef")
    assert path.read_text() == live and sorted(p.name for p in tmp_path.iterdir()) == ["x.lock"]


def test_a_lock_released_between_the_failed_link_and_the_read_is_taken(tmp_path, monkeypatch):
    """The holder may release its lock after our link found it and before we read it: the name is then free and
    the next try takes it, instead of reporting the run as running elsewhere (it would be skipped by this suite and
    never trained). Catches an acquire that gives up when the lock it found is gone."""
    import harness.execution.store as store_module

    real_link, calls = os.link, []

    def link(src, dst):  # the first try meets a lock that its holder releases at once
        calls.append(dst)
        if len(calls) == 1:
            raise FileExistsError(dst)
        real_link(src, dst)

    monkeypatch.setattr(store_module.os, "link", link)
    lock = RunLock(tmp_path / "x.lock")
    assert lock.acquire() and len(calls) == 2 and (tmp_path / "x.lock").read_text() == lock.owner


def test_migrate_gives_a_record_stored_under_another_name_its_id(tmp_path):
    """A record whose file name is not its run id (copied in by hand) is written under the id of its spec, so that
    ``has`` finds it and the suite does not train the run again. Catches a migrate that trusts the ``run_id`` field
    alone and skips every record whose field is already current."""
    store = ResultStore(tmp_path, "s")
    spec = {"seed": 0, "lr": 0.1}
    store.dir.mkdir(parents=True)
    (store.dir / "copied-by-hand.json").write_text(json.dumps({"run_id": run_id(spec), "spec": spec, "metrics": {}}))
    assert not store.has(run_id(spec))
    assert store.migrate_run_ids() == ([("copied-by-hand", run_id(spec))], [])
    assert store.has(run_id(spec)) and store.load(run_id(spec))["spec"] == spec
    assert [p.name for p in store.dir.glob("*.json")] == [f"{run_id(spec)}.json"]


def test_migrate_removes_a_second_copy_of_a_stored_run_so_tables_count_it_once(tmp_path):
    """A hand copy of a record (``copy.json``, its ``run_id`` field current) beside the record itself is the same run
    twice: tables would count its seed twice. Migrate keeps the record under its id, unchanged, and removes the copy.
    Catches a migrate that walks ``run_id`` fields instead of file names, which leaves both."""
    store = ResultStore(tmp_path, "s")
    spec = {"seed": 0, "lr": 0.1}
    store.write({"run_id": run_id(spec), "spec": spec, "metrics": {"encoder": {"acc": 0.5}}})
    (store.dir / "copy.json").write_text(json.dumps({"run_id": run_id(spec), "spec": spec, "metrics": {"encoder": {"acc": 0.9}}}))
    assert len(list(store.records())) == 2
    assert store.migrate_run_ids() == ([], [("copy", run_id(spec))])
    assert [r["metrics"] for r in store.records()] == [{"encoder": {"acc": 0.5}}]
    assert store.migrate_run_ids() == ([], [])


def test_migrate_command_counts_renamed_records_and_removed_copies_apart(tmp_path, capsys):
    """``harness migrate`` on a suite holding a record under a hand-given name (renamed to its id) and a copy of
    a stored run (removed) says one was renamed and one removed. Catches the message counting the removed copy
    as renamed ("renamed 2 records") while one record fewer is left on disk."""
    from harness.cli import main

    store = ResultStore(tmp_path, "s")
    stored, moved = {"seed": 0, "lr": 0.1}, {"seed": 1, "lr": 0.1}
    store.write({"run_id": run_id(stored), "spec": stored, "metrics": {}})
    for name, spec in (("copy", stored), ("by-hand", moved)):
        (store.dir / f"{name}.json").write_text(json.dumps({"run_id": run_id(spec), "spec": spec, "metrics": {}}))
    assert main(["migrate", "--results-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "s: renamed 1 record to their current run ids, removed 1 second copy of runs already stored",
        f"1 record renamed under {tmp_path}, 1 second copy removed"]
    assert sorted(p.stem for p in store.dir.glob("*.json")) == sorted([run_id(stored), run_id(moved)])


def test_loading_a_record_that_is_not_text_says_which_file_to_delete(tmp_path):
    """A stored record of binary garbage (a disk error, a stray file) stops with one line naming it, as a truncated
    one does, not with a UnicodeDecodeError traceback. Catches a load that handles only JSON errors."""
    from harness.errors import EnvironmentFailure

    store = ResultStore(tmp_path, "s")
    store.dir.mkdir(parents=True)
    store.record_path("a").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(EnvironmentFailure, match=r"a\.json is not readable JSON"):
        store.load("a")
