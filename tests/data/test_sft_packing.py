"""Pack planning against brute-force references: a naive O(n^2) best-fit decreasing that scans every row for
every document, and a plain next-fit loop for `sequential`."""
import time

import numpy as np
import pytest

from mindpretrain.data.sft_packing import (DocumentTooLongError, one_document_per_row, pack_documents)


def offered_order(count, shuffle, seed):
    """The order the documents are offered in (the packer's documented seeded permutation)."""
    return list(np.random.RandomState(seed).permutation(count)) if shuffle else list(range(count))


def brute_force_bfd(lengths, seq_length, shuffle=False, seed=0):
    """Longest first (ties in offered order); each document into the open row with the least free space that
    still fits it, ties to the earliest row; otherwise a new row. Every row is scanned for every document."""
    offered = offered_order(len(lengths), shuffle, seed)
    ranked = sorted(range(len(offered)), key=lambda position: (-lengths[offered[position]], position))
    rows, free = [], []
    for position in ranked:
        document = int(offered[position])
        size = int(lengths[document])
        best = None
        for row in range(len(rows)):
            if free[row] >= size and (best is None or free[row] < free[best]):
                best = row
        if best is None:
            rows.append([])
            free.append(seq_length)
            best = len(rows) - 1
        rows[best].append(document)
        free[best] -= size
    return rows


def brute_force_sequential(lengths, seq_length, shuffle=False, seed=0):
    rows = [[]]
    for document in offered_order(len(lengths), shuffle, seed):
        if sum(int(lengths[d]) for d in rows[-1]) + int(lengths[document]) > seq_length:
            rows.append([])
        rows[-1].append(int(document))
    return rows if rows[0] else []


def random_lengths(seed, count, seq_length):
    rng = np.random.RandomState(seed)
    kind = seed % 3
    if kind == 0:
        return rng.randint(1, seq_length + 1, size=count)
    if kind == 1:   # many equal lengths: exercises the tie rules
        return rng.choice([1, seq_length // 4, seq_length // 3, seq_length // 2, seq_length], size=count)
    return np.clip(np.round(rng.lognormal(np.log(seq_length / 6), 0.9, size=count)), 1, seq_length).astype(int)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("shuffle", [False, True])
def test_bfd_equals_brute_force(seed, shuffle):
    seq_length = [7, 16, 64, 100][seed % 4]
    lengths = random_lengths(seed, 150, seq_length)
    plan = pack_documents(lengths, seq_length, "bfd", shuffle_before_pack=shuffle, seed=seed)
    assert plan.rows() == brute_force_bfd(lengths, seq_length, shuffle, seed)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shuffle", [False, True])
def test_sequential_equals_brute_force(seed, shuffle):
    seq_length = [5, 32, 64][seed % 3]
    lengths = random_lengths(seed, 120, seq_length)
    plan = pack_documents(lengths, seq_length, "sequential", shuffle_before_pack=shuffle, seed=seed)
    assert plan.rows() == brute_force_sequential(lengths, seq_length, shuffle, seed)


@pytest.mark.parametrize("strategy", ["bfd", "sequential"])
def test_every_document_once_rows_fit_and_efficiency(strategy):
    seq_length = 512
    lengths = random_lengths(2, 3000, seq_length)
    plan = pack_documents(lengths, seq_length, strategy, shuffle_before_pack=True, seed=5)
    rows = plan.rows()
    assert sorted(d for row in rows for d in row) == list(range(len(lengths)))
    assert all(0 < sum(lengths[d] for d in row) <= seq_length for row in rows)
    assert plan.num_rows == len(rows) >= -(-int(lengths.sum()) // seq_length)
    assert plan.efficiency == pytest.approx(int(lengths.sum()) / (len(rows) * seq_length))


def test_plan_is_deterministic_and_the_seed_matters():
    lengths = random_lengths(0, 400, 64)
    first = pack_documents(lengths, 64, "bfd", True, 3)
    assert first.rows() == pack_documents(lengths, 64, "bfd", True, 3).rows()
    assert first.rows() != pack_documents(lengths, 64, "bfd", True, 4).rows()


def test_unpacked_plan_is_one_document_per_row():
    lengths = np.array([3, 8, 1, 5])
    plan = one_document_per_row(lengths, 8)
    assert plan.rows() == [[0], [1], [2], [3]]
    assert plan.efficiency == pytest.approx(17 / 32)


@pytest.mark.parametrize("lengths, document, length", [([4, 9, 3], 1, 9), ([4, 2, 0, 3], 2, 0)])
@pytest.mark.parametrize("strategy", ["bfd", "sequential"])
def test_overlong_or_empty_document_is_named(strategy, lengths, document, length):
    with pytest.raises(DocumentTooLongError, match=f"document {document} \\({length} tokens\\)") as caught:
        pack_documents(lengths, 8, strategy)
    assert (caught.value.document, caught.value.length, caught.value.seq_length) == (document, length, 8)


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="pack_strategy 'ffd' must be one of"):
        pack_documents([1, 2], 8, "ffd")


def test_bfd_is_not_quadratic():
    """200k documents: an O(n^2) scan would take hours; the planner takes well under a second per 1e5."""
    rng = np.random.RandomState(0)
    lengths = np.clip(np.round(rng.lognormal(np.log(600), 1.0, 200_000)), 1, 4096).astype(np.int64)
    start = time.perf_counter()
    plan = pack_documents(lengths, 4096, "bfd", True, 1)
    assert time.perf_counter() - start < 20
    assert plan.efficiency > 0.99
