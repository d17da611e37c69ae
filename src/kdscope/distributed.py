"""Multi-process (data-parallel) training and teacher placement.

kdscope's trainer runs one process per device; `accelerate launch`, `torchrun` or any launcher that sets
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` starts them. Every rank knows the
whole run's data order (`kdscope.train.batch_schedule` is a pure function of the seed), so no data is sent around:

- each rank takes a disjoint share of every accumulation window's micro-batches (micro-batch ``a`` goes to rank
  ``a % world_size``) and reseeds torch from ``(seed, step, a)`` before it, so dropout and on-policy samples do not
  depend on which rank runs a micro-batch;
- the loss normaliser is the GLOBAL window's unit count (the ranks' counts summed), so a window gives the same
  gradient on 1 or N processes;
- gradients are summed over ranks once per optimizer step (one flattened all-reduce; the local losses are already
  shares of the global window, so a sum, not DDP's mean, is the right reduction), after which every rank clips and
  steps identically and the replicas never drift;
- rank 0 alone writes checkpoints, metrics and the final weights.

The teacher is frozen, so it needs no gradient synchronisation: it can be replicated on every rank, moved to its
own device(s), or sharded across the ranks (FSDP2 or DeepSpeed ZeRO-3) when it does not fit next to the student.
See docs/scale-out.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, Sequence, TypeVar

import torch

from .errors import InputError
from .models import resolve_device

T = TypeVar("T")
Placement = Literal["replicate", "device", "spread", "fsdp", "zero3"]
PLACEMENTS: tuple[str, ...] = ("replicate", "device", "spread", "fsdp", "zero3")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel run (world size 1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """This rank's ``(global index, item)`` share of a window: round robin, so shares differ by at most one."""
        return [(i, item) for i, item in enumerate(items) if i % self.world_size == self.rank]

    def sum_values(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch.distributed as dist

        buf = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.tolist()

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over ranks (a rank without micro-batches contributes 0)."""
        if not self.enabled or not params:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset: offset + n].view_as(g).to(g.dtype)
            offset += n

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def _comm_device(self) -> torch.device:
        # NCCL only moves CUDA tensors; gloo only CPU ones
        return self.device if self.device.type == "cuda" else torch.device("cpu")


SINGLE = DistContext()


def launched_world_size() -> int:
    """The process count a launcher asked for (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group a launcher set up (gloo on CPU, NCCL on CUDA); a plain process gets `SINGLE`.

    ``device`` as in `kdscope.models.resolve_device`; under a launcher each rank takes ``cuda:<LOCAL_RANK>`` on GPUs.
    """
    import torch.distributed as dist

    world = launched_world_size()
    base = resolve_device(device)
    if world <= 1:
        return DistContext(device=base)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif base.type == "cpu":
        dev, backend = base, "gloo"
    else:
        raise InputError(f"multi-process training supports cpu and cuda devices, not {base.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def close_distributed(ctx: DistContext) -> None:
    import torch.distributed as dist

    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def check_window(grad_accum: int, ctx: DistContext) -> None:
    """Every rank must get the same number of micro-batches: a sharded teacher runs its forward in lockstep."""
    if ctx.enabled and grad_accum % ctx.world_size:
        raise InputError(f"grad_accum={grad_accum} is not a multiple of the {ctx.world_size} processes; "
                         f"use e.g. grad_accum={ctx.world_size * max(1, grad_accum // ctx.world_size)} "
                         "(the global batch is micro_batch_size x grad_accum whatever the process count)")


# --------------------------------------------------------------------------------------------------------------------
# Teacher placement
# --------------------------------------------------------------------------------------------------------------------
class DeviceBridge(torch.nn.Module):
    """A teacher living on other device(s) than the student: inputs go to the teacher, logits come back.

    The wrapped model is held outside the module tree on purpose: the only registered parameter is an empty anchor
    on the student's device, so callers that read ``next(model.parameters()).device`` (e.g. OnlineTeacher's noise
    generator) see the device where the logits arrive.
    """

    def __init__(self, model: torch.nn.Module, input_device: torch.device, output_device: torch.device) -> None:
        super().__init__()
        object.__setattr__(self, "inner", model)
        self.input_device = input_device
        self.output_device = output_device
        self.anchor = torch.nn.Parameter(torch.empty(0, device=output_device), requires_grad=False)

    def train(self, mode: bool = True) -> "DeviceBridge":
        self.inner.train(mode)
        return super().train(mode)

    def disable_adapter(self) -> Any:  # the base-teacher ablation of a PEFT teacher
        return self.inner.disable_adapter()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
        out = self.inner(input_ids=input_ids.to(self.input_device), attention_mask=attention_mask.to(self.input_device),
                         **kwargs)
        out.logits = out.logits.to(self.output_device)
        return out


def place_teacher(teacher: torch.nn.Module, placement: Placement, ctx: DistContext,
                  teacher_devices: Sequence[str] = ()) -> torch.nn.Module:
    """Put a frozen teacher where ``placement`` says; the result returns logits on ``ctx.device``.

    - ``replicate``: a full copy on every rank's device (fastest; the teacher must fit next to the student).
    - ``device``: the whole teacher on ``teacher_devices[local_rank]`` (e.g. GPU 2 for rank 0, GPU 3 for rank 1).
    - ``spread``: layers split over ``teacher_devices`` (accelerate's ``dispatch_model``; pipeline, no parallelism).
    - ``fsdp``: parameters sharded over the ranks with FSDP2, gathered layer by layer in each forward.
    - ``zero3``: parameters partitioned over the ranks with DeepSpeed ZeRO-3 (inference engine, no optimizer).
    """
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    if placement == "replicate":
        return teacher.to(ctx.device)
    if placement in ("device", "spread") and not teacher_devices:
        raise InputError(f"teacher placement {placement} needs the teacher's device(s), e.g. cuda:1")
    if placement == "device":  # one teacher device per local rank (listed in rank order), or one shared by all
        dev = torch.device(teacher_devices[ctx.local_rank % len(teacher_devices)])
        return DeviceBridge(teacher.to(dev), dev, ctx.device)
    if placement == "spread":
        return _spread(teacher, teacher_devices, ctx)
    if not ctx.enabled:
        raise InputError(f"teacher placement {placement} shards over processes; launch with accelerate or torchrun")
    if placement == "fsdp":
        return _fsdp_shard(teacher, ctx)
    if placement == "zero3":
        return _zero3(teacher, ctx)
    raise InputError(f"unknown teacher placement {placement!r}; use one of {', '.join(PLACEMENTS)}")


def default_placement() -> Placement:
    """What an `accelerate launch --config_file examples/accelerate/<x>.yaml` asked for (replicate otherwise)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3") != "3":
            raise InputError("DeepSpeed ZeRO stages below 3 leave a frozen teacher whole on every rank; use "
                             "examples/accelerate/deepspeed_zero3.yaml or plain DDP (see docs/scale-out.md)")
        return "zero3"
    return "replicate"


def _spread(teacher: torch.nn.Module, devices: Sequence[str], ctx: DistContext) -> torch.nn.Module:
    from accelerate import dispatch_model, infer_auto_device_map  # only for this placement: slow to import

    devs = [torch.device(d) for d in devices]
    if any(d.type != "cuda" or d.index is None for d in devs):
        raise InputError(f"teacher placement spread takes numbered GPUs (cuda:1 cuda:2 ...), got {list(devices)}")
    # fill only the listed GPUs, up to what is free on each now
    max_memory: dict[Any, int] = {d.index: torch.cuda.mem_get_info(d)[0] for d in devs}
    no_split = getattr(teacher, "_no_split_modules", None) or []
    device_map = infer_auto_device_map(teacher, max_memory=max_memory, no_split_module_classes=no_split)
    dispatched = dispatch_model(teacher, device_map=device_map)
    return DeviceBridge(dispatched, devs[0], ctx.device)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one at a time (``model.model.layers`` in HF Llama/Qwen2, also under PEFT)."""
    no_split = set(getattr(model, "_no_split_modules", None) or ["Qwen2DecoderLayer", "LlamaDecoderLayer"])
    return [m for m in model.modules() if type(m).__name__ in no_split]


def _fsdp_shard(teacher: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard  # only for this placement

    teacher.to(ctx.device)
    # reshard_after_forward (the default): a frozen teacher never runs backward, so each layer's gathered weights
    # are freed right after its forward and only one layer is ever whole on a rank
    for layer in _decoder_layers(teacher):
        fully_shard(layer)
    fully_shard(teacher)
    return teacher


def _zero3(teacher: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """ZeRO-3 inference engine for the teacher (the pattern TRL uses for frozen reference / teacher models)."""
    import deepspeed  # not a kdscope dependency: installed by whoever asks for zero3

    hidden = int(getattr(teacher.config, "hidden_size", 0)) or 4096
    dtype = next(teacher.parameters()).dtype
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10 * hidden,
                              "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden)},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }
    engine, *_ = deepspeed.initialize(model=teacher.to(ctx.device), config=config)
    return engine.eval()


__all__ = ["DistContext", "SINGLE", "init_distributed", "close_distributed", "check_window", "place_teacher",
           "default_placement", "DeviceBridge", "PLACEMENTS", "launched_world_size"]
