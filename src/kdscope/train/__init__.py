"""Training: settings, batches, the objective, in-training generation, checkpoints and the loop (see `loop`)."""

from .batches import Batch, batch_schedule, collate, split_validation
from .checkpoints import MetricLog, latest_checkpoint, load_checkpoint, save_checkpoint
from .generation import TeacherResponse, on_policy_batch, sample_budget, sample_continuations, teacher_responses
from .loop import TrainResult, linear_warmup_decay, prepare_student, train
from .objective import StepLosses, TeacherFn, Units, batch_loss, mask_units, validation_loss, window_units
from .settings import Objective, TrainSettings

__all__ = [
    "Batch", "MetricLog", "Objective", "StepLosses", "TeacherFn", "TeacherResponse", "TrainResult", "TrainSettings", "batch_loss",
    "batch_schedule", "collate", "latest_checkpoint", "linear_warmup_decay", "load_checkpoint", "on_policy_batch",
    "prepare_student", "sample_budget", "sample_continuations", "save_checkpoint", "split_validation", "teacher_responses", "train",
    "Units", "mask_units", "validation_loss", "window_units",
]
