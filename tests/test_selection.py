"""Selection: exact top-k, ties, scopes, current masks, guards, errors."""

import pytest
import torch

from winnow import Masks
from winnow.core.densities import check_sparsity, exponential_densities
from winnow.core.selection import select


def scores_of(*tensors):
    return {f"l{i}": t for i, t in enumerate(tensors)}


def test_global_topk_is_exact_and_crosses_layers():
    scores = scores_of(torch.tensor([5.0, 1.0, 3.0]), torch.tensor([[4.0, 0.0], [2.0, 6.0]]))
    masks = select(scores, 3 / 7)
    assert masks["l0"].tolist() == [True, False, False]
    assert masks["l1"].tolist() == [[True, False], [False, True]]
    assert masks.num_kept() == 3


def test_per_layer_scope_and_density_mapping():
    scores = scores_of(torch.arange(10.0), torch.arange(4.0).flip(0))
    masks = select(scores, 0.5, scope="layer")
    assert masks["l0"].tolist() == [False] * 5 + [True] * 5
    assert masks["l1"].tolist() == [True, True, False, False]
    mapped = select(scores, {"l0": 0.2, "l1": 1.0})
    assert mapped["l0"].sum() == 2 and mapped["l1"].all()


def test_ties_are_broken_by_position_and_count_is_exact():
    scores = scores_of(torch.ones(10), torch.ones(10))
    masks = select(scores, 0.25)
    assert masks.num_kept() == 5
    assert masks["l0"].tolist() == [True] * 5 + [False] * 5
    assert select(scores, 0.25) == masks  # deterministic


def test_dead_weights_are_never_revived():
    current = Masks({"l0": torch.tensor([True, False, True, False, True, True])})
    scores = {"l0": torch.tensor([0.0, 100.0, 1.0, 100.0, 2.0, 3.0])}
    masks = select(scores, 2 / 6, current=current)
    assert masks["l0"].tolist() == [False, False, False, False, True, True]
    with pytest.raises(ValueError, match="only 4 are still alive"):
        select(scores, 5 / 6, current=current)


def test_nan_scores_are_an_error_naming_the_tensor_unless_ranked_lowest():
    from winnow.core.scores import NonFiniteError

    scores = {"ok": torch.full((3,), 0.5), "l0": torch.tensor([float("nan"), 1.0, 2.0])}
    with pytest.raises(NonFiniteError, match="scores of 'l0' \\(1\\)"):
        select(scores, 2 / 3)
    with pytest.raises(NonFiniteError, match="'l0'"):
        select({"l0": torch.tensor([float("inf"), 1.0, 2.0])}, 2 / 3, scope="layer")
    kept = select(scores, 4 / 6, nonfinite="lowest")["l0"]
    assert kept.tolist() == [False, True, True]
    # a NaN among the weights already pruned is never read, so it is no error
    alive = torch.tensor([False, True, True])
    current = Masks({"ok": torch.ones(3, dtype=torch.bool), "l0": alive})
    assert select(scores, 3 / 6, current=current).num_kept() == 3
    with pytest.raises(ValueError, match="nonfinite"):
        select(scores, 0.5, nonfinite="ignore")


def test_min_per_layer_guard_prevents_collapse():
    scores = scores_of(torch.full((100,), 10.0), torch.full((100,), 0.1))
    plain = select(scores, 0.05)
    assert plain.collapsed_layers() == ["l1"]
    guarded = select(scores, 0.05, min_per_layer=2)
    assert guarded.collapsed_layers() == []
    assert guarded.num_kept() == 10 and int(guarded["l1"].sum()) == 2


def test_density_zero_and_one():
    scores = scores_of(torch.rand(7), torch.rand(3))
    assert select(scores, 0.0).num_kept() == 0
    assert select(scores, 1.0).num_kept() == 10


