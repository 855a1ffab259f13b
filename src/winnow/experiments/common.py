"""What several experiments share: cached dataset loading."""

from __future__ import annotations

from functools import lru_cache

from winnow import data
from winnow.data import DataSplits


@lru_cache(maxsize=4)
def load_data(name: str, seed: int, limit: int | None) -> DataSplits:
    """The dataset ``name`` split with ``seed`` (validation split and any sampling), first
    ``limit`` examples of each split; cached, since a sweep reuses it run after run."""
    return data.load(name, seed=seed, limit=limit)
