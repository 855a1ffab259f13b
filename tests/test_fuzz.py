"""Seeded mutation fuzzing of every kind of winnow file (see fuzz_cases.py): each mutated file
reads back exactly, or raises a winnow error; never anything else, never different content."""

import pytest
from fuzz_cases import KINDS, fuzz


@pytest.mark.parametrize("kind", KINDS)
def test_mutated_files_are_errors_or_identical(kind, request, tmp_path):
    count = request.config.getoption("--fuzz-count")
    outcomes = fuzz(kind, count, seed=2026, directory=tmp_path)
    assert sum(outcomes.counts.values()) == count
    assert outcomes.counts["other"] == 0, outcomes.others[:5]
    assert outcomes.counts["error"] > 0  # the mutations do reach the readers
    assert outcomes.peak_growth < 64 << 20  # no case makes the process grow by 64 MiB
