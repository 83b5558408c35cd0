"""`competition run`: an experiment as a graph of jobs, run one after another or as Ray tasks.

The jobs are the commands a user runs by hand (`folds`, `pretrain`, `train --fold k`, `zoo --model m
--fold k`, `infer`, `leaderboard`), and they talk only through the files each writes, so running them
in another order, on another core or on another machine changes no result. What the executor adds:
the order (a job starts when the jobs it reads from have finished), retries (a failed or killed job
runs again and resumes from its last.pt, because every stage resumes), one line per finished job,
and a record of every job's time and peak memory in `<paths.work>/<experiment>/_run/jobs.csv` with
its timeline plot.

A job runs in a forked child of a process that has already imported torch and the stages: the child
pays no import (seconds per job on a CPU), and `os.wait4` gives its own peak memory. Under Ray each
task forks from its worker; its torch threads are the task's `num_cpus`, never more, because two
2-thread torch processes on 2 cores run many times slower than one.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from competition.artifacts import write_csv, write_json, write_yaml
from competition.config import Config

RUN_DIR = "_run"  # under <paths.work>/<experiment>/; model folders never start with "_"
JOB_COLUMNS = ["job", "stage", "model", "fold", "status", "attempts", "seconds", "peak_rss_mb", "returncode",
               "worker", "started", "finished", "command"]
INTERRUPTED = 130  # the CLI's exit status after Ctrl-C: never retried
USER_ERROR = 2  # the CLI's exit status after a user-facing error (config, data, a missing input): it would recur


@dataclass(frozen=True)
class Job:
    """One command of the pipeline and the jobs whose files it reads."""
    name: str
    stage: str
    argv: tuple[str, ...]  # after `python -m competition`
    after: tuple[str, ...] = ()
    model: str = ""
    fold: int | None = None

    def command(self) -> str:
        return " ".join(["python -m competition", *self.argv])


@dataclass
class JobResult:
    job: Job
    status: str  # ok | failed | skipped
    attempts: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = float("nan")
    returncode: int | None = None
    worker: str = ""
    started: float = float("nan")  # unix time
    finished: float = float("nan")
    log: str = ""

    def row(self) -> dict[str, Any]:
        return {"job": self.job.name, "stage": self.job.stage, "model": self.job.model,
                "fold": self.job.fold, "status": self.status, "attempts": self.attempts,
                "seconds": round(self.seconds, 2), "peak_rss_mb": round(self.peak_rss_mb, 1),
                "returncode": self.returncode, "worker": self.worker, "started": self.started,
                "finished": self.finished, "command": self.job.command()}


# ---------------------------------------------------------------- the graph

def pretrain_backbones(cfg: Config) -> list[str]:
    """Backbones whose self-supervised weights (`ssl`) the classifier or a zoo model reads."""
    from competition.artifacts import pretrain_dir
    from competition.zoo.api import SSL_WEIGHTS, BackboneParams, build_params
    from competition.zoo.registry import config_params, get_entry

    needed = []
    if cfg.model.pretrained and Path(str(cfg.model.pretrained)) == pretrain_dir(cfg.paths.work):
        needed.append(cfg.model.name)
    for name in cfg.zoo.models:
        entry = get_entry(name, "zoo.models")
        params = build_params(entry.model_class.params_class, {**entry.params, **config_params(cfg, name)}, name)
        if isinstance(params, BackboneParams) and params.backbone_weights == SSL_WEIGHTS:
            needed.append(params.backbone)
    return list(dict.fromkeys(needed))


def build_jobs(cfg: Config, config_args: Sequence[str]) -> list[Job]:
    """The experiment's jobs in the order they are started when ready: the longest kinds first
    (pretraining, the classifier's folds), then the zoo model by model, fold by fold, so the first fold
    of a feature model fills the on-disk feature cache that its other folds and models read."""
    args = tuple(config_args)
    folds = list(range(cfg.folds.n_splits))
    jobs = [Job("folds", "folds", ("folds", *args))]
    pretrain = []
    for backbone in pretrain_backbones(cfg):
        job = Job(f"pretrain-{backbone}", "pretrain", ("pretrain", *args, "--set", f"pretrain.backbone={backbone}"),
                  after=("folds",), model=backbone)
        jobs.append(job)
        pretrain.append(job.name)
    ready = ("folds", *pretrain)
    if cfg.pseudo.enabled:  # a second round: its models train on the pseudo-labels this job picks
        jobs.append(Job("pseudo", "pseudo", ("pseudo", *args), after=("folds",)))
        ready = (*ready, "pseudo")
    models = []
    for k in folds:
        job = Job(f"train-{cfg.model.name}-fold{k}", "train", ("train", "--fold", str(k), *args), ready,
                  cfg.model.name, k)
        jobs.append(job)
        models.append(job.name)
    for name in cfg.zoo.models:
        first = f"zoo-{name}-fold{folds[0]}"
        for k in folds:
            after = ready if k == folds[0] else (*ready, first)
            job = Job(f"zoo-{name}-fold{k}", "zoo", ("zoo", "--model", name, "--fold", str(k), *args), after, name, k)
            jobs.append(job)
            models.append(job.name)
    jobs.append(Job("infer", "infer", ("infer", *args), tuple(models)))
    jobs.append(Job("leaderboard", "leaderboard", ("leaderboard", *args), ("infer",)))
    return jobs


# ---------------------------------------------------------------- one job

def preload() -> None:
    """Import what every job needs once, in the process that forks the jobs."""
    import competition.classifier.train  # noqa: F401
    import competition.commands  # noqa: F401
    import competition.ensemble.infer  # noqa: F401
    import competition.leaderboard  # noqa: F401
    import competition.pretrain  # noqa: F401
    import competition.pseudo  # noqa: F401
    import competition.zoo.runner  # noqa: F401


def _die_with_parent() -> None:
    """Linux: the child is killed when the process that forked it dies (a stopped Ray worker, a killed run)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def thread_settings(job: Job, threads: int | None) -> tuple[list[str], dict[str, str]]:
    """The job's argv and environment for `threads` CPU threads (None: as configured, train.threads)."""
    if threads is None:
        return list(job.argv), {}
    env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return [*job.argv, "--set", f"train.threads={threads}"], env


def may_use_cuda(device: str) -> bool:
    """Whether a job on this machine may initialise CUDA; asked without initialising it (a CUDA context does
    not survive a fork, so such jobs start as fresh processes)."""
    return device != "cpu" and (Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None)


def _forked_job(job: Job, cwd: str, threads: int | None, log: str | None) -> int:
    """In the forked child: the CLI on the job's argv, output to `log` when given; returns its exit status."""
    _die_with_parent()
    os.chdir(cwd)
    if log:
        out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        # the streams on descriptors 1 and 2, whatever the parent had put in their place (pytest's capture)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the child
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        print(f"# job pid {os.getpid()}", flush=True)
    argv, env = thread_settings(job, threads)
    os.environ.update(env)
    if threads is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)  # numpy's BLAS pool exists already; torch's threads follow train.threads
    from competition.commands import main

    return main(argv)


