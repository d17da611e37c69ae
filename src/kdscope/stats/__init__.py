"""Statistics of a distillation study: the study's own analysis (study.md section 5), reproduced exactly, plus what
it lacked (multiple-comparison control, effect sizes with confidence intervals, robustness tests, a regression
that says which terms its design can identify, paired per-item tests and multi-seed aggregation).

Modules, each one concern: ``tables`` (reading result tables, task columns, what each row describes), ``seeds``
(multi-seed aggregation), ``units`` (the study's unit table, agreement and fidelity per student), ``hypotheses``
(t, ANOVA, Spearman, effect sizes, Holm/BH), ``regression``, ``items`` (paired per-item tests), ``markdown``
(records as text) and ``analysis`` (the entry points). Row-label parsing lives in :mod:`kdscope.labels`.
"""

from ..labels import KD_METHODS, is_base_teacher, kd_method, size_or_nan, student_size, teacher_name
from .analysis import Analysis, analyse, run_analysis
from .hypotheses import (CORRELATES, METHOD_GROUPS, N_BOOT, adjust_within_families, bootstrap_mean_ci, cohens_dz_ci,
                         correlation, family_key, holm_adjust, hypothesis_records, kd_beats_sft, methods_differ,
                         spearman_ci)
from .items import item_records, mcnemar, paired_bootstrap
from .markdown import (HYPOTHESIS_TITLES, STUDY_HYPOTHESES, effect_table, headline, json_ready, markdown_report,
                       markdown_table, regression_table, study_table)
from .regression import collinear_terms, column_basis, regression_records
from .seeds import CONFIDENCE, collapse_seeds, mean_ci, seed_summary
from .tables import (ABLATION_COLUMN, AVERAGE, DESCRIPTOR_COLUMNS, ID_COLUMNS, ITEM_COLUMNS, KD_METHOD_COLUMN,
                     SEED_COLUMN, TEMPERATURE_COLUMN, describe_rows, domain_columns, read_side_tables, read_table,
                     read_tables, require_analysable, row_domains, task_domain)
from .units import attach_pair_scores, configurations, pair_scores

__all__ = [
    "ABLATION_COLUMN", "AVERAGE", "Analysis", "CONFIDENCE", "CORRELATES", "DESCRIPTOR_COLUMNS", "HYPOTHESIS_TITLES",
    "ID_COLUMNS", "ITEM_COLUMNS", "KD_METHODS", "KD_METHOD_COLUMN", "METHOD_GROUPS", "N_BOOT", "SEED_COLUMN",
    "STUDY_HYPOTHESES", "TEMPERATURE_COLUMN", "adjust_within_families", "analyse", "attach_pair_scores",
    "bootstrap_mean_ci", "cohens_dz_ci", "collapse_seeds", "collinear_terms", "column_basis", "configurations",
    "correlation", "describe_rows", "domain_columns", "effect_table", "family_key", "headline",
    "holm_adjust", "hypothesis_records", "is_base_teacher", "item_records", "json_ready", "kd_beats_sft", "kd_method",
    "markdown_report", "markdown_table", "mcnemar", "mean_ci", "methods_differ", "paired_bootstrap",
    "pair_scores", "read_side_tables", "read_table", "read_tables", "regression_records", "regression_table",
    "require_analysable", "row_domains", "run_analysis", "seed_summary", "size_or_nan", "spearman_ci",
    "student_size", "study_table", "task_domain", "teacher_name",
]
