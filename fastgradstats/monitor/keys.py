"""Logger key names of the monitor's values (``to_dict()``, TensorBoard tags, W&B keys).

Two styles:

* ``"fastgradstats"`` (default): ``{prefix}grad_norm/{name}`` and ``{prefix}grad_norm_total``
  for the 2-norm, ``{prefix}grad_norm_{p:g}/{name}`` and ``{prefix}grad_norm_{p:g}_total``
  for any other p (``inf`` for the max-norm);
* ``"lightning"``: the norm keys of ``lightning.pytorch.utilities.grad_norm``,
  ``{prefix}grad_{float(p)}_norm/{name}`` and ``{prefix}grad_{float(p)}_norm_total``
  (``grad_2.0_norm/...``, ``grad_inf_norm/...``).

Every other key is the same in both styles: ``{prefix}grad_max_abs/{name}``,
``{prefix}grad_nonfinite/{name}``, ``{prefix}grad_clip_coef``, ``{prefix}grad_nonfinite``,
``{prefix}grad_skipped``, ``{prefix}grad_spike_total`` and ``{prefix}grad_stats/...``.
With ``GradMonitor(histograms=True)``: ``{prefix}grad_zero_frac/{name}`` (share of exact
zeros), ``{prefix}grad_{fmt}_{field}/{name}`` for each target format (``fp16``, ``bf16``,
``fp8_e4m3fn``, ``fp8_e5m2``) and field (``flush_to_zero``, ``subnormal``, ``overflow``:
shares of the nonzero finite values), the histogram tag ``{prefix}grad_hist/{name}`` and
(W&B) ``{prefix}grad_hist_step``.
With ``GradMonitor(param_norms=True)``: ``{prefix}param_norm/<name>``,
``{prefix}update_ratio/<name>`` and ``{prefix}param_norm_total`` (``param_norm_{p:g}`` and
``update_ratio_{p:g}`` for p != 2; ``param_{float(p)}_norm`` and ``update_{float(p)}_ratio``
in the ``"lightning"`` style).
The total norm's key has no ``/``, so no parameter name can collide with it.
"""

from __future__ import annotations

KEY_STYLES = ("fastgradstats", "lightning")


class Keys:
    """The key of every value the monitor logs, for one ``prefix``, style and norm type."""

    def __init__(
        self, prefix: str = "", key_style: str = "fastgradstats", norm_type: float = 2.0
    ) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if key_style not in KEY_STYLES:
            raise ValueError(f"key_style must be one of {KEY_STYLES}, got {key_style!r}")
        self.prefix = prefix
        self.style = key_style
        self.norm_type = float(norm_type)
        p = self.norm_type
        if key_style == "lightning":
            stem = f"{prefix}grad_{p}_norm"  # str(float): "2.0", "inf", as Lightning writes it
        elif p == 2.0:
            stem = f"{prefix}grad_norm"
        else:
            stem = f"{prefix}grad_norm_{p:g}"  # 1, 0.5, inf
        self._norm_stem = stem
        # GradMonitor(param_norms=True): the weights' norm and the update ratio, with the
        # norm type in the key the same way as the gradient norm's
        if key_style == "lightning":
            self._param_stem = f"{prefix}param_{p}_norm"
            self._ratio_stem = f"{prefix}update_{p}_ratio"
        elif p == 2.0:
            self._param_stem, self._ratio_stem = f"{prefix}param_norm", f"{prefix}update_ratio"
        else:
            self._param_stem = f"{prefix}param_norm_{p:g}"
            self._ratio_stem = f"{prefix}update_ratio_{p:g}"
        self.param_total = f"{self._param_stem}_total"
        self.total = f"{stem}_total"
        self.clip_coef = f"{prefix}grad_clip_coef"
        self.nonfinite = f"{prefix}grad_nonfinite"
        self.skipped = f"{prefix}grad_skipped"
        self.spike_total = f"{prefix}grad_spike_total"
        self.step_metric = f"{prefix}grad/step"  # the W&B x axis of the monitor's rows
        self.histogram_step = f"{prefix}grad_hist_step"  # W&B: the step histograms are of

    def __repr__(self) -> str:
        return f"Keys(prefix={self.prefix!r}, key_style={self.style!r}, norm_type={self.norm_type})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keys) and (self.prefix, self.style, self.norm_type) == (
            other.prefix,
            other.style,
            other.norm_type,
        )

    def __hash__(self) -> int:
        return hash((self.prefix, self.style, self.norm_type))

    def norm(self, name: str) -> str:
        """Key of parameter ``name``'s gradient norm."""
        return f"{self._norm_stem}/{name}"

    def param_norm(self, name: str) -> str:
        """Key of parameter ``name``'s weight norm (``param_norms=True``)."""
        return f"{self._param_stem}/{name}"

    def update_ratio(self, name: str) -> str:
        """Key of parameter ``name``'s ||w_t - w_prev|| / ||w_t|| (``param_norms=True``)."""
        return f"{self._ratio_stem}/{name}"

    def max_abs(self, name: str) -> str:
        """Key of parameter ``name``'s max |g|."""
        return f"{self.prefix}grad_max_abs/{name}"

    def nonfinite_count(self, name: str) -> str:
        """Key of parameter ``name``'s NaN + Inf count (logged only when non-zero)."""
        return f"{self.prefix}grad_nonfinite/{name}"

    def zero_fraction(self, name: str) -> str:
        """Key of parameter ``name``'s share of exact zeros (histogram steps)."""
        return f"{self.prefix}grad_zero_frac/{name}"

    def precision(self, fmt: str, field: str, name: str) -> str:
        """Key of a precision share, e.g. ``grad_fp16_subnormal/<name>``."""
        return f"{self.prefix}grad_{fmt}_{field}/{name}"

    def histogram(self, name: str) -> str:
        """TensorBoard tag / W&B key of parameter ``name``'s |g| histogram (log2 |g|)."""
        return f"{self.prefix}grad_hist/{name}"

    def tally(self, name: str) -> str:
        """Key of a running tally (``nonfinite_steps``, ``skipped_steps``, ``spikes``)."""
        return f"{self.prefix}grad_stats/{name}"

    def patterns(self) -> list[str]:
        """Glob patterns covering every key (all start with ``{prefix}grad_``)."""
        return [
            f"{self.prefix}grad_*",
            f"{self._param_stem}*",
            f"{self._ratio_stem}*",
        ]


__all__ = ["KEY_STYLES", "Keys"]
