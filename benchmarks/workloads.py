"""Gradient workloads shaped like real models.

Each workload is a list of tensor shapes plus a dtype; :func:`make_grads` fills them with
random normal values (never zeros: zeros hide unwritten outputs and can run faster than
real data). ``scale`` shrinks every dimension (``--quick`` uses 1/32) while keeping the
tensor count, so the tiny runs exercise the same code paths as the real ones.

Nothing here touches CUDA at import time; the memory-sized Llama workload asks
``torch.cuda.mem_get_info`` only when it is built for a CUDA device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

Shape = tuple[int, ...]

# GPT-2 small (124M): vocab, context, width, blocks.
GPT2_VOCAB, GPT2_CTX, GPT2_WIDTH, GPT2_BLOCKS = 50257, 1024, 768, 12
# Llama-7B: vocab, width, MLP width, layers.
LLAMA_VOCAB, LLAMA_WIDTH, LLAMA_MLP, LLAMA_LAYERS = 32000, 4096, 11008, 32
TINY_COUNT = 10_000
TINY_MAX_NUMEL = 4096

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dim(size: int, scale: float) -> int:
    return max(1, round(size * scale))


def gpt2_124m_shapes(scale: float = 1.0) -> list[Shape]:
    """The 148 parameter shapes of GPT-2 small, in ``named_parameters()`` order.

    HF GPT-2 uses Conv1D, so attention and MLP weights are stored [in, out].
    """
    d, d3, d4 = _dim(GPT2_WIDTH, scale), _dim(3 * GPT2_WIDTH, scale), _dim(4 * GPT2_WIDTH, scale)
    shapes: list[Shape] = [(_dim(GPT2_VOCAB, scale), d), (_dim(GPT2_CTX, scale), d)]
    for _ in range(GPT2_BLOCKS):
        shapes += [
            (d,), (d,),  # ln_1 weight, bias
            (d, d3), (d3,),  # attn.c_attn
            (d, d), (d,),  # attn.c_proj
            (d,), (d,),  # ln_2
            (d, d4), (d4,),  # mlp.c_fc
            (d4, d), (d,),  # mlp.c_proj
        ]  # fmt: skip
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def llama_layer_shapes(scale: float = 1.0) -> list[Shape]:
    """One Llama-7B decoder layer: q, k, v, o, gate, up, down, two RMSNorm weights."""
    d, m = _dim(LLAMA_WIDTH, scale), _dim(LLAMA_MLP, scale)
    return [(d, d), (d, d), (d, d), (d, d), (m, d), (m, d), (d, m), (d,), (d,)]


def llama_embedding_shapes(scale: float = 1.0) -> list[Shape]:
    """Token embedding, final norm and LM head of Llama-7B (untied)."""
    v, d = _dim(LLAMA_VOCAB, scale), _dim(LLAMA_WIDTH, scale)
    return [(v, d), (d,), (v, d)]


def llama_7b_shapes(
    budget_bytes: float | None, dtype: torch.dtype, scale: float = 1.0
) -> tuple[list[Shape], str]:
    """As many Llama-7B layers as fit in ``budget_bytes`` (all 32 when ``None``).

    Returns the shapes and a note such as ``"12/32 layers + embeddings"``. The embeddings
    (0.26B elements at full scale) are kept when they fit beside at least one layer.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    layer, emb = llama_layer_shapes(scale), llama_embedding_shapes(scale)
    layer_bytes = sum(math.prod(s) for s in layer) * itemsize
    emb_bytes = sum(math.prod(s) for s in emb) * itemsize
    if budget_bytes is None:
        n_layers, with_emb = LLAMA_LAYERS, True
    elif budget_bytes >= emb_bytes + layer_bytes:
        n_layers = min(LLAMA_LAYERS, int((budget_bytes - emb_bytes) // layer_bytes))
        with_emb = True
    else:
        n_layers, with_emb = max(1, int(budget_bytes // layer_bytes)), False
    shapes = emb[:1] if with_emb else []
    for _ in range(n_layers):
        shapes += layer
    if with_emb:
        shapes += emb[1:]
    note = f"{n_layers}/{LLAMA_LAYERS} layers" + (" + embeddings" if with_emb else "")
    return shapes, note


def tiny_shapes(count: int = TINY_COUNT, seed: int = 0) -> list[Shape]:
    """``count`` 1-D tensors of 1..4096 elements, log-uniform (biases, norms, scalars)."""
    gen = torch.Generator().manual_seed(seed)
    logs = torch.rand(count, generator=gen, dtype=torch.float64) * math.log(TINY_MAX_NUMEL)
    return [(max(1, int(math.exp(x))),) for x in logs.tolist()]


def resnet50_shapes(scale: float = 1.0) -> list[Shape]:
    """The 161 parameter shapes of torchvision's ResNet-50 (conv, BatchNorm w/b, fc)."""

    def c(n: int) -> int:
        return _dim(n, scale)

    shapes: list[Shape] = [(c(64), 3, 7, 7), (c(64),), (c(64),)]
    in_ch = c(64)
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        w, out = c(width), c(4 * width)
        for block in range(blocks):
            shapes += [(w, in_ch, 1, 1), (w,), (w,)]
            shapes += [(w, w, 3, 3), (w,), (w,)]
            shapes += [(out, w, 1, 1), (out,), (out,)]
            if block == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]  # downsample
            in_ch = out
    shapes += [(c(1000), in_ch), (c(1000),)]
    return shapes


@dataclass
class Workload:
    """A named list of gradient shapes in one dtype."""

    name: str
    shapes: list[Shape]
    dtype: torch.dtype
    description: str = ""
    numels: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.numels = [math.prod(s) for s in self.shapes]

    @property
    def count(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def memory_budget_bytes(device: torch.device) -> float:
    """Bytes a memory-sized workload may take on ``device``.

    CUDA: a quarter of the free device memory: the correctness check clones the
    gradients twice (clip ops), and the baselines need temporaries. CPU: a tenth of the
    available RAM, at most 1 GiB, so a full CPU run stays within minutes on a small machine.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return 0.25 * free
    available = _available_ram_bytes()
    return min(1 << 30, 0.1 * available) if available else float(1 << 30)


def _available_ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


WORKLOAD_NAMES = (
    "gpt2-124m-fp32",
    "gpt2-124m-bf16",
    "llama7b-bf16",
    "tiny10k-fp32",
    "resnet50-fp32",
    "resnet50-bf16",
)


def make_workload(name: str, device: torch.device | str, scale: float = 1.0) -> Workload:
    """Build the workload called ``name`` (one of :data:`WORKLOAD_NAMES`) for ``device``."""
    device = torch.device(device)
    model, _, dtype_name = name.rpartition("-")
    if name not in WORKLOAD_NAMES or dtype_name not in DTYPES:
        raise ValueError(f"workload must be one of {WORKLOAD_NAMES}, got {name!r}")
    dtype = DTYPES[dtype_name]
    if model == "gpt2-124m":
        return Workload(name, gpt2_124m_shapes(scale), dtype, "GPT-2 small, 148 tensors")
    if model == "llama7b":
        budget = memory_budget_bytes(device) * scale**2  # shrunk dims: shrink the budget too
        shapes, note = llama_7b_shapes(budget, dtype, scale)
        return Workload(name, shapes, dtype, f"Llama-7B-like, {note}")
    if model == "tiny10k":
        count = TINY_COUNT if scale >= 1 else max(16, round(TINY_COUNT * scale))
        return Workload(name, tiny_shapes(count), dtype, f"{count} tensors of 1..4096 elements")
    if model == "resnet50":
        return Workload(name, resnet50_shapes(scale), dtype, "ResNet-50, 161 tensors")
    raise AssertionError(name)  # unreachable: every name in WORKLOAD_NAMES is handled


def make_grads(
    workload: Workload | list[Shape],
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> list[Tensor]:
    """Random normal gradients for ``workload``, total 2-norm about 1.

    Each tensor gets its own scale (log-uniform over two decades), as real per-layer
    gradients differ, so per-tensor results are not all alike.
    """
    if isinstance(workload, Workload):
        shapes, dtype = workload.shapes, workload.dtype
    else:
        shapes, dtype = workload, dtype or torch.float32
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    host_gen = torch.Generator().manual_seed(seed)
    total = max(1, sum(math.prod(s) for s in shapes))
    factors = torch.pow(10.0, torch.rand(len(shapes), generator=host_gen) * 2 - 1).tolist()
    grads = []
    for shape, factor in zip(shapes, factors):
        g = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        g.mul_(factor / math.sqrt(total))
        grads.append(g)
    return grads


def grad_holders(grads: list[Tensor]) -> list[Tensor]:
    """Parameter-like leaves whose ``.grad`` is each of ``grads``, costing one element each.

    The clip functions take parameters and read ``.grad``; a broadcast (stride-0) leaf of
    the right shape accepts the gradient without allocating the weights themselves.
    """
    holders = []
    for g in grads:
        leaf = torch.zeros(1, dtype=g.dtype, device=g.device).expand(g.shape).requires_grad_()
        leaf.grad = g
        holders.append(leaf)
    return holders


def clone_grads(grads: list[Tensor]) -> list[Tensor]:
    """Independent copies (for rotating inputs and for correctness checks)."""
    return [g.clone() for g in grads]


__all__ = [
    "DTYPES",
    "WORKLOAD_NAMES",
    "Workload",
    "clone_grads",
    "gpt2_124m_shapes",
    "grad_holders",
    "llama_7b_shapes",
    "make_grads",
    "make_workload",
    "memory_budget_bytes",
    "resnet50_shapes",
    "tiny_shapes",
]
