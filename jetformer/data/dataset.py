"""Torch dataset over the prepared Arrow shards (memory-mapped; nothing is loaded up front).

With `rank`/`world_size`, worker `rank` sees the examples `rank, rank + world_size, ...` of the
split: the parts are disjoint and together cover the split.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch


def read_metadata(prepared_dir: str | Path) -> dict:
    """`metadata.json` of a prepared directory: `classes`, `num_train`, `num_val`, `shards`, ..."""
    path = Path(prepared_dir) / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the `prepare` stage first "
                                "(dvc repro prepare)")
    return json.loads(path.read_text())


class ArrowImageDataset(torch.utils.data.Dataset):
    """Items `{"id", "image" uint8 [H, W, 3], "label", "captions", "qa", "attributes"}` (api.md)."""

    def __init__(self, prepared_dir: str | Path, split: str, rank: int = 0, world_size: int = 1,
                 flip: bool = False, generator: torch.Generator | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.prepared_dir, self.split = Path(prepared_dir), split
        meta = read_metadata(prepared_dir)
        if split not in meta["shards"]:
            raise ValueError(f"unknown split {split!r}; prepared splits: {sorted(meta['shards'])}")
        self.classes = meta["classes"]
        self.image_shape = tuple(meta["image_shape"])          # (H, W, 3)
        self.paths = [self.prepared_dir / split / f for f in meta["shards"][split]]
        self.flip, self.generator = flip, generator
        self._tables = self._pixels = None
        sizes = [self._open(p).num_rows for p in self.paths]   # footers only (memory-mapped)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_total = int(self._offsets[-1])
        self.indices = np.arange(rank, self.num_total, world_size)  # this worker's part

    @staticmethod
    def _open(path: Path) -> pa.Table:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()

    def _table(self, shard: int) -> pa.Table:
        if self._tables is None:      # opened lazily (also after pickling into a DataLoader worker)
            self._tables = [self._open(p) for p in self.paths]
            self._pixels = [None] * len(self.paths)
        return self._tables[shard]

    def _shard_pixels(self, shard: int) -> np.ndarray:
        """Read-only uint8 [rows, H, W, 3] view of a shard's memory-mapped image column."""
        table = self._table(shard)
        if self._pixels[shard] is None:
            col = table.column("image")
            chunk = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
            values = chunk.flatten().to_numpy(zero_copy_only=True)
            self._pixels[shard] = values.reshape((len(chunk),) + self.image_shape)
        return self._pixels[shard]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tables"] = state["_pixels"] = None
        return state

    def __len__(self) -> int:
        return len(self.indices)

    def _locate(self, i: int) -> tuple[int, int]:
        g = int(self.indices[i])
        shard = int(np.searchsorted(self._offsets, g, side="right") - 1)
        return shard, g - int(self._offsets[shard])

    def image_array(self, i: int) -> np.ndarray:
        """Read-only uint8 [H, W, 3] view of item `i`'s image (no copy)."""
        shard, row = self._locate(i)
        return self._shard_pixels(shard)[row]

    def __getitem__(self, i: int) -> dict:
        return self.item(i, self.generator)

    def item(self, i: int, generator: torch.Generator | None = None) -> dict:
        """Item `i`, its flip (when `flip`) drawn from `generator` (the training loader passes
        one seeded by the batch's position, so a batch is the same in any worker process)."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        shard, row = self._locate(i)
        t = self._table(shard)
        image = torch.from_numpy(self.image_array(i).copy())      # [H, W, 3] uint8
        if self.flip and torch.rand((), generator=generator) < 0.5:
            image = image.flip(1)
        attributes = t.column("attributes")[row].as_py()
        return {"id": t.column("id")[row].as_py(), "image": image,
                "label": int(t.column("label")[row].as_py()),
                "captions": t.column("captions")[row].as_py() or [],
                "qa": t.column("qa")[row].as_py() or [],
                "attributes": attributes or {}}

    def images(self, indices=None) -> torch.Tensor:
        """uint8 [N, H, W, 3] of this worker's items (all, or `indices`), without the flip."""
        idx = range(len(self)) if indices is None else indices
        return torch.from_numpy(np.stack([self.image_array(i) for i in idx]))

    def column(self, name: str) -> list:
        """Python values of column `name` (e.g. "captions", "qa") of this worker's items, in
        order."""
        known = self._table(0).column_names if self.paths else []
        if name not in known:
            raise ValueError(f"{self.prepared_dir / self.split}: no column {name!r} "
                             f"(columns: {known})")
        values = [v for shard in range(len(self.paths))
                  for v in self._table(shard).column(name).to_pylist()]
        return values if len(self) == self.num_total else [values[int(g)] for g in self.indices]

    def labels(self) -> torch.Tensor:
        """long [N] labels of this worker's items."""
        out = []
        for i in range(len(self)):
            shard, row = self._locate(i)
            out.append(self._table(shard).column("label")[row].as_py())
        return torch.tensor(out, dtype=torch.long)
