"""GradMonitor: per-layer gradient statistics for every training step, without host syncs.

One module per concern:

* :mod:`.recorder` -- :class:`GradMonitor` (the per-step path: stats, clipping, skipping);
* :mod:`.params` -- which tensors the monitor watches and how it finds them again;
* :mod:`.history` -- the device ring buffers and the host :class:`History` (and its
  :class:`HistogramHistory` with ``histograms=True``);
* :mod:`.spikes` -- the spike detector (log-norm EMA), run at flush on the host;
* :mod:`.events` -- tallies that outlive the ring buffer;
* :mod:`.diagnosis` -- :func:`diagnose` and :class:`Diagnosis`;
* :mod:`.keys` -- the logger key names (``prefix=``, ``key_style=``);
* :mod:`.logspec` -- what is logged (``log=``, ``group_by=``, ``include=``, ``exclude=``,
  ``top_k=``);
* :mod:`.writers` -- JSON lines, CSV, TensorBoard and W&B writers;
* :mod:`.plots` -- matplotlib figures of a :class:`History`.
"""

from .diagnosis import Diagnosis, depth_profile, diagnose
from .events import Events
from .history import HistogramHistory, History
from .keys import KEY_STYLES, Keys
from .logspec import LOG_LEVELS, LogSpec
from .recorder import GradMonitor
from .writers import CsvWriter, HistoryWriter, JsonlWriter, TensorBoardWriter, WandbWriter

_Events = Events  # the name this class had before the package split

__all__ = [
    "KEY_STYLES",
    "LOG_LEVELS",
    "CsvWriter",
    "Diagnosis",
    "GradMonitor",
    "HistogramHistory",
    "History",
    "HistoryWriter",
    "JsonlWriter",
    "Keys",
    "LogSpec",
    "TensorBoardWriter",
    "WandbWriter",
    "depth_profile",
    "diagnose",
]
