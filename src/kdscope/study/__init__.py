"""Studies as code: a YAML study (spec) expands into keyed jobs (graph), kept in one SQLite store (store), each job
run by its kind (jobs), exported as the study's tables (tables), scheduled by an executor (executors) from `run`.
Modules import only down that chain."""

from .spec import Study, StudyStore, builtin_study, expand, job_dir, load_study, run_study, study_dir

__all__ = ["Study", "StudyStore", "builtin_study", "expand", "job_dir", "load_study", "run_study", "study_dir"]
