"""kdscope: run, measure and explain knowledge-distillation studies of causal language models.

Pipeline, one module per stage: data/tasks -> models -> signal (teacher) -> losses -> train -> eval -> fidelity ->
stats -> report, with `study` orchestrating and `cli` on top.
"""

__version__ = "0.1.0"
