"""Length-grouped batching: shuffled batches of rows of similar length (less padding per batch)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Yields a permutation of row indices in which every run of `batch_size` rows has similar lengths.

    Each epoch: shuffle all rows (seeded by `seed` and the epoch number), cut the order into mega-batches of
    `batch_size * group_factor` rows, sort each mega-batch by length (longest first), then shuffle the order of the
    resulting batches (the batch holding the longest row goes first, so an out-of-memory shows up at once; a short
    last batch stays last). The same seed and
    epoch give the same order on every process, which distributed batch sharding relies on."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_factor: int = 50) -> None:
        if batch_size < 1 or group_factor < 1:
            raise ValueError(f"batch_size = {batch_size} and group_factor = {group_factor} must be >= 1")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_factor = group_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of epoch `epoch` on the next iteration (iteration also advances it by one)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def order(self, epoch: int) -> list[int]:
        """The index order of `epoch`."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.lengths), generator=generator).tolist()
        mega = self.batch_size * self.group_factor
        batches: list[list[int]] = []
        for start in range(0, len(perm), mega):
            group = sorted(perm[start : start + mega], key=lambda i: -self.lengths[i])
            batches.extend(group[j : j + self.batch_size] for j in range(0, len(group), self.batch_size))
        # A short last batch stays last: the loader cuts the order every batch_size rows.
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        if len(batches) > 1:
            longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
            batches[0], batches[longest] = batches[longest], batches[0]
            rest = torch.randperm(len(batches) - 1, generator=generator).tolist()
            batches = [batches[0]] + [batches[1 + r] for r in rest]
        return [i for batch in batches + tail for i in batch]

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        self.epoch += 1
        return iter(order)
