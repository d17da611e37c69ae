"""kdscope: run, measure and explain knowledge-distillation studies of causal language models.

Pipeline, one module or package per stage: tasks/data -> models -> teacher -> losses -> fused -> xtok -> cache ->
train -> evaluation -> fidelity -> stats -> report, with `study` orchestrating and `cli` on top (the whole order and
its check: tests/test_layers.py).
"""

__version__ = "0.1.0"
