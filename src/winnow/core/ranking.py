"""The k highest or lowest of a tensor with ties broken by position, without a full sort.

Every selection of winnow breaks ties by position (the earlier entry ranks first), so results
do not depend on a sort's internal order. A full stable sort costs O(n log n) and was most of
the time of SparseGPT's per-block mask choice and of a growth update; these find the k-th
value with one ``topk`` or ``kthvalue`` (O(n)) and settle the entries equal to it by position.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_by_position(scores: Tensor, count: int) -> Tensor:
    """Flat indices of the ``count`` highest of ``scores`` (1-d), ties broken by position (the
    earlier first): those above the count-th value, then the earliest equal to it. One
    ``topk`` and two comparisons: no sort of the whole tensor."""
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    values, indices = torch.topk(scores, count, sorted=False)
    threshold = values.min()
    if int((scores == threshold).sum()) == int((values == threshold).sum()):
        return indices  # no tie crosses the boundary: topk's set is the answer
    above = torch.nonzero(scores > threshold).flatten()
    equal = torch.nonzero(scores == threshold).flatten()[: count - above.numel()]
    return torch.cat([above, equal])


def lowest_mask(scores: Tensor, count: int) -> Tensor:
    """A boolean mask (shape of ``scores``) of its ``count`` lowest entries, ties broken by
    position in the flattened order (the earlier first): those below the count-th smallest
    value, then the earliest equal to it."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if count <= 0:
        return mask.view_as(scores)
    if count >= flat.numel():
        return mask.fill_(True).view_as(scores)
    threshold = torch.kthvalue(flat, count).values
    torch.lt(flat, threshold, out=mask)
    need = count - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(flat == threshold).flatten()[:need]] = True
    return mask.view_as(scores)
