"""Files of the harness: atomic writes, run-folder paths, checkpoints (state and locks land with the planner)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a temp file in the same folder, fsync, rename: readers see the old file or the new one,
    never half of one, and a kill mid-write leaves at most a hidden temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode()))


# ---------------------------------------------------------------------------------------------- run folder
class RunPaths:
    """The files of one run folder (see design.md: results/runs/<run-id>/...)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.train = self.root / "train"
        self.checkpoints = self.train / "checkpoints"
        self.metrics = self.train / "metrics.jsonl"
        self.log = self.train / "log.txt"
        self.samples = self.root / "samples"
        self.state = self.root / "state.json"          # the launcher's record of the run's jobs

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{step:07d}.pt"

    def samples_file(self, stem: str) -> Path:
        return self.samples / f"{stem}.npz"

    def eval_file(self, stem: str, tag: str) -> Path:
        """eval/<sample stem>.<eval tag>.json: one sample set scored under one evaluation protocol."""
        return self.root / "eval" / f"{stem}.{tag}.json"


def bench_record(root: str | Path, study: str) -> Path:
    """<results>/bench/<study>.json: the throughput of every run of a study, all timed in one job. Per study, not
    per run: a run shared by two studies (their DiT baseline) is timed beside each study's other runs."""
    return Path(root) / "bench" / f"{study}.json"


# ---------------------------------------------------------------------------------------------- job state
@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (flock) on `path`, created if missing; held until the block ends."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_state(paths: RunPaths) -> dict:
    """state.json: per stage its state, cluster, job id, attempts and history (empty for a run never launched)."""
    if not paths.state.exists():
        return {"run": paths.root.name, "stages": {}}
    return json.loads(paths.state.read_text())


def record_state(paths: RunPaths, stage: str, state: str, **fields) -> dict:
    """Set a stage's state (and fields) in state.json, appending the change to its history; locked and atomic,
    because the submitting side and the jobs write the same file."""
    import time

    with file_lock(paths.root / ".state.lock"):
        data = read_state(paths)
        entry = data["stages"].setdefault(stage, {"attempts": 0, "history": []})
        entry.update(fields, state=state)
        event = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "state": state}
        if fields.get("job_id"):
            event["job_id"] = fields["job_id"]
        entry["history"].append(event)
        atomic_write_text(paths.state, json.dumps(data, indent=1) + "\n")
    return entry


def checkpoint_steps(paths: RunPaths) -> list[int]:
    """Steps of the complete checkpoints in a run, oldest first (temp files of an interrupted write are ignored)."""
    if not paths.checkpoints.is_dir():
        return []
    return sorted(int(p.stem) for p in paths.checkpoints.glob("*.pt") if p.stem.isdigit())


def latest_checkpoint(paths: RunPaths) -> Path | None:
    steps = checkpoint_steps(paths)
    return paths.checkpoint(steps[-1]) if steps else None


def save_atomic(obj, path: Path) -> None:
    """torch.save atomically: a kill mid-write never leaves a truncated checkpoint under its final name."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def prune_checkpoints(paths: RunPaths, keep: int, keep_steps: tuple[int, ...] = ()) -> None:
    """Delete all but the newest `keep` checkpoints and those at `keep_steps`."""
    for step in checkpoint_steps(paths)[:-keep]:
        if step in keep_steps:
            continue
        with contextlib.suppress(FileNotFoundError):
            paths.checkpoint(step).unlink()


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop lines logged after `max_step` (written before a kill, after the checkpoint we resume from)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= max_step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def append_line(path: Path, line: str) -> None:
    """Append one line and flush it to disk (a reader never sees a partial record after a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
