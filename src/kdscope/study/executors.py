"""Executors for a study's job graph: in-process (serial), a local process pool, or a Ray cluster.

One scheduler serves all three: a job starts when every job it depends on is done, a failed job is recorded with
its error and blocks only the jobs downstream of it. Only the driver writes job states and results to the study
store. Workers read their dependencies' outputs from the study folder, so on a Ray cluster the folder must be on
storage every worker sees (a shared file system).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from tqdm.auto import tqdm

from .graph import Job, job_dir
from .jobs import run_job
from .spec import Study
from .store import StudyStore
from .tables import run_analysis

Outcome = tuple[str, "dict[str, Any] | None", "str | None"]  # (job key, result, error)


@dataclass
class RunSummary:
    """What one `kdscope run` did, by job key."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)
    out_dir: Path = Path(".")


def execute_job(job: Job, root: str, threads: int | None, progress: bool = False) -> Outcome:
    """Run one job, returning its error instead of raising, so that one failure stays one job's failure."""
    if threads:
        torch.set_num_threads(threads)
    try:
        return job.key, _run(job, Path(root), progress), None
    except Exception as e:  # reported to the scheduler, which records it and carries on
        return job.key, None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"


def _run(job: Job, root: Path, progress: bool) -> dict[str, Any]:
    store = StudyStore(root / "study.sqlite")
    if job.kind != "analysis":
        return run_job(job, root, store, progress)
    out = job_dir(root, job)
    out.mkdir(parents=True, exist_ok=True)
    return run_analysis(job, out, root, store, progress)


class ExecutorBackend(Protocol):
    capacity: int

    def submit(self, job: Job) -> Any: ...

    def wait_any(self, handles: list[Any]) -> Any: ...

    def outcome(self, handle: Any) -> Outcome: ...

    def close(self) -> None: ...


class SerialBackend:
    """In the driver process, one job at a time (progress bars shown)."""

    capacity = 1

    def __init__(self, root: Path, threads: int | None, progress: bool) -> None:
        self.args = (str(root), threads, progress)

    def submit(self, job: Job) -> cf.Future:
        future: cf.Future = cf.Future()
        future.set_result(execute_job(job, *self.args))
        return future

    def wait_any(self, handles: list[cf.Future]) -> cf.Future:
        return handles[0]

    def outcome(self, handle: cf.Future) -> Outcome:
        return handle.result()

    def close(self) -> None:
        pass


class ProcessPoolBackend:
    """``workers`` local processes (spawned, so no torch state is forked), each running one job at a time."""

    def __init__(self, root: Path, threads: int | None, workers: int) -> None:
        self.capacity = workers
        self.args = (str(root), threads, False)
        self.pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, job: Job) -> cf.Future:
        return self.pool.submit(execute_job, job, *self.args)

    def wait_any(self, handles: list[cf.Future]) -> cf.Future:
        done, _ = cf.wait(handles, return_when=cf.FIRST_COMPLETED)
        return next(h for h in handles if h in done)

    def outcome(self, handle: cf.Future) -> Outcome:
        return handle.result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class RayBackend:
    """Jobs as Ray tasks with the study's CPU/GPU request each; a local Ray instance when no address is given."""

    def __init__(self, root: Path, threads: int | None, address: str | None, cpus: float, gpus: float) -> None:
        import ray  # optional extra, imported only for the ray executor

        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self.ray = ray
        self.capacity = 1 << 30  # Ray queues what the cluster cannot place yet
        self.args = (str(root), threads, False)
        self.remote = ray.remote(num_cpus=cpus, num_gpus=gpus)(execute_job)

    def submit(self, job: Job) -> Any:
        return self.remote.remote(job, *self.args)

    def wait_any(self, handles: list[Any]) -> Any:
        ready, _ = self.ray.wait(handles, num_returns=1)
        return ready[0]

    def outcome(self, handle: Any) -> Outcome:
        return self.ray.get(handle)

    def close(self) -> None:
        pass


def make_backend(study: Study, root: Path, progress: bool) -> ExecutorBackend:
    ex = study.executor
    if ex.kind == "ray":
        return RayBackend(root, study.threads, ex.address, ex.cpus_per_job, ex.gpus_per_job)
    if ex.workers > 1:
        return ProcessPoolBackend(root, study.threads, ex.workers)
    return SerialBackend(root, study.threads, progress)


def run_jobs(jobs: list[Job], store: StudyStore, backend: ExecutorBackend, summary: RunSummary,
             log: Callable[[str], None], progress: bool = True) -> RunSummary:
    """Run every job not yet done, in dependency order, ``backend.capacity`` at a time."""
    done = {j.key for j in jobs if store.status(j.key) == "done"}
    bar = tqdm(total=len(jobs), initial=len(done), desc="study", unit="job", disable=not progress,
               dynamic_ncols=True, position=0)
    if progress:
        log = bar.write  # keep the job bar at the bottom
    summary.skipped.extend(j.key for j in jobs if j.key in done)
    failed: set[str] = set()
    pending = [j for j in jobs if j.key not in done]
    running: dict[Any, Job] = {}
    total = len(jobs)
    try:
        while pending or running:
            for job in list(pending):
                if len(running) >= backend.capacity:
                    break
                deps = {d.key for d in job.deps.values()}
                if deps & failed:
                    pending.remove(job)
                    failed.add(job.key)
                    summary.blocked.append(job.key)
                    store.mark(job, "blocked", "a job it depends on failed")
                    bar.update(1)
                elif deps <= done:
                    pending.remove(job)
                    store.mark(job, "running")
                    log(f"[{len(done) + len(failed) + len(running) + 1}/{total}] {job.name}")
                    running[backend.submit(job)] = job
            if not running:
                break
            handle = backend.wait_any(list(running))
            job = running.pop(handle)
            key, result, error = backend.outcome(handle)
            if error is not None:
                store.mark(job, "failed", error)
                summary.failed[key] = error.splitlines()[0]
                failed.add(key)
                log(f"  failed: {job.name}: {summary.failed[key]}")
            else:
                store.complete(job, result or {})
                summary.ran.append(key)
                done.add(key)
            bar.update(1)
    finally:
        bar.close()
        backend.close()
    return summary
