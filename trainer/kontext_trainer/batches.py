"""Which pairs form each micro-batch: shuffled every epoch, never mixing resolution buckets; and which of their
captions are dropped.

With several training resolutions every pair is one sample per resolution (`data.dataset.training_samples`), each
in its own bucket, so an epoch holds pairs x resolutions samples and a batch holds one resolution. The order and the
dropped captions are pure functions of (seed, micro-batch index), so a resumed run draws exactly the batches the
uninterrupted run would have, without saving any sampler state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .encoding import EncodedPair, TextEmbedding

_MIX = 1_000_003


class BatchSchedule:
    def __init__(self, buckets: Sequence[Hashable], batch_size: int, seed: int):
        if not buckets:
            raise ValueError("no training pairs")
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.seed = seed
        groups: dict[Hashable, int] = {}
        for bucket in self.buckets:
            groups[bucket] = groups.get(bucket, 0) + 1
        # Batches per epoch do not depend on the shuffle: ceil(pairs in bucket / batch size), summed.
        self.batches_per_epoch = sum(-(-count // batch_size) for count in groups.values())

    @lru_cache(maxsize=2)  # noqa: B019 - one schedule per run; caches the current and next epoch
    def epoch(self, epoch: int) -> tuple[tuple[int, ...], ...]:
        generator = torch.Generator().manual_seed((self.seed * _MIX + epoch) % 2**63)
        order = torch.randperm(len(self.buckets), generator=generator).tolist()
        by_bucket: dict[Hashable, list[int]] = {}
        for index in order:
            by_bucket.setdefault(self.buckets[index], []).append(index)
        batches = [
            tuple(group[start : start + self.batch_size])
            for group in by_bucket.values()
            for start in range(0, len(group), self.batch_size)
        ]
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return tuple(batches[i] for i in shuffle)

    def batch(self, micro_batch: int) -> tuple[int, ...]:
        """Indices of the pairs in micro-batch number `micro_batch` (0-based, counted over the whole run)."""
        epoch, position = divmod(micro_batch, self.batches_per_epoch)
        return self.epoch(epoch)[position]


def micro_batch_generator(seed: int, micro_batch: int) -> torch.Generator:
    """The CPU generator that draws one micro-batch's noise and timesteps."""
    return torch.Generator().manual_seed((seed * _MIX + 17 + micro_batch * 7919) % 2**63)


@dataclasses.dataclass(frozen=True)
class CaptionDropout:
    """Replaces each sample's caption embedding by `dropped`'s with `probability`, drawn per micro-batch from a
    generator of its own (the noise and timestep draws do not change when dropout is turned on)."""

    probability: float
    seed: int
    dropped: TextEmbedding | None = None

    def __post_init__(self) -> None:
        if self.probability > 0 and self.dropped is None:
            raise ValueError("caption dropout needs the dropped caption's embedding")

    def mask(self, micro_batch: int, size: int) -> list[bool]:
        if self.probability <= 0:
            return [False] * size
        generator = torch.Generator().manual_seed((self.seed * _MIX + 31 + micro_batch * 104_729) % 2**63)
        return (torch.rand(size, generator=generator) < self.probability).tolist()

    def apply(self, items: list[EncodedPair], micro_batch: int) -> list[EncodedPair]:
        if self.probability <= 0:
            return items
        return [
            dataclasses.replace(item, text=self.dropped) if drop else item
            for item, drop in zip(items, self.mask(micro_batch, len(items)), strict=True)
        ]
