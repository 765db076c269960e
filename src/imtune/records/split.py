"""The one train/held-out split, used by `imtune train` (val_fraction) and `imtune compare`.

A seeded permutation of record positions decides which records are held out; both parts keep the file's order, so
the same seed holds out the same records for every objective and every training seed. An optional `n_train` keeps
a seeded random subset of the rest (the next positions of the same permutation), so smaller sizes are nested in
larger ones: the advisor study's n=8 set is part of its n=16 set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from imtune.errors import ImtuneError

T = TypeVar("T")


def n_heldout(n_records: int, fraction: float) -> int:
    return max(1, round(n_records * fraction))


def holdout_split(records: Sequence[T], n_val: int, seed: int, n_train: int | None = None,
                  source: str = "data") -> tuple[list[T], list[T]]:
    """(train, held-out): `n_val` records held out (0 for none), the rest (or `n_train` of it) for training."""
    if n_val >= len(records) and n_val > 0:
        raise ImtuneError(f"{source}: {len(records)} records are too few to hold out {n_val} and train on the rest")
    order = np.random.default_rng(seed).permutation(len(records))
    held = order[:n_val]
    rest = order[n_val:] if n_train is None else order[n_val:n_val + n_train]
    return [records[i] for i in np.sort(rest)], [records[i] for i in np.sort(held)]
