"""The result store: one JSON record per run, written atomically, named by a portable hash of its spec.

A run id must name the same run on every machine, so it hashes a canonical form of the spec
(:func:`canonical_spec`): keys sorted, floats rounded to :data:`SIGNIFICANT_DIGITS` significant
digits, magnitudes below :data:`ZERO_BELOW` zero. Floats computed at run time (``np.logspace(-6, 0, 7)`` gives ``9.999999999999999e-06`` on
one CPU and ``1e-05`` on another) then hash alike, and nothing about the environment enters it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np

from harness.errors import EnvironmentFailure, UsageError

#: Floats in a spec are compared at this many significant digits (a float64 holds 15-17).
SIGNIFICANT_DIGITS = 12
#: Magnitudes below this are zero in a spec (one ulp away from 0.0 is a subnormal, 5e-324).
ZERO_BELOW = 1e-200
#: Temporary files of atomic writes are named ``.<target>~<host>~<pid>.tmp``.
TMP_SEPARATOR = "~"


def canonical_spec(value: Any) -> Any:
    """``value`` with floats rounded to :data:`SIGNIFICANT_DIGITS`, numpy scalars and tuples made plain,
    and mapping keys made strings, so that equal specs serialise to equal JSON on any machine."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return str(value)
        return 0.0 if abs(value) < ZERO_BELOW else float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if isinstance(value, dict):
        return {str(k): canonical_spec(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [canonical_spec(v) for v in value]
    return value


#: Config keys added after records were stored, each with the value that keeps the behaviour from before it: a
#: spec holding that value hashes as if the key were absent, so stored records keep their run ids.
NEUTRAL_CONFIG: dict[str, Any] = {"warmup_start": None, "lr_update": "step", "input_norm": "dataset"}


def _without_neutral(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with its config's (and its components' configs') :data:`NEUTRAL_CONFIG` values left out."""
    spec = dict(spec)
    if isinstance(spec.get("config"), dict):
        spec["config"] = {k: v for k, v in spec["config"].items() if k not in NEUTRAL_CONFIG or v != NEUTRAL_CONFIG[k]}
    if isinstance(spec.get("components"), list):
        spec["components"] = [_without_neutral(c) if isinstance(c, dict) else c for c in spec["components"]]
    return spec


def run_id(spec: dict[str, Any]) -> str:
    """Portable id of a run: sha256 of its canonical JSON spec (first 16 hex digits), config keys at their
    :data:`NEUTRAL_CONFIG` value left out (also in a combination's component specs)."""
    text = json.dumps(_without_neutral(canonical_spec(spec)), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _tmp_path(path: Path) -> Path:
    return path.parent / f".{path.name}{TMP_SEPARATOR}{socket.gethostname()}{TMP_SEPARATOR}{os.getpid()}.tmp"


def write_atomic(path: Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call ``write`` on a temporary file in ``path``'s directory, fsync, then rename it over ``path``.

    On any failure (full or read-only disk, an exception in ``write``) the temporary file is removed and
    the error re-raised: ``path`` keeps its old content or stays absent, never half-written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not exc.filename:  # ENOSPC from write/fsync names no file
            raise EnvironmentFailure(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    write_atomic(path, lambda f: json.dump(payload, f, indent=1, sort_keys=True, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text))


def write_torch_atomic(path: Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically. Serialised in memory first: torch's writer turns a failed
    file write (a full disk, a file size limit) into an opaque RuntimeError, a plain write raises the OSError
    that :func:`write_atomic` reports as one line."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, lambda f: f.write(buffer.getbuffer()), binary=True)


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete temporary files in ``directory`` left by killed writers on this host (owner pid gone)."""
    removed = []
    if not directory.is_dir():
        return removed
    for tmp in directory.glob(f".*{TMP_SEPARATOR}*{TMP_SEPARATOR}*.tmp"):
        host, pid = tmp.name[:-len(".tmp")].rsplit(TMP_SEPARATOR, 2)[1:]
        if host == socket.gethostname() and pid.isdigit() and not _process_alive(int(pid), None):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


#: What the tables read of every record they show (spec fields, then top-level fields).
TABLE_SPEC_KEYS = ("label", "dataset", "seed", "budget", "protocols")
TABLE_RECORD_KEYS = ("status", "split_sha256")


def record_problem(record: Any, for_tables: bool = False) -> str | None:
    """Why ``record`` (parsed JSON) is not a run record the tables can read, or None: a hand-edited or foreign
    file is skipped with this reason instead of failing a leaderboard. ``for_tables``: the fields the tables
    read must be there too (elsewhere a spec field is checked only where present)."""
    if not isinstance(record, dict) or not isinstance(record.get("spec"), dict) or "run_id" not in record:
        return "no 'run_id' and 'spec'"
    spec = record["spec"]
    if for_tables:
        missing = [f"spec {k!r}" for k in TABLE_SPEC_KEYS if k not in spec] + \
            [repr(k) for k in TABLE_RECORD_KEYS if k not in record]
        if missing:
            return f"no {missing[0]}"
    for key, kind in (("label", str), ("method", str), ("dataset", str), ("seed", int), ("budget", dict),
                      ("protocols", dict)):
        if key in spec and not isinstance(spec[key], kind):  # absent: a record of another tool's making
            return f"spec {key!r} is {spec.get(key)!r}, not a {kind.__name__}"
    metrics = record.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
            isinstance(values, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             for v in values.values()) for values in metrics.values()):
        return "'metrics' is not a mapping of representations to numbers"
    for rep, values in metrics.items():  # no protocol writes NaN or inf: such a value was edited in
        bad = next((name for name, v in values.items() if not math.isfinite(v)), None)
        if bad is not None:
            return f"metric {rep}/{bad} is {values[bad]}, not a finite number"
    return None


class ResultStore:
    """``results/<suite>/<run_id>.json`` plus ``.ckpt/`` (checkpoints, git-ignored) and ``.locks/``."""

    def __init__(self, root: Path, suite: str) -> None:
        self.dir = Path(root) / suite

    def record_path(self, rid: str) -> Path:
        return self.dir / f"{rid}.json"

    def checkpoint_path(self, rid: str) -> Path:
        return self.dir / ".ckpt" / f"{rid}.pt"

    def has(self, rid: str) -> bool:
        return self.record_path(rid).is_file()

    def load(self, rid: str) -> dict[str, Any]:
        """The record of run ``rid``. A file there that is not JSON, or JSON that is not a run record (``[]``, a
        note, a hand edit; see :func:`record_problem`), stops with one line naming it: a run id's file decides
        whether that run trains, so it is neither guessed at nor skipped."""
        path = self.record_path(rid)
        try:
            record = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EnvironmentFailure(f"record {path} is not readable JSON ({str(exc).splitlines()[0]}); "
                                     f"delete it to rerun that run") from None
        problem = record_problem(record)
        if problem:
            raise EnvironmentFailure(f"record {path} is JSON but not a run record ({problem}); delete it to rerun "
                                     f"that run")
        return record

    def write(self, record: dict[str, Any]) -> Path:
        path = self.record_path(record["run_id"])
        write_json_atomic(path, record)
        return path

    def records(self, warn=None, for_tables: bool = False) -> Iterator[dict[str, Any]]:
        """Every readable record. A file that is not JSON, or JSON that is not a run record (``for_tables``:
        one the tables can read), is skipped with one line naming it (through ``warn``, default stderr)."""
        for _, record in self._record_files(warn, for_tables):
            yield record

    def _record_files(self, warn=None, for_tables: bool = False) -> Iterator[tuple[Path, dict[str, Any]]]:
        """``(path, record)`` for every readable record file, whatever its name."""
        if not self.dir.is_dir():
            return
        warn = warn or (lambda message: print(message, file=sys.stderr))
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                warn(f"warning: skipped {path}: not a readable JSON record ({str(exc).splitlines()[0]})")
                continue
            problem = record_problem(record, for_tables)
            if problem:
                warn(f"warning: skipped {path}: JSON but not a run record ({problem})")
                continue
            yield path, record

    def lock(self, rid: str) -> "RunLock":
        return RunLock(self.dir / ".locks" / f"{rid}.lock")

    def tables_lock(self) -> "RunLock":
        """The claim on this suite's tables: each process reads the records and writes the tables while it holds
        it, so the last of several processes finishing one suite has read every record stored before it wrote
        (one that read before another's last record and wrote after its tables would drop that run)."""
        return RunLock(self.dir / ".locks" / "tables.lock")

    def migrate_run_ids(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Give every record file the name (and ``run_id``) of its spec's run id as computed now, moving its
        checkpoint along; returns the ``(old file name, new id)`` pairs renamed, and those removed. For stores
        written by older versions, which also kept a whole budget limit given as a float (``{epochs: 20.0}``;
        now the int 20), and for records copied in under another name. A file naming a run that is already
        stored under its id is a second copy of that run, which tables would count twice: it is removed and
        the stored one kept."""
        from harness.engine.budget import Budget

        renamed, removed = [], []
        for path, record in list(self._record_files()):
            budget = record["spec"].get("budget")
            if isinstance(budget, dict) and len(budget) == 1:
                try:
                    record["spec"]["budget"] = Budget.parse(budget).as_dict()
                except UsageError:
                    pass  # not a budget this version reads: its record keeps what it says
            new = run_id(record["spec"])
            target = self.record_path(new)
            if path == target and record["run_id"] == new:
                continue
            second_copy = path != target and target.is_file()
            if not second_copy:
                record["run_id"] = new
                self.write(record)
            if path != target:
                path.unlink()
                old_checkpoint = self.checkpoint_path(path.stem)
                if old_checkpoint.is_file() and not self.checkpoint_path(new).is_file():
                    os.replace(old_checkpoint, self.checkpoint_path(new))
                (removed if second_copy else renamed).append((path.stem, new))
        return renamed, removed

    def clean_temp_files(self) -> list[Path]:
        """Remove temporary files of killed writers (records, checkpoints) in this store."""
        return remove_stale_temp_files(self.dir) + remove_stale_temp_files(self.dir / ".ckpt")


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), to tell a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat, counted after the "(comm)" field


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    if start is None:
        return True
    now = _process_start(pid)
    return now is None or now == start


class RunLock:
    """An exclusive claim on a run, so two processes sharing a results directory never train it twice.

    The lock file appears atomically with its owner already in it: the owner line (host, pid,
    process start time, a random token) is written to a private temporary file, which is then
    hard-linked to the lock's name; ``link`` fails if that name exists, also on NFS. A lock is stale
    only when its owner is provably gone: same host, and that pid is not running (or is another
    process with the same pid). A stale lock is broken by renaming it to a private name and checking
    that what was renamed is the stale file that was judged (its token); a lock from another host
    is never broken.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False
        pid = os.getpid()
        self.owner = f"{socket.gethostname()} {pid} {_process_start(pid) or '-'} {secrets.token_hex(8)}"

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.parent / f".{self.path.name}.{secrets.token_hex(8)}.claim"
        tmp.write_text(self.owner)
        try:
            for _ in range(8):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    content = self._read()
                    if content is None:  # released in the meantime
                        continue
                    if not self._stale(content) or not self._break(content):
                        return False
                    continue
                self.held = True
                return True
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    @staticmethod
    def _stale(content: str) -> bool:
        fields = content.split()  # "host pid start token"; locks of older versions hold "host pid"
        if len(fields) not in (2, 4) or not fields[1].isdigit():
            return False  # not a lock this code wrote: never broken
        start = fields[2] if len(fields) == 4 and fields[2] != "-" else None
        return fields[0] == socket.gethostname() and not _process_alive(int(fields[1]), start)

    def _break(self, content: str) -> bool:
        """Remove the stale lock whose content is ``content``; False if it was replaced meanwhile."""
        aside = self.path.parent / f".{self.path.name}.{secrets.token_hex(8)}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # another process broke it first
        if aside.read_text() == content:
            aside.unlink(missing_ok=True)
            return True
        try:  # we moved a live owner's fresh lock: put it back
            os.link(aside, self.path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False

    def release(self) -> None:
        if self.held:
            if self._read() == self.owner:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def held(lock: RunLock, timeout_s: float = 300.0, poll_s: float = 0.05) -> Iterator[None]:
    """Hold ``lock`` for the block, waiting while a live process holds it (as long as that one takes to write);
    past ``timeout_s`` one line names the lock and its owner."""
    deadline = time.monotonic() + timeout_s
    while not lock.acquire():
        if time.monotonic() > deadline:
            owner = lock._read() or "another process"
            raise EnvironmentFailure(f"{lock.path} has been held for {timeout_s:.0f} s by {owner} (host, pid, ...); "
                                     f"if that process is gone, delete the file")
        time.sleep(poll_s)
    try:
        yield
    finally:
        lock.release()
