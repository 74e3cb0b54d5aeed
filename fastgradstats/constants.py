"""Numbers that the Triton kernels and the torch code must agree on, defined once.

``CLIP_EPS``: the clip coefficient is ``min(max_norm / (total + CLIP_EPS), 1)``, as in
``torch.nn.utils``; the finalize kernel, the torch path and the clippers all use it.

Plain Python values with no imports: every layer (the kernels included) may import this
module, and it imports nothing back.

Histogram bins
--------------
Every edge is a power of two: bin 0 is ``[0, 2**LOW_EXPONENT)`` (exact zeros and the
fp32/fp64-only values below bf16's smallest subnormal), bin ``i`` in ``1..NUM_BINS - 2``
is ``[2**(i - BIN_OFFSET), 2**(i - BIN_OFFSET + 1))`` (one exponent), and the last bin is
``[2**HIGH_EXPONENT, inf)``. :func:`fastgradstats.histogram.histogram_edges` builds them.
"""

from __future__ import annotations

CLIP_EPS = 1e-6  # torch.nn.utils adds this to the total norm before dividing

LOW_EXPONENT = -133  # edges[1] = 2**LOW_EXPONENT: bf16's smallest subnormal
HIGH_EXPONENT = 17  # edges[-2] = 2**HIGH_EXPONENT
NUM_BINS = HIGH_EXPONENT - LOW_EXPONENT + 2  # 152: [0, 2^-133), 150 octaves, [2^17, inf)
BIN_OFFSET = 1 - LOW_EXPONENT  # a value in [2**j, 2**(j+1)) lands in bin j + BIN_OFFSET

__all__ = ["BIN_OFFSET", "CLIP_EPS", "HIGH_EXPONENT", "LOW_EXPONENT", "NUM_BINS"]
