"""Gradients that share memory: split them into rounds that an in-place op can write at once.

A parameter passed twice (or two gradients that are overlapping views of one buffer) is
scaled twice by ``torch.nn.utils.clip_grad_norm_``: its ``_foreach_mul_`` walks the list in
order. One kernel launch over both copies would instead have two programs read, scale
and write the same memory concurrently (a race: each element ends up scaled once or
twice). Launching one round after the other on the same stream gives torch's result:
each element is multiplied by the same factor, rounded, as many times as tensors cover it.
"""

from __future__ import annotations

from collections.abc import Sequence


def overlap_rounds(ptrs: Sequence[int], nbytes: Sequence[int]) -> list[list[int]] | None:
    """``None`` when the byte ranges ``[ptrs[t], ptrs[t] + nbytes[t])`` are disjoint (the
    common case), else the tensor indices split into rounds of disjoint ranges.

    Greedy interval colouring in address order: each tensor joins the first round whose
    last range ends at or before its start. Empty tensors touch nothing (round 0). Each
    round keeps input order, so a tensor passed ``k`` times lands in ``k`` rounds.
    """
    n = len(ptrs)
    order = sorted(range(n), key=ptrs.__getitem__)
    end = -1
    for t in order:
        if nbytes[t] == 0:
            continue
        if ptrs[t] < end:
            break
        end = max(end, ptrs[t] + nbytes[t])
    else:
        return None
    round_ends: list[int] = []
    rounds: list[list[int]] = []
    empty = []
    for t in order:
        if nbytes[t] == 0:
            empty.append(t)
            continue
        r = next((i for i, last in enumerate(round_ends) if last <= ptrs[t]), len(rounds))
        if r == len(rounds):
            rounds.append([])
            round_ends.append(-1)
        rounds[r].append(t)
        round_ends[r] = ptrs[t] + nbytes[t]
    rounds[0].extend(empty)
    return [sorted(members) for members in rounds]


__all__ = ["overlap_rounds"]
