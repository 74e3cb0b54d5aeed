"""Small models and gradient fillers shared by the monitor tests."""

from __future__ import annotations

import itertools

import torch
from torch import nn


def tiny_model(sizes=(5, 7, 3, 2), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def set_random_grads(model: nn.Module, gen: torch.Generator, scale: float = 1.0) -> None:
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale


def reference_norms(model: nn.Module, p: float = 2.0) -> list[float]:
    return [torch.linalg.vector_norm(q.grad.double(), p).item() for q in model.parameters()]
