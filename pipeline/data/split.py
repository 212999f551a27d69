"""Deterministic train/validation/test splits."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from pipeline.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Splits(Generic[T]):
    train: list[T]
    validation: list[T]
    test: list[T]


def split_records(records: Sequence[T], val_fraction: float, test_fraction: float, seed: int) -> Splits[T]:
    """Shuffle-split `records` into train/validation/test; each split keeps the original order.

    Sizes are round(n * fraction). The permutation comes from `random.Random(seed)` seeded with an int,
    which does not depend on PYTHONHASHSEED, so a seed gives the same split in every process.
    """
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {frac}. Fix: use e.g. 0.05.")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data. "
            "Fix: make their sum < 1."
        )
    n = len(records)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    test_idx = sorted(order[:n_test])
    val_idx = sorted(order[n_test : n_test + n_val])
    train_idx = sorted(order[n_test + n_val :])
    return Splits(
        train=[records[i] for i in train_idx],
        validation=[records[i] for i in val_idx],
        test=[records[i] for i in test_idx],
    )


def regime_splits(
    train: Sequence[T], student_records: int | None, teacher_train: str, seed: int
) -> tuple[list[T], list[T]]:
    """(students' training records, teacher's training records) of the teacher-knows-more regime.

    `student_records` None: both are the whole training split. Otherwise the students get a seeded subset of
    that many records (original order kept) and the teacher "all" of `train` or the "rest". The subset's
    seed is offset from the split's so it is not the first records of the same permutation.
    """
    if student_records is None:
        return list(train), list(train)
    if student_records >= len(train):
        raise ConfigError(
            f"data.student_train_records={student_records} leaves nothing beyond the students' records in "
            f"a training split of {len(train)}. Fix: lower it, or raise data.num_demo_records."
        )
    order = list(range(len(train)))
    random.Random(seed + 1_000_003).shuffle(order)
    chosen = set(order[:student_records])
    students = [r for i, r in enumerate(train) if i in chosen]
    teacher = list(train) if teacher_train == "all" else [r for i, r in enumerate(train) if i not in chosen]
    return students, teacher
