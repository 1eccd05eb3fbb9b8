"""Training batches of one worker, built ahead of the step by a torch `DataLoader`.

`BatchStream` fixes the order: a fresh permutation of the worker's part every epoch, drawn from
(seed, rank, epoch), so the position (epoch, offset) is the whole state. `BatchLoader` builds
the batches at those positions in `workers` background processes (0 = in this process), with
`prefetch` batches per process in flight and pinned memory for a CUDA step. Each batch's
randomness (caption choice, flip) comes from a generator seeded by (seed, rank, position), so a
batch depends only on its position: the same with any number of workers, and a run resumed
from the position after its last consumed batch continues with exactly the batches it would
have seen. Ranks read disjoint parts (`ArrowImageDataset(rank, world_size)`).
"""
from __future__ import annotations

import torch


class BatchStream:
    """Indices of one worker's part, `batch` at a time, in a fresh permutation every epoch.

    The position (epoch, offset) is the whole state: the permutation of an epoch is drawn from
    (seed, rank, epoch), so a resumed run continues with exactly the batches it would have seen.
    """

    def __init__(self, num_items: int, batch: int, seed: int, rank: int):
        if num_items <= 0:
            raise ValueError(f"worker {rank} has no training examples (the train split is "
                             "smaller than train.num_workers?)")
        self.num_items, self.batch, self.seed, self.rank = num_items, batch, seed, rank
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + epoch)
        return torch.randperm(self.num_items, generator=g)

    def next(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch:
            take = min(self.batch - len(out), self.num_items - self.offset)
            out += self._perm[self.offset:self.offset + take].tolist()
            self.offset += take
            if self.offset == self.num_items:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation(self.epoch)


def make_batch(items: list[dict], conditioning: str, tokenizer, max_text_len: int,
               generator: torch.Generator) -> dict:
    """Dataset items -> a model batch (one random caption per image for text models)."""
    if conditioning == "class":
        return {"images": torch.stack([it["image"] for it in items]),
                "labels": torch.tensor([it["label"] for it in items], dtype=torch.long)}
    from jetformer.data.batching import caption_batch
    return caption_batch(items, tokenizer, max_text_len, generator)


class _Positions(torch.utils.data.Sampler):
    """Endless (position before, indices, position after) of a `BatchStream` (main process)."""

    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __iter__(self):
        while True:
            before = self.stream.state()
            indices = tuple(self.stream.next())
            yield before, indices, self.stream.state()


class _Batches(torch.utils.data.Dataset):
    """A position's batch (run in the loader's worker processes)."""

    def __init__(self, dataset, conditioning: str, tokenizer, max_text_len: int, seed: int,
                 rank: int):
        self.dataset, self.conditioning, self.tokenizer = dataset, conditioning, tokenizer
        self.max_text_len, self.seed, self.rank = max_text_len, seed, rank

    def __getitem__(self, key) -> tuple[dict, dict]:
        before, indices, after = key
        g = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.rank * 10_007 + before["epoch"]) * 2_000_029
            + before["offset"])
        items = [self.dataset.item(i, g) for i in indices]
        return make_batch(items, self.conditioning, self.tokenizer, self.max_text_len, g), after


class BatchLoader:
    """Iterator of `(batch, position after it)` for one worker, starting at `position`.

    dataset: the worker's `ArrowImageDataset` part; batch: local batch size; workers: loader
    processes (0 = build each batch in this process when asked); prefetch: batches in flight
    per process; pin_memory: page-locked batches (for a non-blocking copy to a GPU).
    """

    def __init__(self, dataset, batch: int, *, seed: int, rank: int, conditioning: str,
                 tokenizer, max_text_len: int, position: dict | None = None, workers: int = 0,
                 prefetch: int = 2, pin_memory: bool = False):
        if workers < 0 or prefetch < 1:
            raise ValueError(f"BatchLoader: workers must be >= 0 and prefetch >= 1, got "
                             f"workers={workers}, prefetch={prefetch}")
        stream = BatchStream(len(dataset), batch, seed, rank)
        if position is not None:
            stream.load_state(position)
        extra = {"prefetch_factor": prefetch, "persistent_workers": True} if workers else {}
        self._loader = torch.utils.data.DataLoader(
            _Batches(dataset, conditioning, tokenizer, max_text_len, seed, rank),
            batch_size=None, sampler=_Positions(stream), num_workers=workers,
            pin_memory=pin_memory,
            # its own generator: starting a loader must not draw from the global RNG (dropout)
            generator=torch.Generator().manual_seed(seed * 10_007 + rank), **extra)
        self._it = iter(self._loader)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict, dict]:
        batch, after = next(self._it)
        return batch, {"epoch": int(after["epoch"]), "offset": int(after["offset"])}

    def close(self) -> None:
        """Stop the worker processes (also done when the loader is garbage-collected)."""
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
