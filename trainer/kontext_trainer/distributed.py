"""Data-parallel training across processes: who this process is among the job's ranks, and the few collectives a
run needs. Everything distributed lives here, so the stages stay what they are on one GPU.

The processes are started by `torchrun` (the operator runs it in every pod of a job with `count x nodes > 1`; on
one machine: `torchrun --nproc-per-node N --no-python kontext-lora train job.yaml`), which sets `RANK`,
`LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE` and `GROUP_RANK`. `accelerate` creates the process group from them
(NCCL on GPUs, gloo on CPUs) and wraps the transformer in DistributedDataParallel, which averages the LoRA's
gradients in backward; nothing here all-reduces gradients itself.

The rules the run keeps (docs/trainer.md, "Several GPUs and nodes"):
- one global batch of `worldSize x batchSize` pairs per micro-batch, drawn by the same `BatchSchedule` as on one
  process; rank r trains on its contiguous share (`shard`) and draws the noise and timesteps of the whole global
  batch, keeping its rows, so N ranks at batch b compute what one process at batch N x b does;
- rank 0 is the only writer: the preparation manifest, encodings uploaded to the shared cache, checkpoints and
  their rotation, the final LoRA, status patches and the metrics endpoint. Set-up runs `in_turn`: rank 0 first
  (it writes), then the first rank of each other node (it fills its node's model cache), then the rest, which find
  everything written;
- one loss per step (the mean over ranks) and one stop decision per step (`step_report`): a SIGTERM or SIGINT to any
  rank makes every rank stop after the same step, with the one checkpoint rank 0 saves there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from kontext_lora.api.spec import DType

from .errors import CheckpointMismatchError

log = logging.getLogger(__name__)

# How long a collective may wait for the slowest rank: set-up waits while rank 0 downloads the model and encodes
# the dataset, and every step waits while rank 0 saves a checkpoint. A dead peer fails a collective at once (its
# connection closes); this only bounds a hung one.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Shard:
    """Rows `start .. start + size` of a global batch of `total` pairs: the part one rank trains on."""

    start: int
    size: int
    total: int

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.start : self.start + self.size]


def shard_of(batch: Sequence[int], rank: int, world_size: int) -> tuple[tuple[int, ...], Shard]:
    """This rank's pairs of a global batch (indices) and where they sit in it: contiguous, as even as possible.

    The last batch of a resolution bucket can be smaller than the world: a rank left without a pair trains on one
    pair again (pair `rank mod len(batch)`); DDP weighs every rank alike, so that pair counts twice in this step.
    """
    total = len(batch)
    if total >= world_size:
        base, extra = divmod(total, world_size)
        start = rank * base + min(rank, extra)
        size = base + (1 if rank < extra else 0)
    else:
        start, size = rank % total, 1
    return tuple(batch[start : start + size]), Shard(start, size, total)


@dataclass
class World:
    """This process's place in the job (one process per GPU) and the run's collectives; no-ops in a world of 1."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    node_rank: int = 0
    _accelerator: Any = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> World:
        """torchrun's variables; a process started without torchrun is a world of one."""
        env = os.environ if environ is None else environ

        def number(name: str, default: int) -> int:
            value = env.get(name)
            return int(value) if value not in (None, "") else default

        size = number("WORLD_SIZE", 1)
        rank = number("RANK", 0)
        if not 0 <= rank < size:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={size}")
        return cls(
            rank=rank,
            local_rank=number("LOCAL_RANK", 0),
            size=size,
            local_size=number("LOCAL_WORLD_SIZE", 1),
            node_rank=number("GROUP_RANK", 0),
        )

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} (node {self.node_rank}, local rank {self.local_rank})"

    # ---- the accelerator, and through it the process group ------------------------------------------------
    def accelerator(self, dtype: DType, gradient_accumulation: int):
        """The run's Accelerator (made once): in a world above 1 its creation joins the process group."""
        if self._accelerator is None:
            from accelerate.utils import InitProcessGroupKwargs

            from .train_step import make_accelerator

            handlers = [InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)] if self.distributed else []
            # accelerate only goes multi-process on a CPU when told `cpu=True` (gloo); with CUDA it picks NCCL.
            cpu = self.distributed and not torch.cuda.is_available()
            self._accelerator = make_accelerator(dtype, gradient_accumulation, cpu=cpu, kwargs_handlers=handlers)
            if self.distributed and self._accelerator.num_processes != self.size:
                raise RuntimeError(
                    f"accelerate sees {self._accelerator.num_processes} processes, torchrun started {self.size}"
                )
        return self._accelerator

    def barrier(self) -> None:
        if self.distributed:
            self._accelerator.wait_for_everyone()

    @contextmanager
    def in_turn(self) -> Iterator[None]:
        """Run the block rank 0 first, then the first rank of every other node, then all the others: what rank 0
        wrote (manifest, encodings, a cleaned checkpoint folder) and a node's model cache are there for the rest.
        Every rank passes the same two barriers."""
        if not self.distributed:
            yield
            return
        wave = 0 if self.main else 1 if self.local_rank == 0 else 2
        for _ in range(wave):
            self.barrier()
        yield
        for _ in range(wave, 2):
            self.barrier()

    def step_report(self, loss: float, stop_signal: int | None) -> tuple[float, int | None]:
        """(mean loss over the ranks, the stop signal any rank received or None): one all-gather per step, so every
        rank takes the same decision after the same step."""
        if not self.distributed:
            return loss, stop_signal
        accelerator = self._accelerator
        mine = torch.tensor([[loss, float(stop_signal or 0)]], dtype=torch.float64, device=accelerator.device)
        everyone = accelerator.gather(mine).cpu()
        signals = [int(s) for s in everyone[:, 1].tolist() if s > 0]
        return float(everyone[:, 0].mean()), (signals[0] if signals else None)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    # ---- resuming together ------------------------------------------------------------------------------
    def same_checkpoint(self, complete: list, describe_location: str) -> list:
        """The complete checkpoints this rank resumes from, ending with the one rank 0 chose: every rank restores
        the same step or the run stops with the reason (a rank whose storage shows another newest checkpoint)."""
        if not self.distributed:
            return complete
        mine = complete[-1].step if complete else None
        chosen = self.broadcast(mine)
        if chosen is None:
            return []
        kept = [c for c in complete if c.step <= chosen]
        if not kept or kept[-1].step != chosen:
            raise CheckpointMismatchError(
                f"{self.describe()} finds no complete checkpoint at step {chosen} in {describe_location}, which rank 0 "
                f"resumes from (this rank's newest: {mine}): every rank must read the same output storage"
            )
        return kept


def rank_settings_update(world: World, work_dir, termination_log) -> dict[str, Any]:
    """What a rank other than 0 changes in the trainer settings: no status patches, no metrics endpoint (one series
    per job), no previews, no progress bar, its own work folder beside rank 0's (same pod, same /work), and the
    termination message left to the first rank of its pod. It always starts from rank 0's preparation."""
    if world.main:
        return {}
    return {
        "work_dir": work_dir / f"rank-{world.rank}",
        "metrics_port": 0,
        "report_status": False,
        "preview_steps": 0,
        "show_progress": False,
        "prepared": True,
        "termination_log": termination_log if world.local_rank == 0 else None,
    }


def quiet_other_ranks(world: World) -> None:
    """Progress is logged once, by rank 0; the other ranks log only warnings and errors, naming their rank."""
    if world.main:
        return
    logging.getLogger("kontext_trainer").setLevel(logging.WARNING)
    log.warning("%s: logging warnings and errors only (rank 0 reports progress)", world.describe())
