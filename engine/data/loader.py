"""The training data loader: resumable epoch batches, corrupt-file skipping, masks made in workers.

Every random choice is drawn from a seed that is a pure function of (run seed, epoch, batch
position) — the sample order, each sample's augmentation, the audio crop and the K masks per
sample — so the data position (epoch, batch) is all a checkpoint needs to resume exactly, with
any number of workers. Masks are made in the collater, i.e. in the loader workers, so the GPU
never waits on them (as the reference precomputes them in its data loader).

Under data parallelism every rank walks the same global batch sequence and reads every W-th batch
of it (rank r: batches r, r + W, ...), whole batches with their single-process seeds; the position
stored is that of the next global batch, the same on every rank (``position_after``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch

from d2v2.models import mask_to_ids

from .audio import crop_batch
from .base import CorruptSample, derive_seed

class Masker(Protocol):
    """What the collater needs of a method's modality (``d2v2.models.Modality``)."""

    def make_masks(self, batch_size: int, source: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """bool [batch_size * clones, N] masks, True = masked, clone-major, equal counts per row."""
        ...


@dataclass(slots=True)
class DataPosition:
    """Where the loader stands: the next batch to read is batch ``batch`` of epoch ``epoch``."""

    epoch: int = 0
    batch: int = 0


def position_after(epoch: int, batch: int, rank: int = 0, world_size: int = 1) -> DataPosition:
    """Where every rank resumes once ``rank`` has read global batch ``batch`` of ``epoch``.

    Ranks read in groups of ``world_size`` consecutive global batches (rank r the r-th of each), so
    the position after a group is the same on every rank: the group's start plus ``world_size``.
    """
    return DataPosition(epoch, batch - rank + world_size)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Endless batches of ``(index, sample seed, epoch, batch position)``, epoch after epoch.

    ``sizes`` given (audio): batches are built by total samples — utterances sorted by length
    (random tie-breaks), grouped so that ``count * min(longest, max_samples) <= max_tokens``, and
    the batch order shuffled per epoch. Otherwise fixed ``batch_size`` batches of a per-epoch
    permutation, the last partial batch dropped.

    With ``world_size`` W > 1, rank ``rank`` yields every W-th of those batches: from the start
    position p of an epoch (0 after the first), batches p + r, p + r + W, ... in groups of W that
    never span two epochs (the epoch's last (batches - p) mod W batches are left out). The batch
    positions in the tuples stay global.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        batch_size: int | None = None,
        sizes: Sequence[int] | None = None,
        max_tokens: int | None = None,
        max_samples: int | None = None,
        start: DataPosition | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size) with world_size >= 1, got rank {rank} of world_size {world_size}")
        if (batch_size is None) == (sizes is None):
            raise ValueError("give either batch_size (fixed batches) or sizes + max_tokens (batches by total samples)")
        if batch_size is not None and not 1 <= batch_size <= num_samples:
            raise ValueError(
                f"batch size {batch_size} must be between 1 and the {num_samples} samples of the data set; "
                f"lower it with --set data.batch_size=N (N <= {num_samples}) or give more data"
            )
        self.num_samples, self.seed, self.batch_size = num_samples, seed, batch_size
        self.sizes = None if sizes is None else np.minimum(np.asarray(sizes), max_samples or np.iinfo(np.int64).max)
        self.max_tokens = max_tokens
        if self.sizes is not None and (max_tokens is None or max_tokens < self.sizes.min()):
            raise ValueError(
                f"max_tokens={max_tokens} is smaller than the shortest utterance ({int(self.sizes.min())} samples); raise it"
            )
        self.start = start or DataPosition()
        self.rank, self.world_size = rank, world_size

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng(derive_seed(self.seed, "order", epoch))
        if self.sizes is None:
            order = rng.permutation(self.num_samples)
            n = self.num_samples // self.batch_size
            return [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n)]
        order = np.lexsort((rng.random(self.num_samples), self.sizes))  # by length, random ties
        batches, current = [], []
        for idx in order:  # ascending length: the newcomer is the batch's longest
            if current and (len(current) + 1) * self.sizes[idx] > self.max_tokens:
                batches.append(np.asarray(current))
                current = []
            current.append(idx)
        if current:
            batches.append(np.asarray(current))
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        epoch, position = self.start.epoch, self.start.batch
        while True:
            batches = self.epoch_batches(epoch)
            if len(batches) < self.world_size:
                hint = f", fewer than the {self.world_size} processes" if self.world_size > 1 else ""
                what = "--set data.batch_size=N" if self.sizes is None else "--set data.max_tokens=N"
                raise ValueError(
                    f"the data set yields {len(batches)} batch(es) per epoch{hint}; lower the batch size ({what})"
                    + (" or the number of processes" if self.world_size > 1 else "")
                )
            end = position + (len(batches) - position) // self.world_size * self.world_size
            for b in range(position + self.rank, end, self.world_size):
                yield [(int(i), derive_seed(self.seed, "sample", epoch, int(i)), epoch, b) for i in batches[b]]
            epoch, position = epoch + 1, 0

    def __len__(self) -> int:  # this rank's batches per (full) epoch
        return len(self.epoch_batches(0)) // self.world_size


