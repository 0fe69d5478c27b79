"""Launch a plan's stages: on SLURM through submitit, as background processes on this machine, or in-process.

    repro submit STUDY.yaml --cluster slurm --profile slurm/profiles/NAME.yaml

One SLURM job per stage of a run; the train stages of runs that ask for the same resources go in one job array;
later stages wait on their parent with `afterok`. The bench stages of a study are one job (`StudyBench`): every
run of the study timed interleaved in one process, so that throughput ratios come from one measurement; when any
run's bench is due, all are timed again. It measures alone: on SLURM on a node of its own (--exclusive), on this
machine once no other stage of the results folder runs here (at most `bench.alone_wait_s`; past it the figures
are marked unreliable) and never beside another bench (<results>/bench/.lock).

Submitting is idempotent: a stage that is done (its files are in the run folder, or for a bench the study's
record), queued or running is never submitted again, and every run is locked while its stages are decided, so
two concurrent submits queue each stage once. `results/runs/<id>/state.json` records, per stage, the
cluster, job id, attempts and every state change; the job itself writes `running`, `done` or `failed`.

Preemption and time limits follow submitit's checkpoint protocol: SLURM sends SIGUSR2 `signal_delay_s` before
the end; the train stage finishes its step, writes a checkpoint (every rank stops at the same step), and submitit
requeues the job, which resumes from that checkpoint bit for bit. Sampling resumes from its shards.

`--cluster local` runs the same stage jobs in one background submitit process per submit, in dependency order
(the study's bench last); `--cluster debug` runs them in this process (tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro import rundir
from repro.config import BenchConfig, EvalConfig, RunConfig, SampleConfig, protocol_id
from repro.errors import ConfigError, did_you_mean
from repro.plan import Plan, Run, Stage, stage_states
from repro.study import MAX_TIME_MIN, parse_time
from repro.yamlio import Where, show_value, check_ranges, check_text, from_dict, read_yaml

CLUSTERS = ("slurm", "local", "debug")
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}
CANCEL_GRACE_S = 10.0  # how long a cancelled local job has to stop by itself before its processes are killed


# ---------------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Profile:
    """What a cluster offers and wants: partition and account, and the most a job may ask of one node.

    cpus_per_task, mem_gb and gpus_per_node cap the study's requests (a study written for 8-GPU nodes still
    plans on a CPU test node); partition, account, qos and constraint fill in what the study leaves unset.
    collective_timeout_s bounds how long a rank waits for a dead or hung peer in a collective before its job fails
    (and `repro submit` resumes it from the last checkpoint); it must exceed a checkpoint write, which the other
    ranks wait out in a barrier. Unset: `repro.distributed.DEFAULT_TIMEOUT_S`.
    """

    cluster: str = "slurm"
    partition: str | None = None
    preempt_partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: int = 60
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    gpus_per_node: int | None = None
    signal_delay_s: int = 120
    max_num_timeout: int = 20
    collective_timeout_s: int | None = None
    setup: tuple[str, ...] = ()
    additional: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.cluster not in CLUSTERS:
            raise ConfigError(f"one of {', '.join(CLUSTERS)}, got {self.cluster!r}", key="cluster")
        for name in ("time_min", "signal_delay_s", "max_num_timeout", "cpus_per_task", "mem_gb", "gpus_per_node"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, name)}", key=name)
        check_ranges(self, time_min=(0, MAX_TIME_MIN), cpus_per_task=(0, 4096), mem_gb=(0, 2**20),
                     gpus_per_node=(0, 64), signal_delay_s=(0, 86400), max_num_timeout=(0, 10**4),
                     collective_timeout_s=(1, 7 * 86400))
        # Everything below lands in the job script. A newline would start a line of its own there (another
        # #SBATCH option, or a command); option names are not quoted by submitit, so they are plain words.
        for name in ("partition", "preempt_partition", "account", "qos", "constraint"):
            check_text(getattr(self, name), name, limit=256)
        for i, line in enumerate(self.setup):
            check_text(line, f"setup.{i}")
        for key, value in self.additional.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,63}", key):
                raise ConfigError(f"not an sbatch option name (letters, digits, '-' and '_'), got {show_value(key)}",
                                  key="additional")
            if value is False:  # submitit would write `--key=False`, which sbatch does not read as "off"
                raise ConfigError("false is no sbatch value: leave the option out to turn it off",
                                  key=f"additional.{key}")
            if isinstance(value, str):
                check_text(value, f"additional.{key}", limit=1024)
            elif isinstance(value, float) and not math.isfinite(value) or not isinstance(value, str | int | float):
                raise ConfigError(f"expected a string, a number or true, got {show_value(value)}",
                                  key=f"additional.{key}")


def load_profile(path: str | Path) -> Profile:
    """Read a cluster profile strictly; ConfigError names file:line: key on any mistake, an empty file included."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such profile")
    data, lines = read_yaml(path)
    if not data:  # read_yaml gives {} for an empty file; a profile with nothing in it is a mistake
        raise ConfigError(f"{path}: the profile is empty (see slurm/profiles/example.yaml)")
    return from_dict(Profile, data, Where(str(path), lines))


