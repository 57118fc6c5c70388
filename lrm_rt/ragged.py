"""Vectorised loops over ragged ranges: item i owns counts[i] consecutive slots (a triangle's cells, a face's texel
rows), enumerated at once with numpy, in chunks so the temporaries stay bounded."""
from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np


def expand(counts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(owner, local) for every slot: owner = the item's index, local = 0 .. counts[owner] - 1."""
    counts = np.asarray(counts, np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    return owner, np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)


def chunks(cost: np.ndarray, budget: int) -> Iterator[slice]:
    """Consecutive slices of the items whose summed cost stays within budget (one item at least per slice)."""
    total = np.cumsum(cost)
    start = 0
    while start < len(total):
        done = total[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(total, done + budget, "right")))
        yield slice(start, stop)
        start = stop
