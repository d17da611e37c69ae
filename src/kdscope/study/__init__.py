"""Studies as code, one module per step and imports only down this chain: ``spec`` (the YAML schema) < ``graph``
(expansion into keyed jobs) < ``store`` (SQLite) < ``jobs`` (what each kind of job does) < ``tables`` (exports,
statistics and report) < ``executors`` < ``run``."""

from .graph import Job, expand, job_dir
from .run import run_study, study_dir
from .spec import Study, builtin_study, load_study
from .store import StudyStore

__all__ = ["Job", "Study", "StudyStore", "builtin_study", "expand", "job_dir", "load_study", "run_study", "study_dir"]