# ---------------------------------------------------------------------------------------------- state.json
def read_state(root: Path, run_id: str) -> dict:
    """A run's state.json. The launcher never stops on a damaged one: it answers an empty record with `damaged`
    naming the file (so no stage counts as queued or running), and the next `record` moves the file aside."""
    try:
        return rundir.read_state(rundir.RunPaths(root / "runs" / run_id))
    except rundir.DamagedFile as e:
        return {"run": run_id, "stages": {}, "damaged": str(e)}


def record(root: Path, run_id: str, stage: str, state: str, **fields) -> dict:
    return rundir.record_state(rundir.RunPaths(root / "runs" / run_id), stage, state, **fields)


# ---------------------------------------------------------------------------------------------- the jobs
class _Resubmittable:
    def checkpoint(self, *args, **kwargs):
        """submitit's checkpoint protocol: all state lives in the run folders, so the same job is resubmitted."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


@dataclass
class StageJob(_Resubmittable):
    """One stage of one run (train, sample, evaluate), as submitit pickles it: runs on the compute node, records its
    own state with its host and pid (a local bench waits while such a stage runs). Bench stages are `StudyBench`."""

    root: str
    run_id: str
    stage: str
    config: RunConfig
    sample: SampleConfig | None = None
    evaluation: EvalConfig | None = None
    collective_timeout_s: int | None = None  # the profile's; None: the trainer's default

    def __call__(self) -> str:
        root = Path(self.root)
        job_id, rank = _job_identity()
        if self.collective_timeout_s is not None:
            from repro.distributed import TIMEOUT_ENV

            os.environ[TIMEOUT_ENV] = str(self.collective_timeout_s)
        if rank == 0:
            entry = read_state(root, self.run_id)["stages"].get(self.stage, {})
            record(root, self.run_id, self.stage, "running", job_id=job_id or entry.get("job_id"),
                   attempts=entry.get("attempts", 0) + 1, **_process())
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "WORLD_SIZE" not in os.environ:
            import submitit

            # rendezvous on the job's first node; repro.distributed picks the GPU by the local rank
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        threads = os.environ.get("SLURM_CPUS_PER_TASK")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        try:
            result = self._run(root / "runs" / self.run_id)
        except SystemExit:  # requeued through submitit: not a failure
            raise
        except KeyboardInterrupt:  # a local cancel
            if rank == 0:
                record(root, self.run_id, self.stage, "cancelled")
            raise
        except BaseException as e:
            if rank == 0:
                record(root, self.run_id, self.stage, "failed", error=f"{type(e).__name__}: {e}"[:500])
            raise
        if rank == 0:
            record(root, self.run_id, self.stage, "done")
        return result

    def _run(self, run_dir: Path) -> str:
        if self.stage == "train":
            from repro.train import Interrupted, train

            asked = []
            submitit_handler = signal.getsignal(signal.SIGUSR2)
            if callable(submitit_handler):
                # finish the step and checkpoint first; submitit's own handler then requeues the job
                signal.signal(signal.SIGUSR2, lambda *_: asked.append(True))
            keep = self.evaluation.checkpoints if self.evaluation is not None else ()
            try:
                train(self.config, run_dir, progress=False, stop=lambda: bool(asked), keep_steps=keep)
            except Interrupted as e:
                if _job_identity()[1] == 0:
                    record(Path(self.root), self.run_id, self.stage, "requeued", interrupted_at=e.step)
                if callable(submitit_handler):
                    submitit_handler(signal.SIGUSR2, None)  # checkpoint() + requeue + exit on rank 0
                raise _Requeue() from e
            return "trained"
        if self.stage.startswith("sample:"):
            from repro.sample import sample

            assert self.sample is not None
            out = sample(run_dir, dataclasses.asdict(self.sample), progress=False)
            for step in self.evaluation.checkpoints if self.evaluation is not None else ():
                sample(run_dir, dataclasses.asdict(self.sample), progress=False, step=step)
            return str(out)
        if self.stage.startswith("evaluate:"):
            from repro.evaluate import evaluate_run

            assert self.sample is not None and self.evaluation is not None
            paths = evaluate_run(run_dir, self.sample, self.evaluation, Path(self.root) / ".cache")
            return ", ".join(str(p) for p in paths)
        raise ValueError(f"stage {self.stage} has no runner")

class _Requeue(SystemExit):
    """Raised on ranks that stop for a requeue; rank 0 has already exited through submitit."""

    def __init__(self):
        super().__init__(0)


@dataclass
class StudyBench(_Resubmittable):
    """A study's bench stages as one job: every run with a bench stage timed interleaved in this process
    (`repro.evaluate.bench_study`), so ratios never compare figures of two jobs. It records its state in each
    member run's state.json, stage `bench`, under one job id.

    Alone: on this machine (clusters local and debug) it first takes <results>/bench/.lock, so two studies never
    bench at once, then waits until no other stage of the results folder runs on this host; on SLURM the job has
    its node to itself (--exclusive).
    """

    root: str
    study: str
    cluster: str
    runs: list[Run]
    bench: BenchConfig

    def __call__(self) -> str:
        root = Path(self.root)
        job_id, _ = _job_identity()
        for r in self.runs:
            entry = read_state(root, r.id)["stages"].get("bench", {})
            job_id = job_id or entry.get("job_id")  # the debug executor's id, as submit recorded it
            record(root, r.id, "bench", "running", job_id=job_id, attempts=entry.get("attempts", 0) + 1,
                   study=self.study, **_process())
        threads = os.environ.get("SLURM_CPUS_PER_TASK")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        try:
            path = self._run(root, job_id)
        except SystemExit:  # requeued through submitit: not a failure
            raise
        except KeyboardInterrupt:
            for r in self.runs:
                record(root, r.id, "bench", "cancelled")
            raise
        except BaseException as e:
            for r in self.runs:
                record(root, r.id, "bench", "failed", error=f"{type(e).__name__}: {e}"[:500])
            raise
        for r in self.runs:
            record(root, r.id, "bench", "done")
        return str(path)

    def _run(self, root: Path, job_id: str | None) -> Path:
        from repro.evaluate import bench_study

        if self.cluster == "slurm":  # the node is the job's own (--exclusive): nothing to wait for
            alone = {"checked": False, "why": "SLURM job with --exclusive: a node of its own"}
            return bench_study(root, self.study, self.runs, self.bench, alone, job_id)
        with rundir.file_lock(root / "bench" / ".lock"):
            alone = wait_alone(root, self.bench.alone_wait_s)
            return bench_study(root, self.study, self.runs, self.bench, alone, job_id)


ALONE_POLL_S = 5.0


def _process() -> dict:
    """Where a job runs, for state.json: host, pid and the pid's start time (a reused pid is another process)."""
    return {"host": os.uname().nodename, "pid": os.getpid(), "pid_start": _pid_start(os.getpid())}


