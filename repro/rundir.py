"""Files of the harness: atomic writes, run-folder paths, checkpoints (state and locks land with the planner)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from repro.errors import ConfigError


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


class DamagedFile(ConfigError):
    """A run-folder file that exists but cannot be read (truncated, zeroed, not the expected structure); the
    message is one line naming the file, and `path` lets a reader show that run as damaged and carry on."""

    def __init__(self, path: str | Path, why: str):
        super().__init__(f"{path}: damaged ({why})")
        self.path, self.why = Path(path), why


_WARNED: set[str] = set()


def warn(message: str) -> None:
    """One line on stderr, once per process (status and report read the same file more than once)."""
    import sys

    if message not in _WARNED:
        _WARNED.add(message)
        print(f"repro: warning: {message}", file=sys.stderr)


def read_json_file(path: Path, what: str = "a record") -> dict:
    """The JSON object of a run-folder file; DamagedFile naming it when it cannot be read or parsed, or holds
    something other than an object (`what` it should hold)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise DamagedFile(path, f"cannot read: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError: a torn or zeroed write
        raise DamagedFile(path, f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DamagedFile(path, f"holds a JSON {type(data).__name__}, not {what}")
    return data


def read_state(paths: RunPaths) -> dict:
    """state.json: per stage its state, cluster, job id, attempts and history (empty for a run never launched);
    DamagedFile naming it when it cannot be read as such."""
    if not paths.state.exists():
        return {"run": paths.root.name, "stages": {}}
    data = read_json_file(paths.state, "a state record")
    if not isinstance(data.get("stages"), dict):
        raise DamagedFile(paths.state, "not a state record: no 'stages' mapping")
    bad = [k for k, v in data["stages"].items()
           if not isinstance(v, dict) or not isinstance(v.get("history", []), list)]
    if bad:
        raise DamagedFile(paths.state, f"stage {bad[0]!r} is not a state entry")
    return data


def record_state(paths: RunPaths, stage: str, state: str, **fields) -> dict:
    """Set a stage's state (and fields) in state.json, appending the change to its history; locked and atomic,
    because the submitting side and the jobs write the same file. A damaged state.json is moved aside (kept as
    state.json.damaged-<time>, never deleted) and a fresh one started, with a warning naming both."""
    import time

    with file_lock(paths.root / ".state.lock"):
        try:
            data = read_state(paths)
        except DamagedFile as e:
            stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
            aside = paths.state.with_name(f"{paths.state.name}.damaged-{stamp}")
            os.replace(paths.state, aside)
            warn(f"{e}; moved to {aside.name}, starting a fresh state.json (earlier job records are in that file)")
            data = {"run": paths.root.name, "stages": {}}
        entry = data["stages"].setdefault(stage, {"attempts": 0, "history": []})
        entry.update(fields, state=state)
        event = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "state": state}
        if fields.get("job_id"):
            event["job_id"] = fields["job_id"]
        entry["history"].append(event)
        atomic_write_text(paths.state, json.dumps(data, indent=1) + "\n")
    return entry


def checkpoint_steps(paths: RunPaths) -> list[int]:
    """Steps of the complete checkpoints in a run, oldest first (temp files of an interrupted write and damaged
    files set aside as `NNNNNNN.pt.damaged` are ignored, by the `*.pt` pattern)."""
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


class DamagedCheckpoint(ConfigError):
    """A checkpoint (or other torch file of ours) that does not load, lacks what its reader needs, or holds pickled
    objects beyond weights (`refused`); the message is one line naming the file."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


def _legacy_rng_globals() -> list:
    """The only globals a checkpoint may name: numpy's, for the RNG state of checkpoints written before it was
    stored as a tensor (`np.random.get_state()` holds a uint32 ndarray), as numpy 1 and numpy 2 name them."""
    import numpy as np

    reconstruct = np.ndarray.__reduce__(np.zeros(0, np.uint32))[0]  # numpy's own _reconstruct, either version
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            (reconstruct, "numpy.core.multiarray._reconstruct"), (reconstruct, "numpy._core.multiarray._reconstruct")]


def _first_line(e: Exception) -> str:
    text = str(e)
    inner = re.search(r"WeightsUnpickler error: (.+)", text)  # torch wraps the real cause in a page of advice
    line = inner.group(1) if inner else next((ln for ln in text.splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {line.strip()[:160]}" if line.strip() else type(e).__name__


def load_checkpoint(path: Path, need: dict[str, type | tuple[type, ...]], what: str = "checkpoint",
                    optional: dict[str, type | tuple[type, ...]] | None = None, mmap: bool = False) -> dict:
    """Load a torch file of ours with `weights_only=True` (tensors and plain values: a planted pickle cannot run
    code) and check it holds the entries `need` names with their types; DamagedCheckpoint (one line) if not."""
    import pickle

    import torch

    path = Path(path)
    open(path, "rb").close()  # missing or unreadable: the OS's own error, not a verdict on the bytes
    try:
        with torch.serialization.safe_globals(_legacy_rng_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 -- torch.load's failures on damaged bytes are no stable set (the zip
        # reader's OSError EINVAL or RuntimeError, UnpicklingError, EOFError, KeyError, ...): all of them are damage
        unsafe = isinstance(e, pickle.UnpicklingError) and re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if unsafe:
            raise DamagedCheckpoint(f"{path}: refused {what}: it holds a pickled object ({unsafe.group(1)}) beyond "
                                    f"weights and plain values, which could run code on loading",
                                    refused=True) from None
        import zipfile

        why = _first_line(e) if zipfile.is_zipfile(path) else \
            f"{path.stat().st_size} bytes that are no complete torch archive: truncated, zeroed or overwritten"
        raise DamagedCheckpoint(f"{path}: damaged {what}, it does not load ({why})") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"{path}: damaged {what}: holds a {type(state).__name__}, not a dict")
    for key, kind in {**need, **{k: v for k, v in (optional or {}).items() if k in state}}.items():
        if key not in state:
            raise DamagedCheckpoint(f"{path}: damaged {what}: no {key!r} entry")
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            raise DamagedCheckpoint(f"{path}: damaged {what}: {key!r} is a {type(state[key]).__name__}")
    return state


def set_aside(path: Path) -> Path:
    """Rename a damaged file to `<name>.damaged` (`.damaged.2`, ... if taken) beside it: never deleted, since it
    may be the only copy of its step, and out of every `*.pt` listing."""
    path = Path(path)
    target, n = path.with_name(path.name + ".damaged"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged.{n}")
    os.rename(path, target)
    return target


def remove_temp_files(folder: Path) -> list[str]:
    """Remove the hidden temp files (`.<name>.XXXX.tmp`) that `atomic_write` leaves when killed mid-write; returns
    their names. Call it only where no writer can be running (a run's folder, at the start of its training)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if re.fullmatch(r"\..+\.tmp", p.name) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed.append(p.name)
    return removed


def prune_checkpoints(paths: RunPaths, keep: int, keep_steps: tuple[int, ...] = ()) -> None:
    """Delete all but the newest `keep` checkpoints and those at `keep_steps`."""
    for step in checkpoint_steps(paths)[:-keep]:
        if step in keep_steps:
            continue
        with contextlib.suppress(FileNotFoundError):
            paths.checkpoint(step).unlink()


def _step_records(path: Path) -> tuple[list[tuple[str, dict]], list[int]]:
    """The records of a step log (.jsonl: one JSON object with an integer `step` a line), each with its line, and
    the numbers of the lines that are no such record: a torn append, since appends are not atomic."""
    if not path.exists():
        return [], []
    records, torn = [], []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool):
            records.append((line, record))
        else:
            torn.append(n)
    return records, torn


def read_metrics(path: Path) -> list[dict]:
    """train/metrics.jsonl as records ([] before the first logged step); a torn line is skipped with a warning
    naming the file and line, so it never blocks status or report."""
    records, torn = _step_records(path)
    for n in torn:
        warn(f"{path}:{n}: torn record skipped (not a complete JSON line with a step)")
    return [r for _, r in records]


def truncate_jsonl(path: Path, max_step: int) -> int:
    """Drop lines logged after `max_step` (written before a kill, after the checkpoint we resume from) and lines
    that are not a record (a torn append); returns how many of the latter."""
    records, torn = _step_records(path)
    kept = [line for line, r in records if r["step"] <= max_step]
    if torn or len(kept) != len(records):
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))
    return len(torn)


def append_line(path: Path, line: str) -> None:
    """Append one line and flush it to disk (a reader never sees a partial record after a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
