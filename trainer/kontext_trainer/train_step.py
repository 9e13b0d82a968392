"""One optimiser step of Kontext LoRA training, usable on its own (benchmarks build it around any transformer).

`KontextTrainStep` owns nothing but references: the transformer (with its LoRA), the optimiser and LR
schedule, and the `accelerate.Accelerator` that provides mixed precision (bf16/fp16/fp32), gradient
accumulation and gradient clipping. Noise and timesteps come from the generator given per micro-batch, so a
step is a pure function of (weights, optimiser state, inputs, generator state) — which is what makes resume
exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.optimization import get_scheduler

from kontext_lora.api.spec import DType, Optimizer, TimestepSampling, TrainingSpec

from . import flux_math
from .distributed import Shard
from .errors import InvalidInputError

MIXED_PRECISION = {DType.bf16: "bf16", DType.fp16: "fp16", DType.fp32: "no"}


def require_supported_precision(dtype: DType, cpu: bool = False) -> None:
    if dtype is DType.fp16 and (cpu or not torch.cuda.is_available()):
        raise InvalidInputError(
            "spec.model.dtype fp16 needs a CUDA GPU (fp16 autocast and loss scaling); use bf16 or fp32 on a CPU"
        )


def make_accelerator(
    dtype: DType, gradient_accumulation: int, cpu: bool = False, kwargs_handlers: Sequence[Any] = ()
) -> Accelerator:
    """An Accelerator for this run. Its state is a process-wide singleton, so a second run in the same process
    (tests, notebooks) with another precision must reset it first. Under torchrun its creation joins the process
    group (distributed.py)."""
    require_supported_precision(dtype, cpu)
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(
        mixed_precision=MIXED_PRECISION[dtype],
        gradient_accumulation_steps=gradient_accumulation,
        cpu=cpu,
        kwargs_handlers=list(kwargs_handlers),
    )


def build_optimizer(
    parameters: Sequence[torch.nn.Parameter], spec: TrainingSpec, learning_rate: float | None = None
) -> torch.optim.Optimizer:
    """The optimiser at `learning_rate` (default: the spec's; a distributed run passes the world size's rate)."""
    lr = spec.learning_rate if learning_rate is None else learning_rate
    if spec.optimizer is Optimizer.adafactor:
        from transformers.optimization import Adafactor

        return Adafactor(
            parameters,
            lr=lr,
            weight_decay=spec.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=spec.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, spec: TrainingSpec, total_steps: int):
    return get_scheduler(
        spec.lr_scheduler.value,
        optimizer=optimizer,
        num_warmup_steps=spec.warmup_steps,
        num_training_steps=total_steps,
    )


@dataclass
class StepResult:
    loss: float
    learning_rate: float
    grad_norm: float | None


class KontextTrainStep:
    def __init__(
        self,
        transformer: torch.nn.Module,
        parameters: Sequence[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        accelerator: Accelerator,
        max_grad_norm: float = 1.0,
        guidance_scale: float = 1.0,
        timestep_sampling: TimestepSampling = TimestepSampling.sigmoid,
        timestep_shift: float = 3.0,
        dynamic_shift: flux_math.DynamicShift | None = None,
    ):
        """`dynamic_shift`: the model's scheduler config, for `flux_shift`."""
        self.transformer = transformer
        self.parameters = list(parameters)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.accelerator = accelerator
        self.max_grad_norm = max_grad_norm
        self.guidance_scale = guidance_scale
        self.timestep_sampling = timestep_sampling
        self.timestep_shift = timestep_shift
        self.dynamic_shift = dynamic_shift or flux_math.DynamicShift()

    def micro_batch_loss(
        self, inputs: flux_math.KontextInputs, generator: torch.Generator, shard: Shard | None = None
    ) -> torch.Tensor:
        """Flow-matching loss of one micro-batch; noise and t are drawn from `generator` (on the CPU). `shard`: the
        micro-batch is these rows of a global batch, whose noise and t are drawn whole and these rows kept."""
        device = self.accelerator.device
        shard = shard or Shard(0, inputs.batch_size, inputs.batch_size)
        if shard.size != inputs.batch_size:
            raise ValueError(f"the shard has {shard.size} rows, the micro-batch {inputs.batch_size}")
        shape = (shard.total, *inputs.target.shape[1:])
        noise = shard.rows(torch.randn(shape, generator=generator, dtype=torch.float32))
        shift = flux_math.resolve_shift(
            self.timestep_sampling, self.timestep_shift, inputs.target.shape[1], self.dynamic_shift
        )
        sigmas = shard.rows(
            flux_math.sample_sigmas(shard.total, self.timestep_sampling, shift, generator=generator, device=device)
        )
        weights = flux_math.timestep_weights(self.timestep_sampling, sigmas)
        inputs = inputs.to(device)
        with self.accelerator.autocast():
            return flux_math.flow_matching_loss(
                self.transformer, inputs, noise.to(device), sigmas, self.guidance_scale, weights
            )

    def __call__(
        self,
        micro_batches: Sequence[flux_math.KontextInputs],
        generators: Sequence[torch.Generator],
        shards: Sequence[Shard | None] | None = None,
    ) -> StepResult:
        """One optimiser step over `gradient_accumulation` micro-batches (one generator each; `shards`: where each
        sits in its global batch, when several ranks share it)."""
        if len(micro_batches) != self.accelerator.gradient_accumulation_steps:
            raise ValueError(
                f"expected {self.accelerator.gradient_accumulation_steps} micro-batches, got {len(micro_batches)}"
            )
        self.transformer.train()
        losses = []
        grad_norm = None
        for inputs, generator, shard in zip(micro_batches, generators, shards or [None] * len(generators), strict=True):
            with self.accelerator.accumulate(self.transformer):
                loss = self.micro_batch_loss(inputs, generator, shard)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients and self.max_grad_norm > 0:
                    grad_norm = float(self.accelerator.clip_grad_norm_(self.parameters, self.max_grad_norm))
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
        return StepResult(
            loss=float(torch.stack(losses).mean()),
            learning_rate=float(self.lr_scheduler.get_last_lr()[0]),
            grad_norm=grad_norm,
        )