def _pid_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); None if it is gone or a
    zombie, or where /proc is missing."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _entry_alive(entry: dict) -> bool:
    """Whether the process that recorded a `running` state.json entry on this host still runs."""
    pid = entry.get("pid")
    if pid:
        if int(pid) == os.getpid():
            return False
        start = _pid_start(int(pid))
        return start is not None and entry.get("pid_start") in (None, start)
    # entries written before pids were recorded: a local job is alive while its controller is, unless that
    # controller is ours (a stage of our own chain, which has ended since the chain runs one stage at a time)
    job_id = entry.get("job_id")
    if entry.get("cluster") == "local" and job_id and str(job_id) != str(os.getppid()):
        return _local_alive(str(job_id))
    return False


def running_here(root: Path) -> list[str]:
    """The stages of this results folder, other than benches, that run on this host now (`run stage (pid N)`) or
    wait in a live local chain (`run stage (queued in local job N)`): between two stages of another chain the
    machine is idle for an instant, not free."""
    host, out = os.uname().nodename, []
    mine = str(os.getppid())  # our own chain's controller, when the bench runs in a local chain
    for path in sorted((root / "runs").glob("*/state.json")):
        try:
            stages = json.loads(path.read_text()).get("stages", {})
        except (OSError, ValueError):
            continue
        for name, e in stages.items():
            if name == "bench":
                continue
            if e.get("state") == "running" and e.get("host") == host and _entry_alive(e):
                out.append(f"{path.parent.name} {name} (pid {e.get('pid') or e.get('job_id')})")
            elif (e.get("state") == "submitted" and e.get("cluster") == "local" and e.get("job_id")
                  and str(e["job_id"]) != mine and _local_alive(str(e["job_id"]))):
                out.append(f"{path.parent.name} {name} (queued in local job {e['job_id']})")
    return out


def wait_alone(root: Path, limit_s: float, poll_s: float = ALONE_POLL_S) -> dict:
    """Wait until no other stage of the results folder runs on this host, at most `limit_s`; returns whether it is
    alone, how long it waited and what still ran (then the measurement is recorded as not alone)."""
    started = time.monotonic()
    busy = running_here(root)
    while busy and time.monotonic() - started < limit_s:
        time.sleep(max(0.0, min(poll_s, limit_s - (time.monotonic() - started))))
        busy = running_here(root)
    return {"checked": True, "alone": not busy, "waited_s": round(time.monotonic() - started, 1),
            "limit_s": limit_s, "busy": busy}