def _fork(job: Job, cwd: str, threads: int | None, log: str | None) -> int:
    pid = os.fork()
    if pid == 0:  # the child never returns into the caller's code
        code = 1
        try:
            code = _forked_job(job, cwd, threads, log)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - anything left is a crash: show it, exit non-zero
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _spawn(job: Job, cwd: str, threads: int | None, log: str | None) -> int:
    """The job as a fresh `python -m competition` process (it imports everything itself)."""
    argv, env = thread_settings(job, threads)
    out = open(log, "a") if log else None  # noqa: SIM115 - closed below, once the child holds it
    try:
        process = subprocess.Popen([sys.executable, "-m", "competition", *argv], cwd=cwd, env={**os.environ, **env},
                                   stdout=out, stderr=subprocess.STDOUT if out else None,
                                   preexec_fn=_die_with_parent)  # noqa: PLW1509 - prctl only, before exec
        if out:
            out.write(f"# job pid {process.pid}\n")
    finally:
        if out:
            out.close()
    return process.pid


def run_once(job: Job, cwd: str, threads: int | None, log: str | None, fresh: bool = False) -> tuple[int, float]:
    """Run `job` once in a child (forked, or a fresh process when `fresh`) and wait for it: (exit status, the
    child's peak resident memory in MiB)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = (_spawn if fresh else _fork)(job, cwd, threads, log)
    try:
        _, status, usage = os.wait4(pid, 0)
    except KeyboardInterrupt:  # Ctrl-C reached the child too: let it save and stop, then stop
        _, status, usage = os.wait4(pid, 0)
        raise
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024


def run_job(job: Job, cwd: str, threads: int | None, retries: int, log: str | None, fresh: bool = False) -> JobResult:
    """`job` until it succeeds, at most 1 + `retries` times; each attempt resumes from the files the last
    left (the stages' exact resume). A crash or a kill (out of memory, a lost process) is retried; Ctrl-C
    and the CLI's user-facing errors (exit 2: the same input gives the same error) are not."""
    started = time.time()
    result = JobResult(job, "failed", worker=socket.gethostname(), started=started, log=log or "")
    peak = 0.0
    for attempt in range(1, retries + 2):
        if log:
            with open(log, "a") as handle:
                handle.write(f"# attempt {attempt} on {socket.gethostname()}: {job.command()}\n")
        code, rss = run_once(job, cwd, threads, log, fresh)
        peak = max(peak, rss)
        result.attempts, result.returncode = attempt, code
        if code == 0:
            result.status = "ok"
            break
        if code in (INTERRUPTED, USER_ERROR):
            break
    result.finished = time.time()
    result.seconds = result.finished - started
    result.peak_rss_mb = peak
    return result


# ---------------------------------------------------------------- backends

class SerialBackend:
    """One job at a time in this process's forked children, output on this terminal, train.threads as configured."""

    name = "serial"
    synchronous = True  # start returns when the job has finished

    def __init__(self, cfg: Config, cwd: str):
        self.cfg, self.cwd = cfg, cwd
        self._done: list[JobResult] = []

    def start(self, job: Job, log: str) -> None:
        self._done.append(run_job(job, self.cwd, None, self.cfg.executor.max_retries, None,
                                  fresh=may_use_cuda(self.cfg.device)))

    def wait(self) -> list[JobResult]:
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        pass


def job_threads(num_cpus: float) -> int:
    return max(1, math.floor(num_cpus))


def _ray_run_job(job: Job, cwd: str, threads: int, retries: int, log: str, device: str) -> JobResult:
    from competition.commands import plain_progress_when_redirected

    plain_progress_when_redirected()  # before tqdm is imported: it reads its TQDM_* defaults then
    fresh = may_use_cuda(device)  # asked on the node that runs the job
    if not fresh:
        preload()
    return run_job(job, cwd, threads, retries, log, fresh)


class RayBackend:
    """Each job a Ray task reserving `num_cpus` / `num_gpus`; Ray's own `max_retries` covers a lost worker
    or node, the task's retry loop a failed or killed job."""

    name = "ray"
    synchronous = False

    def __init__(self, cfg: Config, cwd: str):
        import ray

        self.ray, self.cfg, self.cwd = ray, cfg, cwd
        ex = cfg.executor
        if not ray.is_initialized():
            if ex.address:
                ray.init(address=ex.address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=ex.cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         object_store_memory=100 * 1024 * 1024)  # jobs return a few numbers: no big store
        self._task = ray.remote(_ray_run_job).options(num_cpus=ex.num_cpus, num_gpus=ex.num_gpus,
                                                      max_retries=ex.max_retries)
        self._running: dict[Any, Job] = {}

    def start(self, job: Job, log: str) -> None:
        ex = self.cfg.executor
        ref = self._task.remote(job, self.cwd, job_threads(ex.num_cpus), ex.max_retries, log, self.cfg.device)
        self._running[ref] = job

    def wait(self) -> list[JobResult]:
        ready, _ = self.ray.wait(list(self._running), num_returns=1)
        results = []
        for ref in ready:
            job = self._running.pop(ref)
            try:
                results.append(self.ray.get(ref))
            except self.ray.exceptions.RayError as exc:  # the worker or node died more often than max_retries
                results.append(JobResult(job, "failed", returncode=None, worker=f"lost: {type(exc).__name__}"))
        return results

    def close(self) -> None:
        self.ray.shutdown()


BACKENDS: dict[str, Callable[[Config, str], Any]] = {"serial": SerialBackend, "ray": RayBackend}


# ---------------------------------------------------------------- the run

def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.paths.work) / cfg.experiment / RUN_DIR


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def execute(jobs: list[Job], backend: Any, log_dir: Path, on_finish: Callable[[JobResult], None]) -> list[JobResult]:
    """Start every job whose inputs are finished, in list order; a failed job's dependants are skipped,
    the other jobs still run."""
    pending = list(jobs)
    results: dict[str, JobResult] = {}
    running = 0

    def collect() -> None:
        nonlocal running
        for result in backend.wait():
            running -= 1
            results[result.job.name] = result
            on_finish(result)

    while pending or running:
        for job in list(pending):
            upstream = [results.get(name) for name in job.after]
            if any(r is not None and r.status != "ok" for r in upstream):
                pending.remove(job)
                results[job.name] = JobResult(job, "skipped")
                on_finish(results[job.name])
            elif all(r is not None for r in upstream):
                pending.remove(job)
                backend.start(job, str(log_dir / f"{job.name}.log"))
                running += 1
                if backend.synchronous:  # it has finished: report it before the next starts
                    collect()
        if not running:
            break
        collect()
    return [results[job.name] for job in jobs if job.name in results]