def close_batches(batches) -> None:
    """End a DataLoader iterator's worker processes now, whatever state the run ends in.

    Left to the garbage collector, a failed run's iterator (held by its traceback) outlives the
    main code: at interpreter exit torch no longer shuts workers down, and multiprocessing's exit
    hook sends them SIGTERM, which they ignore (``signals.ignore_in_worker``), then waits for them
    forever. So the trainer closes its iterator itself; a worker still there after torch's own
    shutdown (which waits a few seconds for it) is busy with a sample nobody will use: it is killed.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # multi-process iterators only
    if shutdown is None:
        return
    workers = list(getattr(batches, "_workers", ()))
    shutdown()
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(timeout=5.0)


class SkipCorrupt(torch.utils.data.Dataset):
    """Wraps a data set so that an unreadable sample becomes a marker instead of an exception."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed, epoch, batch = item
        try:
            sample = self.dataset[(index, seed)]
        except CorruptSample as e:
            return {"corrupt": e.path, "reason": str(e), "epoch": epoch, "batch": batch}
        sample["epoch"], sample["batch"] = epoch, batch
        return sample


class MaskingCollater:
    """Stack a batch, crop audio to its shortest clip, and make the masks of every sample.

    Output: {"source": [B, ...], "mask": bool [B*clones, N] (rows i*clones .. i*clones+clones-1
    belong to sample i), "ids_keep": int64 [B*clones, kept] (sorted), "label"?: [B],
    "skipped": [paths], "epoch", "batch"}. The ``masker`` (the method's modality) decides N from
    the (cropped) source and the number of clones; None makes no masks.
    """

    def __init__(self, seed: int, masker: Masker | None, crop_audio_to: int | None = None):
        self.seed, self.masker, self.crop_audio_to = seed, masker, crop_audio_to

    def __call__(self, items: list[dict]) -> dict:
        good = [it for it in items if "corrupt" not in it]
        epoch, batch = items[0]["epoch"], items[0]["batch"]
        out: dict = {"skipped": [it["corrupt"] for it in items if "corrupt" in it], "epoch": epoch, "batch": batch}
        if not good:
            return out
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "batch", epoch, batch))
        if self.crop_audio_to is not None:
            out["source"] = crop_batch([it["source"] for it in good], self.crop_audio_to, generator)
        else:
            out["source"] = torch.stack([it["source"] for it in good])
        if "label" in good[0]:
            out["label"] = torch.tensor([it["label"] for it in good])
        if self.masker is not None:
            out["mask"] = self.masker.make_masks(len(good), out["source"], generator)
            out["ids_keep"] = mask_to_ids(out["mask"])  # here, so the model needs no host sync
        return out
