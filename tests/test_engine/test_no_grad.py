"""engine.no_grad: the public entry points' grad-mode switch (torch.no_grad at less host cost)."""

import pytest
import torch

from fastgradstats import engine


def test_no_grad_switches_grad_mode_off_inside_and_restores_it():
    seen = []

    @engine.no_grad
    def probe(x, *, y=1):
        """doc"""
        seen.append(torch.is_grad_enabled())
        return x + y

    assert probe(1, y=2) == 3
    assert seen == [False]
    assert torch.is_grad_enabled()
    assert probe.__name__ == "probe" and probe.__doc__ == "doc"

    with torch.no_grad():
        probe(0)
        assert not torch.is_grad_enabled()
    assert seen == [False, False]
    assert torch.is_grad_enabled()


def test_no_grad_restores_grad_mode_when_the_call_raises():
    @engine.no_grad
    def fails():
        assert not torch.is_grad_enabled()
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        fails()
    assert torch.is_grad_enabled()


def test_no_grad_entry_points_record_no_autograd_graph():
    import fastgradstats as fgs

    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5, requires_grad=True)  # a grad that itself needs grad
    total = fgs.clip_grad_norm_([p], 0.1, backend="torch")
    assert total.grad_fn is None and p.grad.grad_fn is None
    assert torch.is_grad_enabled()