@pytest.mark.parametrize("density", [-0.1, 1.5, float("nan")])
def test_bad_density(density):
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        select(scores_of(torch.rand(4)), density)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown scope"):
        select(scores_of(torch.rand(4)), 0.5, scope="row")
    with pytest.raises(ValueError, match="no scores"):
        select({}, 0.5)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        check_sparsity(1.0)


def test_exponential_densities():
    ds = exponential_densities(0.01, 4)
    assert len(ds) == 4 and ds[-1] == pytest.approx(0.01)
    assert ds[0] == pytest.approx(0.01**0.25)
    assert all(a > b for a, b in zip(ds, ds[1:], strict=False))


def reference_select(scores, k, alive):
    """Sort-based reference: the k best alive entries, ties by position (tensor, then index)."""
    flat = torch.cat([s.flatten().double() for s in scores.values()])
    ok = torch.cat([a.flatten() for a in alive.values()])
    index = torch.arange(flat.numel())
    order = sorted(index[ok].tolist(), key=lambda i: (-flat[i].item(), i))[:k]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order] = True
    out, offset = {}, 0
    for name, s in scores.items():
        out[name] = keep[offset : offset + s.numel()].reshape(s.shape)
        offset += s.numel()
    return Masks(out)


@pytest.mark.parametrize("sample_size", [1 << 16, 8])
def test_large_selection_equals_sorting(monkeypatch, sample_size):
    """The sampled-bracket threshold (and its fallback) is exact, ties and dead weights included."""
    import winnow.core._topk as topk

    monkeypatch.setattr(topk, "EXACT_BELOW", 1000)
    monkeypatch.setattr(topk, "SAMPLE_SIZE", sample_size)
    gen = torch.Generator().manual_seed(0)
    scores = {
        "a": (torch.rand(300, 40, generator=gen) * 50).round(),  # many ties
        "b": torch.rand(5000, generator=gen),
        "c": (torch.rand(20, 30, generator=gen) * 50).round(),
    }
    current = Masks({n: torch.rand(s.shape, generator=gen) < 0.6 for n, s in scores.items()})
    for density in (0.3, 0.05, 0.001):
        k = round(density * sum(s.numel() for s in scores.values()))
        got = select(scores, density, current=current)
        assert got == reference_select(scores, k, current), density
        assert (got & ~current).num_kept() == 0


def test_alive_nan_never_loses_to_dead_weights():
    scores = {"w": torch.tensor([float("nan"), 5.0, float("-inf"), 1.0])}
    current = Masks({"w": torch.tensor([True, False, True, False])})
    kept = select(scores, 0.5, current=current, nonfinite="lowest")["w"]
    assert kept.tolist() == [True, False, True, False]


@pytest.mark.parametrize("scope,guard", [("global", 0), ("layer", 0), ("global", 3)])
def test_survivors_rounds_equal_repeated_select(monkeypatch, scope, guard):
    """Iterative selection on the compact survivors gives the masks a fresh select() would give
    round after round, with the sampled bracket in use (ties, NaN and dead weights included)."""
    import winnow.core._topk as topk
    from winnow.core._topk import Survivors

    monkeypatch.setattr(topk, "EXACT_BELOW", 500)
    gen = torch.Generator().manual_seed(1)
    shapes = {"a": (60, 50), "b": (4000,), "c": (7, 9)}
    survivors = Survivors(shapes)
    current = None
    for density in (0.7, 0.4, 0.2, 0.05, 0.01):
        scores = {n: (torch.rand(s, generator=gen) * 40).round() for n, s in shapes.items()}
        scores["b"][::97] = float("nan")
        removed = survivors.select(scores, density, scope, guard, nonfinite="lowest")
        expected = select(
            scores, density, scope, current=current, min_per_layer=guard, nonfinite="lowest"
        )
        assert survivors.masks() == expected, density
        before = current or Masks({n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()})
        for name, flat in removed.items():  # exactly the weights that died this round
            died = torch.nonzero((before[name] & ~expected[name]).flatten()).flatten()
            assert flat.tolist() == died.tolist()
        current = expected


