"""Pictures of a monitor :class:`~fastgradstats.monitor.History` (matplotlib).

Kept for existing imports; the code lives in :mod:`fastgradstats.monitor.plots`.
"""

from .monitor.plots import plot_heatmap, plot_history, plot_total_norm

__all__ = ["plot_heatmap", "plot_history", "plot_total_norm"]