@dataclass
class Chain(_Resubmittable):
    """Stage jobs run one after another in one process (`--cluster local`); a failed stage stops its run's chain.
    The study's bench, when there, comes last: it needs no other stage, but it must time alone."""

    jobs: list[StageJob | StudyBench]

    def __call__(self) -> dict:
        failed: set[str] = set()
        out = {}
        for job in self.jobs:
            if isinstance(job, StudyBench):
                try:
                    out[f"{job.study}/bench"] = job()
                except Exception:
                    failed.add(f"the bench of {job.study}")
                continue
            if job.run_id in failed:  # not a failure of its own: the next submit takes it up again
                record(Path(job.root), job.run_id, job.stage, "skipped", error="an earlier stage of the run failed")
                continue
            try:
                out[f"{job.run_id}/{job.stage}"] = job()
            except Exception:
                failed.add(job.run_id)
        if failed:
            raise RuntimeError(f"stages failed in runs {', '.join(sorted(failed))}; see their state.json")
        return out

def _job_identity() -> tuple[str | None, int]:
    try:
        import submitit

        env = submitit.JobEnvironment()
        return str(env.job_id), env.global_rank
    except RuntimeError:  # not inside a submitit job (debug executor runs in-process)
        return None, int(os.environ.get("RANK", 0))


# ---------------------------------------------------------------------------------------------- scheduler
LIVE = ("submitted", "running", "requeued")   # state.json states in which a job may still be in the scheduler


def _live_jobs(states: dict[str, dict], default_cluster: str, tolerant: bool = False) -> dict[str, str]:
    """Job id -> scheduler state for every live job of these state.json files, each asked of its own cluster.
    `tolerant`: where the scheduler cannot be reached, answer from state.json alone (status), instead of failing
    (submit, which must not resubmit what may still be queued)."""
    by_cluster: dict[str, list[str]] = {}
    for st in states.values():
        for e in st["stages"].values():
            if e.get("state") in LIVE and e.get("job_id"):
                by_cluster.setdefault(e.get("cluster") or default_cluster, []).append(e["job_id"])
    out: dict[str, str] = {}
    for cluster, ids in by_cluster.items():
        try:
            out.update(scheduler_states(ids, cluster))
        except (ConfigError, OSError, subprocess.SubprocessError):
            if not tolerant:
                raise
    return out


def scheduler_states(job_ids: list[str], cluster: str) -> dict[str, str]:
    """Job id -> scheduler state (SLURM names), for the ids the scheduler still knows."""
    ids = sorted({j for j in job_ids if j})
    if not ids:
        return {}
    if cluster == "local":
        return {j: ("RUNNING" if _local_alive(j) else "GONE") for j in ids}
    if cluster != "slurm":
        return {}
    out: dict[str, str] = {}
    if shutil.which("squeue") is None or shutil.which("sacct") is None:
        raise ConfigError("cannot ask SLURM about jobs submitted earlier: squeue/sacct not found on PATH "
                          "(run this where the cluster's commands are)")
    q = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=60)
    for line in q.stdout.splitlines():
        jid, _, st = line.partition("|")
        if jid in ids:
            out[jid] = st.strip()
    rest = [j for j in ids if j not in out]
    if rest:
        a = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(rest)],
                           capture_output=True, text=True, timeout=60)
        for line in a.stdout.splitlines():
            jid, _, st = line.partition("|")
            if jid in rest:
                out[jid] = st.split()[0] if st.strip() else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
    return out


def _proc_identity(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, None if it is gone or a zombie: the start time tells a pid
    from a later process that reuses it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return None if fields[0] == "Z" else (int(fields[1]), fields[19])


def _descendants(pid: int) -> dict[int, str]:
    """Every live process below `pid`, with its start time."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (ident := _proc_identity(int(entry.name))):
            children.setdefault(ident[0], []).append(int(entry.name))
            starts[int(entry.name)] = ident[1]
    out, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out[p] = starts[p]
        todo += children.get(p, [])
    return out


def stop_local(pid: int, grace_s: float = CANCEL_GRACE_S) -> list[int]:
    """Stop a local job and everything it started; returns the pids that had to be killed.

    SIGINT first: submitit's controller then interrupts its tasks and SIGKILLs them a second later. That is not
    enough alone: a task installs submitit's handler that ignores SIGTERM (SLURM's warning before a kill), and a
    SIGINT that lands while the controller is starting a task leaves that task unknown to it, training on as an
    orphan, and a controller started from a shell's background job inherits SIGINT ignored and never stops. So
    the whole tree, gathered while the controller lives, is SIGKILLed after `grace_s`."""
    ident = _proc_identity(pid)
    if ident is None:
        return []
    tree = {pid: ident[1], **_descendants(pid)}

    def alive() -> dict[int, str]:
        return {p: t for p, t in tree.items() if (i := _proc_identity(p)) and i[1] == t}

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + grace_s
    while alive() and time.monotonic() < deadline:
        if pid in alive():
            tree.update(_descendants(pid))
        time.sleep(0.05)
    if pid in alive():
        tree.update(_descendants(pid))
    killed = []
    for p in alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
            killed.append(p)
    return killed


def _local_alive(job_id: str) -> bool:
    """A local job id is the pid of submitit's controller: alive only if that pid still runs the controller."""
    try:
        cmdline = Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"submitit.local._local" in cmdline