def test_survivors_reject_mismatched_scores():
    from winnow.core._topk import Survivors

    survivors = Survivors({"w": (3, 4)})
    with pytest.raises(ValueError, match="shape"):
        survivors.select({"w": torch.rand(4, 3)}, 0.5)
    with pytest.raises(ValueError, match="different parameters"):
        survivors.select({"v": torch.rand(3, 4)}, 0.5)


def test_mixed_dtypes_and_infinities_select_quietly():
    import warnings

    scores = {
        "a": torch.tensor([1.0, 3.0, 2.0, float("inf"), -float("inf")], dtype=torch.bfloat16),
        "b": torch.tensor([5.0, 0.0], dtype=torch.float64),
        "c": torch.tensor([3e38, 3e38, float("nan")]),  # float32 whose sum overflows
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = select(scores, 5 / 10, nonfinite="lowest")
    assert masks["a"].tolist() == [False, True, False, True, False]
    assert masks["b"].tolist() == [True, False]
    assert masks["c"].tolist() == [True, True, False]


def test_channels_last_scores_select_like_contiguous_ones(monkeypatch):
    """Survivors read channels-last scores through their storage: same choices, round after
    round, as the same scores in the default layout."""
    import winnow.core._topk as topk
    from winnow.core._layout import flat_indices
    from winnow.core._topk import Survivors

    monkeypatch.setattr(topk, "EXACT_BELOW", 500)
    gen = torch.Generator().manual_seed(2)
    shapes = {"conv": (16, 8, 3, 3), "fc": (10, 50)}
    plain, strided = Survivors(shapes), Survivors(shapes)
    for density in (0.6, 0.3, 0.1):
        scores = {n: (torch.rand(s, generator=gen) * 30).round() for n, s in shapes.items()}
        channels_last = dict(scores, conv=scores["conv"].to(memory_format=torch.channels_last))
        assert not channels_last["conv"].is_contiguous()
        removed = plain.select(scores, density)
        got = strided.select(channels_last, density)
        assert strided.strides["conv"] == channels_last["conv"].stride()
        assert got["conv"].tolist() == sorted(got["conv"].tolist())  # in storage order
        flat = {n: flat_indices(r.numpy(), shapes[n], strided.strides[n]) for n, r in got.items()}
        assert {n: sorted(f.tolist()) for n, f in flat.items()} == {
            n: r.tolist() for n, r in removed.items()
        }
        assert strided.masks() == plain.masks()


@pytest.mark.parametrize("step", [3, 97])  # many (the position map) and few (arithmetic)
def test_storage_offsets_of_a_channels_last_tensor(step):
    import numpy as np

    from winnow.core._layout import storage_offsets

    tensor = torch.randn(6, 5, 3, 4).to(memory_format=torch.channels_last)
    flat = np.arange(tensor.numel(), dtype=np.int32)[::step]
    offsets = storage_offsets(flat, tensor.shape, tensor.stride())
    storage = tensor.as_strided((tensor.numel(),), (1,))
    expected = tensor.reshape(-1)[torch.from_numpy(flat.astype(np.int64))]
    assert torch.equal(storage[torch.from_numpy(offsets.astype(np.int64))], expected)


def test_absolute_product_scores_select_like_the_dense_product(monkeypatch):
    """SynFlow's scores |a ⊙ b| read at the alive weights only (the product is never formed
    whole): the same masks as the dense product torch forms, channels-last factors included;
    factors of mixed dtypes are multiplied as torch does (promoted) instead."""
    import winnow.core._topk as topk
    from winnow.core._topk import Survivors
    from winnow.core.scores import AbsProductScores

    monkeypatch.setattr(topk, "EXACT_BELOW", 300)
    gen = torch.Generator().manual_seed(3)
    shapes = {"conv": (12, 6, 3, 3), "fc": (40, 30)}
    factors = {
        n: (torch.randn(s, generator=gen), torch.randn(s, generator=gen)) for n, s in shapes.items()
    }
    factors["conv"] = tuple(f.to(memory_format=torch.channels_last) for f in factors["conv"])
    lazy = AbsProductScores(factors)
    dense = {n: (a * b).abs() for n, (a, b) in factors.items()}
    assert all(torch.equal(lazy[n], dense[n]) for n in shapes)
    expected = select(dense, 0.3)

    def never_formed(self, name):
        raise AssertionError("the dense product was formed")

    with monkeypatch.context() as patched:
        patched.setattr(AbsProductScores, "__getitem__", never_formed)
        assert select(lazy, 0.3) == expected
        from_lazy, from_dense = Survivors(shapes), Survivors(shapes)
        for density in (0.6, 0.25, 0.05):
            from_lazy.select(lazy, density)
            from_dense.select(dense, density)
            assert from_lazy.masks() == from_dense.masks()
    mixed = dict(factors, fc=(factors["fc"][0], factors["fc"][1].double()))
    assert select(AbsProductScores(mixed), 0.3) == select(
        {n: (a * b).abs() for n, (a, b) in mixed.items()}, 0.3
    )


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parallel_parts_do_not_change_the_choice(monkeypatch, workers):
    """The compiled passes split arrays into parts (and run tensors side by side): any number
    of parts gives the masks of one part."""
    import winnow.core._parallel as parallel
    import winnow.core._topk as topk
    from winnow.core._topk import Survivors

    monkeypatch.setattr(topk, "EXACT_BELOW", 200)
    monkeypatch.setattr(parallel, "PARALLEL_ABOVE", 0)
    gen = torch.Generator().manual_seed(4)
    shapes = {"a": (50, 41), "b": (3001,), "c": (9, 5, 3, 3)}
    rounds = [
        {n: (torch.rand(s, generator=gen) * 60).round() for n, s in shapes.items()}
        for _ in range(4)
    ]
    results = {}
    for count in (1, workers):
        monkeypatch.setattr(parallel, "workers", lambda count=count: count)
        survivors, removed = Survivors(shapes), []
        for scores, density in zip(rounds, (0.7, 0.4, 0.2, 0.05), strict=True):
            removed.append({n: r.tolist() for n, r in survivors.select(scores, density).items()})
        results[count] = survivors.masks(), removed
    assert results[1] == results[workers]


def test_positions_follow_the_layout_of_each_round(monkeypatch):
    """Scores that change layout between rounds (default, channels-last, default) are read
    through their storage each time, with the choices of scores that never change layout."""
    import winnow.core._topk as topk
    from winnow.core._topk import Survivors

    monkeypatch.setattr(topk, "EXACT_BELOW", 300)
    gen = torch.Generator().manual_seed(5)
    shapes = {"conv": (8, 7, 3, 3), "fc": (20, 11)}
    plain, switching = Survivors(shapes), Survivors(shapes)
    for density, layout in zip(
        (0.8, 0.5, 0.3, 0.1),
        (
            torch.contiguous_format,
            torch.channels_last,
            torch.contiguous_format,
            torch.channels_last,
        ),
        strict=True,
    ):
        scores = {n: (torch.rand(s, generator=gen) * 20).round() for n, s in shapes.items()}
        laid = dict(scores, conv=scores["conv"].contiguous(memory_format=layout))
        plain.select(scores, density)
        switching.select(laid, density)
        assert switching.strides["conv"] == laid["conv"].stride()
        assert switching.masks() == plain.masks()


@pytest.mark.parametrize(
    "shape,order", [((6, 5, 3, 4), (0, 2, 3, 1)), ((4, 1, 7), (2, 0, 1)), ((5, 6), (1, 0))]
)
def test_flat_indices_invert_storage_offsets(shape, order):
    """Any dense layout (channels-last, a permuted 3-D tensor, a transposed matrix, size-1
    dimensions): storage positions -> flat indices -> storage positions is the identity."""
    import numpy as np

    from winnow.core._layout import dense_layout, flat_indices, storage_offsets

    tensor = torch.randn([shape[d] for d in order]).permute(*np.argsort(order))
    assert tensor.shape == shape and dense_layout(tensor)
    storage = tensor.as_strided((tensor.numel(),), (1,))
    positions = np.arange(tensor.numel(), dtype=np.int32)[::2]
    flat = flat_indices(positions, tensor.shape, tensor.stride())
    assert torch.equal(tensor.reshape(-1)[torch.from_numpy(flat.astype(np.int64))],
                       storage[torch.from_numpy(positions.astype(np.int64))])  # fmt: skip
    assert np.array_equal(storage_offsets(flat, tensor.shape, tensor.stride()), positions)
    assert not dense_layout(torch.randn(6, 8)[:, ::2])


def test_flat_indices_of_large_tensors_are_exact():
    """The float-reciprocal quotients are corrected where rounding misses: exact up to the
    largest positions of a 4096x4096x3x3 channels-last weight (151M entries)."""
    import numpy as np

    from winnow.core._layout import flat_indices

    shape = (4096, 4096, 3, 3)
    stride = (4096 * 9, 1, 3 * 4096, 4096)  # channels-last
    rng = np.random.default_rng(0)
    numel = int(np.prod(shape))
    positions = np.concatenate([rng.integers(0, numel, 100_000), np.arange(numel - 5000, numel)])
    o, rest = np.divmod(positions, stride[0])
    h, rest = np.divmod(rest, stride[2])
    w, c = np.divmod(rest, stride[3])
    expected = np.ravel_multi_index((o, c, h, w), shape)
    assert np.array_equal(flat_indices(positions, shape, stride), expected)


def _select_in_child(scores, queue):
    # counted with numpy: torch's own parallel ops would hang here (its OpenMP threads did not
    # survive the fork either; DataLoader workers set one thread for that reason)
    queue.put(int(select(scores, 0.3)["w"].numpy().sum()))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_selection_runs_in_a_process_forked_after_parallel_passes(monkeypatch):
    """GNU OpenMP cannot restart in a forked child (numba aborts the process): a child forked
    after the parent's parallel passes selects with plain loops, and gets the same masks."""
    import multiprocessing

    import winnow.core._parallel as parallel
    import winnow.core._topk as topk

    monkeypatch.setattr(topk, "EXACT_BELOW", 1000)
    monkeypatch.setattr(parallel, "PARALLEL_ABOVE", 0)
    monkeypatch.setattr(parallel, "workers", parallel.workers)  # restored afterwards
    scores = {"w": torch.rand(200_000, generator=torch.Generator().manual_seed(6))}
    expected = int(select(scores, 0.3)["w"].numpy().sum())  # parallel parts in this process
    assert parallel._STARTED
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_select_in_child, args=(scores, queue))
    child.start()
    child.join(60)
    assert child.exitcode == 0, "the child was killed or hung"
    assert queue.get(timeout=5) == expected


def test_scores_in_any_layout_select_like_contiguous_ones(monkeypatch):
    """A transposed tensor (a dense permuted layout, read through its storage) and a strided
    view (not dense: copied) give the choices of the same scores laid out by default."""
    import winnow.core._topk as topk
    from winnow.core._topk import Survivors

    monkeypatch.setattr(topk, "EXACT_BELOW", 100)
    gen = torch.Generator().manual_seed(7)
    transposed = (torch.rand(30, 20, generator=gen) * 9).round().t()  # shape (20, 30)
    strided = (torch.rand(25, 40, generator=gen) * 9).round()[:, ::2]  # shape (25, 20)
    assert not transposed.is_contiguous() and not strided.is_contiguous()
    laid = {"t": transposed, "s": strided}
    plain = {n: s.contiguous() for n, s in laid.items()}
    assert select(laid, 0.3) == select(plain, 0.3)
    a, b = (
        Survivors({n: s.shape for n, s in laid.items()}),
        Survivors({n: s.shape for n, s in plain.items()}),
    )
    for density in (0.6, 0.3, 0.1):
        a.select(laid, density)
        b.select(plain, density)
        assert a.masks() == b.masks()