def finished_line(result: JobResult, width: int) -> str:
    if result.status == "skipped":
        return f"[run] {result.job.name:<{width}} skipped: a job it reads from failed"
    tries = f", {result.attempts} attempts" if result.attempts > 1 else ""
    memory = f"{result.peak_rss_mb:7.0f} MiB" if math.isfinite(result.peak_rss_mb) else ""
    return (f"[run] {result.job.name:<{width}} {result.status:<6} {result.seconds:7.1f} s {memory}"
            f"{tries}{'' if result.status == 'ok' else f' (exit {result.returncode})'}")


def summary(results: list[JobResult], wall: float, backend: str) -> str:
    table = pd.DataFrame([r.row() for r in results])
    ok = table[table["status"] == "ok"]
    by_stage = table.groupby("stage", sort=False).agg(jobs=("job", "size"), seconds=("seconds", "sum"),
                                                       peak_rss_mb=("peak_rss_mb", "max"))
    busy = ok["seconds"].sum()
    lines = [f"[run] {len(ok)}/{len(table)} jobs ok, {backend}: {wall:.1f} s wall, {busy:.1f} s of job time "
             f"({busy / max(wall, 1e-9):.2f} jobs running on average)",
             by_stage.round(1).to_string()]
    failed = table[table["status"] != "ok"]
    if len(failed):
        lines.append("[run] not done: " + ", ".join(f"{j} ({s})" for j, s in zip(failed["job"], failed["status"])))
    return "\n".join(lines)