# ---------------------------------------------------------------------------------------------- submit
@dataclass
class Decision:
    run: Run
    stage: Stage
    action: str          # submit | done | active | failed | blocked
    detail: str = ""
    job_id: str | None = None
    damaged: str | None = None   # a damaged file of the run behind this decision, named (shown by submit)


def _requests(stage: Stage, run: Run, plan: Plan, profile: Profile) -> dict:
    """submitit parameters for one stage: the study's resources within the profile's caps."""
    r = plan.study.study.resources

    def cap(asked: int, limit: int | None) -> int:
        return asked if limit is None else min(asked, limit)

    gpus = cap(stage.gpus, profile.gpus_per_node)
    params = {
        "timeout_min": parse_time(r.time) if r.time else profile.time_min,
        "nodes": stage.nodes,
        # one task per GPU (torch.distributed from the SLURM variables); CPU nodes: as the study asks, else one
        "tasks_per_node": (r.tasks_per_node if r.tasks_per_node and stage.name.split(":")[0] in ("train", "sample")
                           else max(1, gpus)),
        "cpus_per_task": cap(r.cpus_per_task, profile.cpus_per_task),
        "mem_gb": cap(r.mem_gb, profile.mem_gb),
        "slurm_signal_delay_s": profile.signal_delay_s,
    }
    if gpus:
        params["gpus_per_node"] = gpus
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(r, key) or getattr(profile, key)
        if value:
            params[f"slurm_{key}"] = value
    if profile.setup:
        params["slurm_setup"] = list(profile.setup)
    # a task that dies ends its whole step at once: its peers would otherwise wait in a collective for the timeout
    params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
    return params


def select(plan: Plan, only: tuple[str, ...] = ()) -> list[Run]:
    """The runs of the steps named by --only (all without it); an unknown step is a one-line error."""
    steps = {r.step for r in plan.runs}
    for name in only:
        if name not in steps:
            raise ConfigError(f"--only {name}: no such step in {plan.study.path}{did_you_mean(name, steps)}; "
                              f"steps: {', '.join(dict.fromkeys(r.step for r in plan.runs))}")
    return [r for r in plan.runs if not only or r.step in only]


def decide(plan: Plan, root: Path, cluster: str, retry_failed: bool = False,
           only: tuple[str, ...] = ()) -> list[Decision]:
    """What to do with each stage of the selected runs, from the run folders, state.json and the scheduler. A
    stage whose output file is damaged is not done (it is submitted again); a damaged state.json counts as no job
    record (its stages are submitted unless done) and is moved aside when the new jobs are recorded."""
    from repro.results import damaged_outputs

    runs = select(plan, only)
    states = {r.id: read_state(root, r.id) for r in runs}
    sched = _live_jobs(states, cluster)
    out: list[Decision] = []
    for run in runs:
        disk = stage_states(run, root)
        broken = {name: str(e) for name, e in damaged_outputs(run, root).items()}
        mine: dict[str, Decision] = {}
        for stage in run.stages:
            entry = states[run.id]["stages"].get(stage.name, {})
            if stage.name == "bench" and entry.get("study") not in (None, run.study):
                entry = {}  # a shared run last timed by another study's bench: that job is not this study's
            jid = entry.get("job_id")
            damaged = broken.get(stage.name) or states[run.id].get("damaged")
            if disk[stage.name]["state"] == "done" and stage.name not in broken:
                d = Decision(run, stage, "done", job_id=jid)
            elif entry.get("state") in LIVE and sched.get(jid) in ACTIVE:
                d = Decision(run, stage, "active", sched[jid].lower(), job_id=jid)
            elif entry.get("state") in (*LIVE, "failed", "cancelled") and not retry_failed:
                why = entry.get("error") or sched.get(jid, "").lower() or entry.get("state")
                d = Decision(run, stage, "failed", f"{why} (--retry-failed resubmits)", job_id=jid)
            else:
                d = Decision(run, stage, "submit", damaged=damaged)
            parents = [mine[p] for p in stage.after if p in mine]
            if d.action == "submit" and any(p.action in ("failed", "blocked") for p in parents):
                d = Decision(run, stage, "blocked", "waits on a stage that cannot run")
            mine[stage.name] = d
            out.append(d)
    return _one_bench(out)


