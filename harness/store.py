"""The result store: one JSON record per run, written atomically, named by the hash of its spec."""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator


def run_id(spec: dict[str, Any]) -> str:
    """Stable id of a run: sha256 of its canonical JSON spec (first 16 hex digits)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write to a unique temporary file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        return json.loads(self.record_path(rid).read_text())

    def write(self, record: dict[str, Any]) -> Path:
        path = self.record_path(record["run_id"])
        write_json_atomic(path, record)
        return path

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob("*.json")):
            yield json.loads(path.read_text())

    def lock(self, rid: str) -> "RunLock":
        return RunLock(self.dir / ".locks" / f"{rid}.lock")


class RunLock:
    """An exclusive claim on a run, so two processes sharing a results directory never train it twice.

    Created with O_EXCL; a lock whose process no longer exists on this host is stale and taken over.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                return False
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}")
            self.held = True
            return True
        return False

    def _stale(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return True
        if host != socket.gethostname():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
