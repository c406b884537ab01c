"""Batches from the tokenized arrays, with numpy alone (this runs inside the training runtime).

Samples are grouped by length to cut padding: each epoch shuffles, cuts the order into mega-batches of
`group` batches, sorts each mega-batch by length, slices it into batches, and shuffles the batch order.
No packing: every row is one sample, so samples never attend to each other.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


class Split:
    def __init__(self, path):
        with np.load(path) as z:
            self.tokens = z["tokens"]
            self.loss_mask = z["loss_mask"]
            self.offsets = z["offsets"]
            self.lines = z["lines"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def length_grouped(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    batches = []
    mega = batch_size * group
    for start in range(0, len(order), mega):
        chunk = order[start:start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def sequential(n: int, batch_size: int) -> list[np.ndarray]:
    return [np.arange(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]


def collate(split: Split, indices: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded input_ids, attention_mask and labels (-100 where no loss) for the rows `indices`."""
    lengths = split.lengths[indices]
    width = int(lengths.max())
    ids = np.full((len(indices), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(indices), width), dtype=np.int64)
    labels = np.full((len(indices), width), IGNORE_INDEX, dtype=np.int64)
    for row, i in enumerate(indices):
        a, b = split.offsets[i], split.offsets[i + 1]
        n = b - a
        ids[row, :n] = split.tokens[a:b]
        mask[row, :n] = 1
        labels[row, :n] = np.where(split.loss_mask[a:b], split.tokens[a:b], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1 - float(lengths.sum()) / padded