def _one_bench(decisions: list[Decision]) -> list[Decision]:
    """The bench stages of a study are one job: when one is due, every bench is timed again with it; while the
    study's bench job is queued or running, or after it failed (without --retry-failed), the due ones wait."""
    bench = [d for d in decisions if d.stage.name == "bench"]
    if not any(d.action == "submit" for d in bench):
        return decisions
    active = next((d for d in bench if d.action == "active"), None)
    failed = next((d for d in bench if d.action == "failed"), None)
    out = []
    for d in decisions:
        if d.stage.name == "bench" and active is not None and d.action == "submit":
            d = Decision(d.run, d.stage, "blocked", f"the study's bench job {active.job_id} is {active.detail}; its "
                         f"runs are timed together, so submit again when it ends")
        elif d.stage.name == "bench" and active is None and failed is not None and d.action == "submit":
            d = Decision(d.run, d.stage, "blocked", f"the study's bench job failed: {failed.detail}")
        elif d.stage.name == "bench" and active is None and failed is None and d.action == "done":
            d = Decision(d.run, d.stage, "submit", "timed again beside the study's other runs", job_id=d.job_id)
        out.append(d)
    return out


@dataclass
class Submission:
    decisions: list[Decision]
    jobs: list[dict]          # {"run", "stage", "job_id", "sbatch"?}


def submit(plan: Plan, root: Path, cluster: str, profile: Profile | None = None, dry_run: bool = False,
           retry_failed: bool = False, only: tuple[str, ...] = ()) -> Submission:
    """Queue every stage that is neither done nor queued; returns at once (debug runs in-process)."""
    if cluster not in CLUSTERS:
        raise ConfigError(f"--cluster: one of {', '.join(CLUSTERS)}, got {cluster!r}")
    profile = profile or Profile(cluster=cluster)
    if cluster == "slurm" and not dry_run and shutil.which("sbatch") is None:
        raise ConfigError("--cluster slurm: sbatch not found on PATH (submit from a login node of the cluster, "
                          "or use --cluster local)")
    selected = select(plan, only)
    run_ids = {r.id for r in selected}
    if any(s.name == "bench" for r in selected for s in r.stages):
        run_ids |= {r.id for r in _bench_runs(plan)}  # the study's bench job records its state in all of them
    run_ids = sorted(run_ids)
    with contextlib.ExitStack() as locks:
        if not dry_run:
            for rid in run_ids:  # sorted: two submits never wait on each other's locks in a cycle
                locks.enter_context(rundir.file_lock(root / "runs" / rid / ".submit.lock"))
        decisions = decide(plan, root, cluster, retry_failed, only)
        todo = [d for d in decisions if d.action == "submit"]
        if dry_run or not todo:
            jobs = _dry_run(todo, plan, root, profile) if dry_run else []
            return Submission(decisions, jobs)
        if cluster == "slurm":
            jobs = _submit_slurm(todo, decisions, plan, root, profile)
        elif cluster == "local":
            jobs = _submit_local(todo, plan, root)
        else:
            jobs = _submit_debug(todo, plan, root)
    return Submission(decisions, jobs)


def _bench_runs(plan: Plan) -> list[Run]:
    return [r for r in plan.runs if any(s.name == "bench" for s in r.stages)]


def _study_bench(plan: Plan, root: Path, cluster: str) -> StudyBench:
    """The study's bench job: every run with a bench stage, whichever runs --only selected."""
    study = plan.study.study
    return StudyBench(str(root), study.study, cluster, _bench_runs(plan), study.bench)


def _split(todo: list[Decision]) -> tuple[list[Decision], list[Decision]]:
    """(stage decisions, bench decisions): the bench ones become one job."""
    return [d for d in todo if d.stage.name != "bench"], [d for d in todo if d.stage.name == "bench"]


def _bench_requests(bench: list[Decision], plan: Plan, profile: Profile) -> dict:
    params = _requests(bench[0].stage, bench[0].run, plan, profile)
    params["slurm_exclusive"] = True  # the node to itself: nothing else runs beside the timing
    return params


def _recorded_bench(root: Path, job: StudyBench, job_id: str | None, cluster: str, sbatch: str | None = None) -> dict:
    """Record the study's bench job as submitted in every member run; one entry of Submission.jobs."""
    for r in job.runs:
        if job_id is not None:
            entry = read_state(root, r.id)["stages"].get("bench", {})
            record(root, r.id, "bench", "submitted", job_id=job_id, cluster=cluster, study=job.study,
                   attempts=entry.get("attempts", 0), error=None)
    out = {"run": ",".join(r.id for r in job.runs), "step": f"all {len(job.runs)} runs", "stage": "bench",
           "job_id": job_id, "runs": [r.id for r in job.runs]}
    if sbatch is not None:
        out["sbatch"] = sbatch
    return out


