"""What the monitor watches: its parameters by name, and how it finds them again.

The parameter *names* are fixed when the monitor is made; the parameter *objects* are
followed by name (:meth:`Binding.moved` notices replaced ones at the cost of one dict
lookup per parameter, :meth:`Binding.follow` takes those of a new model object). The
binding also keeps what is tied to the tracked objects: the previous weights of
``param_norms=True`` and the device index tensors of steps where some gradients are missing.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from ..inputs import NamedTensors
from ..lru import Lru
from ..torch_backend import host_to_device

# Pickled monitors made before the library had one cache name this class.
LruCache = Lru


def named_parameters(model: Any) -> list[tuple[str, Tensor]]:
    """Every parameter of ``model`` as ``(name, tensor)``, frozen ones included."""
    if isinstance(model, nn.Module):
        pairs = list(model.named_parameters())
    elif isinstance(model, Tensor):
        pairs = [("0", model)]
    elif isinstance(model, Iterable) and not isinstance(model, (str, bytes)):
        pairs = []
        for index, item in enumerate(model):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                pairs.append(item)
            elif isinstance(item, Tensor):
                pairs.append((str(index), item))
            else:
                raise TypeError(
                    f"model[{index}] must be a Tensor or a (name, Tensor) pair, "
                    f"got {type(item).__name__}"
                )
    else:
        raise TypeError(
            "model must be an nn.Module, a Tensor, or an iterable of Tensors or "
            f"(name, Tensor) pairs; got {type(model).__name__}"
        )
    if not pairs:
        raise ValueError("model has no parameters to monitor")
    lazy = [name for name, p in pairs if is_lazy(p)]
    if lazy:
        listed = ", ".join(repr(n) for n in lazy[:5]) + (" ..." if len(lazy) > 5 else "")
        raise ValueError(
            f"model has uninitialized lazy parameters ({listed}; e.g. nn.LazyLinear before "
            "its first forward pass): run one forward pass (a dummy batch is enough) before "
            "creating the GradMonitor"
        )
    return pairs


def find_owners(model: nn.Module, pairs: list[tuple[str, Tensor]]) -> list[tuple[Any, str]] | None:
    """``(module, attribute)`` holding each parameter, or ``None`` when names don't resolve.

    Checking ``module._parameters[attribute] is param`` costs a dict lookup per parameter
    and no sync, so step() can afford it to notice replaced parameters.
    """
    owners = []
    for name, param in pairs:
        path, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            return None
        if module._parameters.get(leaf) is not param:
            return None
        owners.append((module, leaf))
    return owners


# (accumulation dtype, weights, previous-weight copies) of one (device, dtype) group
WeightGroup = tuple[Any, list[Tensor], list[Tensor]]


class Binding:
    """The monitored parameters, in ``names`` order, and how to find them in the model.

    ``names`` never change; :meth:`bind` (at construction, :meth:`follow`, or when
    :meth:`moved` says the model's parameters were replaced) sets ``params``, ``pairs``,
    ``numels``, ``ndims`` and forgets the previous weights of the old objects.
    """

    def __init__(self, model: Any, pairs: list[tuple[str, Tensor]], index_cache_size: int) -> None:
        self.names = [name for name, _ in pairs]
        self.index = {name: j for j, name in enumerate(self.names)}
        if len(self.index) != len(self.names):
            raise ValueError("model has duplicate parameter names")
        self.index_cache_size = index_cache_size
        self.bind(model, pairs)
        self.device = self.params[0].device  # where index tensors and rings live
        self.forget()

    def bind(self, model: Any, pairs: list[tuple[str, Tensor]]) -> None:
        """Track ``pairs`` (in ``names`` order); remember how to find them in ``model``."""
        self.model = model if isinstance(model, nn.Module) else None
        self.params = [p for _, p in pairs]
        # built once: 10k fresh tuples per step cost more (GC passes) than the fused read
        self.pairs = NamedTensors(self.names, self.params)
        self.numels = [p.numel() for p in self.params]
        self.ndims = [p.dim() for p in self.params]
        # fp16: the clip coefficient comes from the float32 total (see _clip_and_measure)
        self.fp16 = any(p.dtype == torch.float16 for p in self.params)
        self.owners = find_owners(model, pairs) if self.model is not None else None
        self.forget_weights()
        self.unpickled = False

    def forget_weights(self) -> None:
        """Drop the previous weights of ``param_norms=True`` (next ratios are NaN)."""
        # by name: new parameter objects start over
        self.prev: dict[str, Tensor] = {}
        self.plan_all: tuple[list[WeightGroup], list[str], list[str]] | None = None

    def forget(self) -> None:
        """Start over (``reset()``): previous weights, index tensors, no-gradient count."""
        self.forget_weights()
        self.index_cache = Lru(self.index_cache_size)
        self.no_grad_steps = 0  # consecutive step() calls without any gradient

    def follow(self, model: nn.Module | Iterable[Any]) -> None:
        """Track the parameters of ``model`` with the monitored names (``ValueError`` when
        one is missing)."""
        current = dict(named_parameters(model))
        missing = [name for name in self.names if name not in current]
        if missing:
            listed = ", ".join(repr(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(
                f"model lacks {len(missing)} monitored parameter(s): {listed}; "
                "create a new GradMonitor for a model with different parameters"
            )
        self.bind(model, [(name, current[name]) for name in self.names])

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled (or deep-copied): the monitor now watches the copy of the model that
        # was pickled with it. step() refuses while that copy has no gradient at all (the
        # monitor was restored apart from its model: it would record 0 and clip nothing).
        self.__dict__.update(state)
        self.unpickled = True

    def check_unpickled(self) -> None:
        """Raise when unpickled apart from the model being trained (see ``__setstate__``)."""
        if not self.unpickled:
            return
        if any(p.grad is not None for p in self.params):  # host attributes: no sync
            self.unpickled = False  # pickled with its model, which is the one training
            return
        raise RuntimeError(
            "GradMonitor.step(): this monitor was unpickled (or deep-copied) and watches "
            "the copy of the model that was pickled with it, whose parameters have no "
            "gradients; nothing was recorded or clipped. Call monitor.attach(model) with "
            "the model you train, then step() again"
        )

    def moved(self) -> bool:
        """Whether the model's parameters were replaced by other objects (no sync)."""
        owners = self.owners
        if owners is None:
            return False
        return any(
            module._parameters.get(leaf) is not p for (module, leaf), p in zip(owners, self.params)
        )

    def count_missing_grads(self, warn_after: int) -> None:
        """Count consecutive steps without any gradient; warn once at ``warn_after``."""
        if any(p.grad is not None for p in self.params):  # host attributes: no sync
            self.no_grad_steps = 0
            return
        self.no_grad_steps += 1
        if self.no_grad_steps == warn_after:
            warnings.warn(
                f"GradMonitor: no monitored parameter has had a gradient for "
                f"{self.no_grad_steps} steps. Call step() after backward() and before "
                "zero_grad(). If the model was reloaded or the monitor unpickled apart "
                "from it, call monitor.attach(model); with DeepSpeed ZeRO the gradients "
                "are not in .grad.",
                RuntimeWarning,
                stacklevel=4,  # the user's step() call (past torch.no_grad's wrapper)
            )

    def present_index(self, names: list[str]) -> Tensor:
        """The positions of ``names`` as a device int64 tensor (cached per name set)."""
        key = tuple(self.index[name] for name in names)
        index = self.index_cache.get(key)
        if index is None:
            # pinned, non-blocking: step() must not wait for the GPU
            index = host_to_device(list(key), torch.int64, self.device)
            self.index_cache.put(key, index)
        return index

    def weight_groups(self, names: list[str]) -> tuple[list[WeightGroup], list[str], list[str]]:
        """``(groups, order, fresh)`` for the parameters ``names``: per (device, dtype)
        group ``(acc dtype, weights, previous-weight copies)``, the names in group order,
        and the names whose copy was just made (their first ratio is NaN). The plan of
        every parameter is built once and reused."""
        every = len(names) == len(self.names)
        if every and self.plan_all is not None:
            return self.plan_all
        plan = self._weight_groups(names)
        if every:
            groups, order, _fresh = plan
            self.plan_all = (groups, order, [])
        return plan

    def _weight_groups(self, names: list[str]) -> tuple[list[WeightGroup], list[str], list[str]]:
        members: dict[tuple[torch.device, torch.dtype], list[str]] = {}
        for name in names:
            p = self.params[self.index[name]]
            members.setdefault((p.device, p.dtype), []).append(name)
        groups: list[WeightGroup] = []
        order: list[str] = []
        fresh: list[str] = []
        for (_, dtype), group in members.items():
            # no detach(): step() runs under no_grad, and a detach per parameter would be
            # one more op per parameter
            ws = [self.params[self.index[name]] for name in group]
            prev = []
            for name, w in zip(group, ws):
                old = self.prev.get(name)
                if old is None or old.shape != w.shape:
                    old = self.prev[name] = w.clone()
                    fresh.append(name)
                prev.append(old)
            # accumulate in float32 at least, float64 for float64 weights; the norm of a
            # complex tensor is real already
            acc = (
                None
                if dtype.is_complex
                else (torch.float64 if dtype == torch.float64 else torch.float32)
            )
            groups.append((acc, ws, prev))
            order += group
        return groups, order, fresh


__all__ = ["Binding", "find_owners", "named_parameters"]