def plot_timeline(results: list[JobResult], path: Path) -> Path:
    """One bar per job from its start to its end, a row per job, coloured by stage: where the time went."""
    import matplotlib.pyplot as plt

    from competition.artifacts import save_figure

    ran = [r for r in results if math.isfinite(r.started)]
    t0 = min((r.started for r in ran), default=0.0)
    stages = list(dict.fromkeys(r.job.stage for r in ran))
    colours = {s: plt.cm.tab10(i % 10) for i, s in enumerate(stages)}
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.22 * len(ran)))
    for y, r in enumerate(ran):
        ax.barh(y, r.finished - r.started, left=r.started - t0, color=colours[r.job.stage],
                hatch="" if r.status == "ok" else "//")
    ax.set_yticks(range(len(ran)), [r.job.name for r in ran], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the run started")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[s]) for s in stages]
    ax.legend(handles, stages, fontsize=7, loc="lower right")
    ax.set_title("jobs of the run (hatched: failed)")
    return save_figure(fig, path)


def config_args(config_path: str, overrides: Sequence[str]) -> list[str]:
    args = ["--config", str(config_path)]
    for text in overrides:
        args += ["--set", text]
    return args


def main(cfg: Config, config_path: str, overrides: Sequence[str], dry_run: bool = False) -> int:
    """Run the experiment's jobs with `executor.backend`; 0 when every job finished."""
    start = time.time()
    jobs = build_jobs(cfg, config_args(config_path, overrides))
    width = max(len(job.name) for job in jobs)
    if dry_run:
        for job in jobs:
            after = f"  (after {', '.join(job.after)})" if job.after else ""
            print(f"{job.name:<{width}}  {job.command()}{after}")
        return 0
    out = run_dir_of(cfg)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    write_yaml(cfg.to_dict(), out / "config.yaml")
    where = "" if cfg.executor.backend == "serial" else f"; logs in {log_dir}"
    print(f"[run] {len(jobs)} jobs, backend {cfg.executor.backend}{where}")
    if not may_use_cuda(cfg.device):
        preload()
    backend = BACKENDS[cfg.executor.backend](cfg, os.getcwd())

    finished: list[JobResult] = []
    write_csv(pd.DataFrame(columns=JOB_COLUMNS), out / "jobs.csv")  # not a previous run's

    def on_finish(result: JobResult) -> None:
        print(finished_line(result, width), flush=True)
        if result.status == "failed" and result.log:
            print(_log_tail(result.log), flush=True)
        finished.append(result)  # jobs.csv as it grows: a run stopped half-way still shows what it did
        write_csv(pd.DataFrame([r.row() for r in finished], columns=JOB_COLUMNS), out / "jobs.csv")

    try:
        results = execute(jobs, backend, log_dir, on_finish)
    finally:
        backend.close()
    wall = time.time() - start
    write_json({"backend": cfg.executor.backend, "wall_seconds": round(wall, 2), "jobs": len(jobs),
                "ok": sum(r.status == "ok" for r in results),
                "job_seconds": round(sum(r.seconds for r in results), 2)}, out / "summary.json")
    plot_timeline(results, out / "timeline.png")
    print(summary(results, wall, cfg.executor.backend))
    print(out / "jobs.csv")
    if any(r.returncode == INTERRUPTED for r in results):
        return INTERRUPTED
    return 0 if all(r.status == "ok" for r in results) and len(results) == len(jobs) else 1