def _job(d: Decision, plan: Plan, root: Path, collective_timeout_s: int | None = None) -> StageJob:
    sample = None
    if d.stage.name.startswith(("sample:", "evaluate:")):
        pid = d.stage.name.split(":", 1)[1]
        sample = next(s for s in plan.study.samples if protocol_id(s) == pid)
    study = plan.study.study
    return StageJob(str(root), d.run.id, d.stage.name, d.run.config, sample, study.evaluate, collective_timeout_s)


def _executor(cluster: str, folder: Path, name: str, params: dict, profile: Profile):
    import submitit

    # cluster given explicitly: with sbatch on PATH, auto-detection would pick slurm
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=profile.max_num_timeout)
    if cluster == "slurm":
        extra = dict(profile.additional)
        if "dependency" in params:
            extra["dependency"] = params.pop("dependency")
            # a failed parent cancels the child instead of leaving it pending forever, so --retry-failed redoes both
            extra["kill_on_invalid_dep"] = "yes"
        ex.update_parameters(name=name, slurm_additional_parameters=extra, **params)
    else:
        ex.update_parameters(name=name, timeout_min=params.get("timeout_min", 60))
    return ex


def _job_name(plan: Plan, d: Decision) -> str:
    return f"repro-{plan.study.study.study}-{d.run.step}-{d.stage.name.split(':')[0]}"


def _submit_slurm(todo: list[Decision], decisions: list[Decision], plan: Plan, root: Path,
                  profile: Profile) -> list[dict]:
    folder = root / "jobs" / "%j"
    ids = {(d.run.id, d.stage.name): d.job_id for d in decisions if d.action in ("active", "done")}
    jobs: list[dict] = []
    todo, bench = _split(todo)
    # train stages with equal requests go into one array; everything else waits on its parent
    first = [d for d in todo if not d.stage.after]
    later = [d for d in todo if d.stage.after]
    groups: dict[str, list[Decision]] = {}
    for d in first:
        groups.setdefault(json.dumps(_requests(d.stage, d.run, plan, profile), sort_keys=True), []).append(d)
    for key, group in groups.items():
        ex = _executor("slurm", folder, f"repro-{plan.study.study.study}-{group[0].stage.name}", json.loads(key),
                       profile)
        with ex.batch():
            submitted = [(d, ex.submit(_job(d, plan, root, profile.collective_timeout_s))) for d in group]
        for d, job in submitted:
            jobs.append(_recorded(root, d, job.job_id, "slurm"))
            ids[(d.run.id, d.stage.name)] = job.job_id
    for d in later:
        params = _requests(d.stage, d.run, plan, profile)
        waits = [ids[(d.run.id, p)] for p in d.stage.after if ids.get((d.run.id, p))]
        pending = [j for j, dd in zip(waits, d.stage.after, strict=False)
                   if not any(x.run.id == d.run.id and x.stage.name == dd and x.action == "done" for x in decisions)]
        if pending:
            params["dependency"] = "afterok:" + ":".join(pending)
        ex = _executor("slurm", folder, _job_name(plan, d), params, profile)
        job = ex.submit(_job(d, plan, root, profile.collective_timeout_s))
        jobs.append(_recorded(root, d, job.job_id, "slurm"))
        ids[(d.run.id, d.stage.name)] = job.job_id
    if bench:  # needs no other stage: queued at once
        study = _study_bench(plan, root, "slurm")
        ex = _executor("slurm", folder, f"repro-{study.study}-bench", _bench_requests(bench, plan, profile), profile)
        job = ex.submit(study)
        jobs.append(_recorded_bench(root, study, job.job_id, "slurm"))
    return jobs


def _recorded(root: Path, d: Decision, job_id: str, cluster: str) -> dict:
    entry = read_state(root, d.run.id)["stages"].get(d.stage.name, {})
    record(root, d.run.id, d.stage.name, "submitted", job_id=job_id, cluster=cluster,
           attempts=entry.get("attempts", 0), error=None)
    return {"run": d.run.id, "step": d.run.step, "stage": d.stage.name, "job_id": job_id}


def _chain(todo: list[Decision], plan: Plan, root: Path, cluster: str) -> tuple[Chain, StudyBench | None]:
    """The stage jobs in dependency order, then the study's bench (it must time alone, so it goes last)."""
    todo, bench = _split(todo)
    study = _study_bench(plan, root, cluster) if bench else None
    return Chain([_job(d, plan, root) for d in todo] + ([study] if study else [])), study


def _submit_local(todo: list[Decision], plan: Plan, root: Path) -> list[dict]:
    ex = _executor("local", root / "jobs" / "%j", f"repro-{plan.study.study.study}", {"timeout_min": 60 * 24 * 365},
                   Profile(cluster="local"))
    chain, study = _chain(todo, plan, root, "local")
    with _detached_stdio():
        job = ex.submit(chain)
    out = [_recorded(root, d, job.job_id, "local") for d in _split(todo)[0]]
    return out + ([_recorded_bench(root, study, job.job_id, "local")] if study else [])


