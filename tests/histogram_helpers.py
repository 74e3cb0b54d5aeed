"""Values and references shared by the histogram tests: planted values over a dtype's whole
range, numpy.histogram on the library's edges, and what torch's cast does to values."""

from __future__ import annotations

import math

import numpy as np
import torch

from fastgradstats import constants as C
from fastgradstats import histogram as H
from fastgradstats import precision as P

NAN, INF = float("nan"), float("inf")
REF_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MIN_SUBNORMAL_EXP = {torch.float32: -149, torch.bfloat16: -133, torch.float16: -24}
MIN_SUBNORMAL_EXP[torch.float64] = -1074
INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def numpy_reference(x: torch.Tensor) -> tuple[np.ndarray, int]:
    """numpy.histogram of the finite |x| on the library's edges, and the exact zeros."""
    a = np.abs(x.detach().double().cpu().numpy().ravel())
    a = a[np.isfinite(a)]
    counts, _ = np.histogram(a, bins=H.histogram_edges().numpy())
    return counts, int((a == 0).sum())


def neighbours(v: torch.Tensor) -> list[torch.Tensor]:
    """v and the representable values just below and above it (same dtype)."""
    bits = v.reshape(1).view(INT_VIEW[v.dtype])
    return [v.reshape(1), (bits - 1).view(v.dtype), (bits + 1).view(v.dtype)]


def specials(dtype: torch.dtype) -> torch.Tensor:
    """Every awkward value of ``dtype``: ±0, NaN, ±Inf, sub/normal limits, max, and every
    bin edge it can hold with its two neighbours."""
    info = torch.finfo(dtype)
    values = [torch.tensor([0.0, -0.0, NAN, INF, -INF], dtype=dtype)]
    tiny = torch.tensor(2.0 ** MIN_SUBNORMAL_EXP[dtype], dtype=torch.float64).to(dtype)
    for v in (tiny, torch.tensor(info.smallest_normal, dtype=dtype)):
        values += neighbours(v)
    values.append(torch.tensor([info.max, -info.max], dtype=dtype))
    for j in range(C.LOW_EXPONENT, C.HIGH_EXPONENT + 1):
        if MIN_SUBNORMAL_EXP[dtype] <= j <= math.log2(info.max):
            edge = torch.tensor(math.ldexp(1.0, j), dtype=torch.float64).to(dtype)
            values += [t.neg() if j % 3 == 0 else t for t in neighbours(edge)]
    return torch.cat(values)


def planted(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """n values, log-uniform over the dtype's whole range, with the specials planted."""
    gen = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    lo, hi = MIN_SUBNORMAL_EXP[dtype], math.log2(info.max)
    if dtype == torch.float64:
        lo, hi = -160.0, 40.0  # the bins cover 2^-133..2^17: no need to span 2^±1000
    exps = torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    x = (torch.exp2(exps) * signs).clamp(-info.max, info.max).to(dtype)
    extra = specials(dtype)
    extra = extra[torch.randperm(extra.numel(), generator=gen)][:n]
    x[torch.randperm(n, generator=gen)[: extra.numel()]] = extra
    return x


def cast_truth(x: torch.Tensor, fmt: P.FloatFormat, k: int = 0) -> dict[str, int]:
    """What torch's cast of ``x * 2**k`` does, counted over the nonzero finite values.

    subnormal is defined on the (scaled) input, |y| < smallest normal; overflow is a result
    that is not finite or is off by more than half an ulp (e4m3fn saturates at 448). The
    tie at half the smallest subnormal rounds to 0 but counts as kept (documented; see
    test_precision_documented_bin_limits).
    """
    v = x.detach().double().cpu().reshape(-1)
    v = v[torch.isfinite(v) & (v != 0)] * math.ldexp(1.0, k)
    y = v.to(fmt.dtype).double()
    half_ulp = fmt.overflow_threshold - fmt.max
    over = ~torch.isfinite(y) | ((v - y).abs() > half_ulp)
    flush = (y == 0) & ~over & (v.abs() != fmt.flush_threshold)
    sub = ~flush & ~over & (v.abs() < math.ldexp(1.0, fmt.min_normal_exponent))
    return {
        "nonzero": v.numel(),
        "flush": int(flush.sum()),
        "sub": int(sub.sum()),
        "over": int(over.sum()),
    }


def report_values(dtype_target: torch.dtype, n: int, seed: int, source=torch.float32):
    """Values log-uniform around the target's range (flush, subnormal, normal, overflow),
    clear of the places where bins cannot decide (bf16: bin 0; the overflow bin)."""
    fmt = P.float_format(dtype_target)
    gen = torch.Generator().manual_seed(seed)
    lo = max(fmt.min_subnormal_exponent - 4, -133, MIN_SUBNORMAL_EXP[source])
    hi = min(math.floor(math.log2(fmt.max)) + 4, math.log2(torch.finfo(source).max) - 1)
    exps = torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    x = (torch.exp2(exps) * signs).to(source)
    top = 2.0 ** math.floor(math.log2(fmt.overflow_threshold))  # the ambiguous bin [top, 2 top)
    x = torch.where((x.abs() >= top) & (x.abs() < 2 * top), x / 2, x)  # exact: halving
    x[:: max(1, n // 7)] = 0.0
    x[3] = NAN
    x[5] = -INF
    return x
