"""Running a study: expand it, prepare its folder and store, and hand the jobs to an executor. A killed run
resumes: finished jobs are skipped, an interrupted training job continues from its last checkpoint, an interrupted
evaluation from its last written batch.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Sequence

from .executors import RunSummary, make_backend, run_jobs
from .graph import expand, job_dir, jobs_to_redo
from .spec import Study
from .store import StudyStore


def study_dir(study: Study, out: str | Path | None) -> Path:
    return Path(out) if out is not None else Path("runs") / study.name


def run_study(study: Study, out: str | Path | None = None, progress: bool = True,
              log: Callable[[str], None] = print, redo: Sequence[str] = ()) -> RunSummary:
    """Run every job that is not done yet; a failed job is reported and blocks only its dependents. Jobs of the
    kinds in ``redo`` (and everything downstream of them) are computed again from scratch."""
    jobs = expand(study)
    again = jobs_to_redo(jobs, redo)
    root = study_dir(study, out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(study.model_dump_json(indent=1))
    store = StudyStore(root / "study.sqlite")
    for job in again:
        if store.status(job.key) is not None:
            store.mark(job, "pending")
        shutil.rmtree(job_dir(root, job), ignore_errors=True)  # else the job would resume its old outputs
    backend = make_backend(study, root, progress)
    return run_jobs(jobs, store, backend, RunSummary(out_dir=root), log, progress)