@contextlib.contextmanager
def _detached_stdio():
    """submitit's local controller inherits stdout and stderr: detached, `repro submit | tee` or a caller reading
    our output returns when we do, not when the background jobs end (their logs are in results/jobs/<pid>/)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _submit_debug(todo: list[Decision], plan: Plan, root: Path) -> list[dict]:
    ex = _executor("debug", root / "jobs" / "debug", f"repro-{plan.study.study.study}", {}, Profile(cluster="debug"))
    chain, study = _chain(todo, plan, root, "debug")
    job = ex.submit(chain)
    out = [_recorded(root, d, job.job_id, "debug") for d in _split(todo)[0]]
    out += [_recorded_bench(root, study, job.job_id, "debug")] if study else []
    with contextlib.suppress(Exception):  # each stage has recorded its own failure in state.json
        job.result()
    return out


def _dry_run(todo: list[Decision], plan: Plan, root: Path, profile: Profile) -> list[dict]:
    out = []
    todo, bench = _split(todo)
    for d in todo:
        params = _requests(d.stage, d.run, plan, profile)
        if d.stage.after:
            params["dependency"] = "afterok:<" + ",".join(d.stage.after) + ">"
        out.append({"run": d.run.id, "step": d.run.step, "stage": d.stage.name, "job_id": None,
                    "sbatch": sbatch_text(root / "jobs" / "%j", _job_name(plan, d), params, profile)})
    if bench:
        study = _study_bench(plan, root, "slurm")
        text = sbatch_text(root / "jobs" / "%j", f"repro-{study.study}-bench", _bench_requests(bench, plan, profile),
                           profile)
        out.append(_recorded_bench(root, study, None, "slurm", sbatch=text))
    return out


def sbatch_text(folder: Path, name: str, params: dict, profile: Profile) -> str:
    """The sbatch script submitit would write for these parameters (shown by --dry-run); needs no SLURM command on
    PATH, so a study is previewed on a laptop."""
    from unittest import mock

    from submitit.slurm.slurm import SlurmExecutor

    # submitit refuses to build a SlurmExecutor where `srun` is missing (its affinity check), though writing the
    # script runs no SLURM command; building it with the check answered keeps the text exactly what submit sends
    with mock.patch.object(SlurmExecutor, "affinity", classmethod(lambda cls: 2)):
        ex = _executor("slurm", folder, name, dict(params), profile)
    slurm_ex = ex._executor
    assert isinstance(slurm_ex, SlurmExecutor)
    return slurm_ex._make_submission_file_text(slurm_ex._submitit_command_str, "dryrun")


# ---------------------------------------------------------------------------------------------- cancel / status
def cancel(plan: Plan, root: Path, only: tuple[str, ...] = ()) -> list[dict]:
    """Cancel the queued and running stages of the selected runs; returns what was cancelled."""
    out = []
    for run in select(plan, only):
        for name, entry in read_state(root, run.id)["stages"].items():
            if entry.get("state") not in LIVE or not entry.get("job_id"):
                continue
            jid, cluster = entry["job_id"], entry.get("cluster")
            if cluster == "slurm":
                subprocess.run(["scancel", jid], capture_output=True, timeout=60)
            elif cluster == "local" and _local_alive(jid):
                stop_local(int(jid))
            record(root, run.id, name, "cancelled", job_id=jid)
            out.append({"run": run.id, "step": run.step, "stage": name, "job_id": jid})
    return out


def job_view(plan: Plan, root: Path) -> dict[str, dict[str, dict]]:
    """Per run id and stage: the state.json entry merged with the scheduler's current state."""
    full = {r.id: read_state(root, r.id) for r in plan.runs}
    sched = _live_jobs(full, "slurm", tolerant=True)
    states = {rid: st["stages"] for rid, st in full.items()}
    out: dict[str, dict[str, dict]] = {}
    for rid, stages in states.items():
        out[rid] = {}
        if full[rid].get("damaged"):  # which jobs ran is unknown: every stage says so, naming the file
            run = next(r for r in plan.runs if r.id == rid)
            out[rid] = {s.name: {"job": "damaged", "job_id": None, "cluster": None, "attempts": 0,
                                 "damaged": full[rid]["damaged"]} for s in run.stages}
            continue
        for name, e in stages.items():
            view = {"job": e.get("state"), "job_id": e.get("job_id"), "cluster": e.get("cluster"),
                    "attempts": e.get("attempts", 0)}
            if e.get("job_id") in sched:
                view["scheduler"] = sched[e["job_id"]]
            out[rid][name] = view
    return out


__all__ = ["CLUSTERS", "Chain", "Decision", "Profile", "StageJob", "StudyBench", "Submission", "cancel", "decide",
           "job_view", "load_profile", "parse_time", "read_state", "record", "running_here", "sbatch_text",
           "scheduler_states", "stop_local", "submit", "wait_alone"]
