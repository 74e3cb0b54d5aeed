"""GradMonitor: per-layer gradient statistics for every training step, without host syncs.

One module per concern:

* :mod:`.recorder` -- :class:`GradMonitor`: its arguments, the per-step path (measure and
  clip, skip, write the rings) and the facades, composing the modules below;
* :mod:`.arguments` -- checks of its constructor arguments (beside ``core.check_*``);
* :mod:`.binding` -- which tensors the monitor watches and how it finds them again
  (by name; replaced, unpickled, missing gradients);
* :mod:`.rings` -- the device ring buffers and the per-step row writes (no host sync);
* :mod:`.flush` -- copying the rings to the host, spike detection, the host history;
* :mod:`.state` -- ``state_dict`` / ``load_state_dict`` (format versions 1 and 2);
* :mod:`.report` -- the precision findings of ``report()`` and the dict of ``to_dict()``;
* :mod:`.history` -- the host :class:`History` (and its :class:`HistogramHistory` with
  ``histograms=True``);
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
