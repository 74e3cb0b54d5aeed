"""fastgradstats: per-layer gradient statistics and clipping in one fused read of every gradient.

Public API (nothing else is exported here):

* :func:`clip_grad_norm_`, :func:`clip_grad_value_`, :func:`get_total_norm`,
  :func:`clip_grads_with_norm_` -- drop-ins for ``torch.nn.utils``;
* :func:`grad_stats` / :class:`GradStats` -- named per-tensor stats that stay on the device;
* :func:`backward_stats` / :class:`BackwardStats` -- the same stats measured during backward;
* :class:`ZClip`, :class:`AutoClip` -- adaptive clipping with its state on the device.
"""

from .backward import BackwardStats, backward_stats
from .clip import (
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
    grad_stats,
)
from .clippers import AutoClip, ZClip
from .monitor import GradMonitor
from .stats import GradStats

__version__ = "0.1.0"

__all__ = [
    "AutoClip",
    "BackwardStats",
    "GradMonitor",
    "GradStats",
    "ZClip",
    "__version__",
    "backward_stats",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "grad_stats",
]
