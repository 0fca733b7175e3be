"""Guarded Triton import and the checks shared by every kernel in this package.

Importing this module never fails: without Triton (or with a broken install)
``HAS_TRITON`` is False and :func:`triton_unsupported_reason` says why.

``TRITON_INTERPRET=1`` is read by ``@triton.jit`` when a kernel is *defined*,
so whether the kernels of this package run in the interpreter is fixed when
they are imported; :data:`INTERPRETED` records it.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional: CPU-only installs and macOS have none
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install that fails while importing
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

HAS_TRITON = triton is not None
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"
"""True when the kernels below were defined under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""

LOG2E = 1.4426950408889634
"""log2(e): the kernels run their softmaxes in ``exp2`` with ``log2(e)`` folded into the scale."""

if HAS_TRITON:

    @triton.jit
    def finite(x):
        """``x`` as float32 with NaN and +-inf entries set to 0 (kernels that must survive hostile inputs)."""
        x = x.to(tl.float32)
        return tl.where((x == x) & (tl.abs(x) < float("inf")), x, 0.0)

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256
_FAST_DTYPES = (torch.float16, torch.bfloat16)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _device_reason(t: torch.Tensor) -> str | None:
    if t.device.type == "cuda":
        if INTERPRETED:
            return None  # the interpreter copies CUDA tensors to the host and back: slow but correct
        major, minor = torch.cuda.get_device_capability(t.device)  # torch caches the properties
        if major < 8:
            return f"CUDA device {t.device} has compute capability {major}.{minor}; the kernels need 8.0 or newer"
        return None
    if t.device.type == "cpu":
        if INTERPRETED:
            return None
        return (
            "tensors are on the CPU: the Triton kernels need CUDA, or TRITON_INTERPRET=1 set before "
            "psa_diffusers is first imported"
        )
    return f"tensors are on a {t.device.type} device; the Triton kernels run on CUDA only"


def unsupported_reason(*tensors: torch.Tensor, names: tuple[str, ...]) -> str | None:
    """Why tensors ``[B, H, L, D]`` cannot go through the kernels of this package, or None."""
    if not HAS_TRITON:
        return f"triton is not importable ({_IMPORT_ERROR})"
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__}, not a tensor"
        if t.dim() != 4:
            return f"{name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}"
        if t.requires_grad and torch.is_grad_enabled():
            return f"{name} requires grad; the Triton launchers are forward-only (psa_attention has gradients)"
    first = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            return f"{names[0]} is on {first.device} but {name} is on {t.device}"
        if t.dtype != first.dtype:
            return f"{names[0]} is {first.dtype} but {name} is {t.dtype}"
        if t.shape[:2] != first.shape[:2]:
            return f"batch/heads differ: {names[0]} {tuple(first.shape)}, {name} {tuple(t.shape)}"
        if t.shape[3] != first.shape[3]:
            return f"head dims differ: {names[0]} {tuple(first.shape)}, {name} {tuple(t.shape)}"
    if len(tensors) >= 3 and tensors[1].shape[2] != tensors[2].shape[2]:
        shapes = f"{tuple(tensors[1].shape)} vs {tuple(tensors[2].shape)}"
        return f"{names[1]} and {names[2]} have different lengths: {shapes}"
    dtype = first.dtype
    if dtype not in _FAST_DTYPES and not (INTERPRETED and dtype == torch.float32):
        allowed = "float16, bfloat16" + (", float32" if INTERPRETED else "")
        return f"dtype {dtype} is not supported by the Triton kernels (allowed: {allowed})"
    d = first.shape[3]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        return f"head dim {d} is outside the supported range {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    if min(t.shape[2] for t in tensors) == 0 or first.shape[0] * first.shape[1] == 0:
        return "empty tensor"
    return _device_reason(first)


def triton_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when :func:`psa_attention_triton` can run on ``q, k, v``; otherwise a one-line reason.

    Requirements: triton importable; tensors ``[B, H, L, D]`` with equal batch,
    heads and head dim (k and v of equal length); float16 or bfloat16 (float32
    too under the interpreter); head dim in 16..256; CUDA with compute
    capability >= 8.0, or CPU tensors with ``TRITON_INTERPRET=1`` set before
    this package was imported; no autograd (forward only).
    """
    return unsupported_reason(q, k, v, names=("q", "k", "v"))


BACKENDS = ("auto", "reference", "triton")
"""Where an op runs: "triton" (the kernels), "reference" (plain PyTorch), "auto" (Triton on CUDA where it applies)."""


def resolve_backend(backend: str, *tensors: torch.Tensor, names: tuple[str, ...]) -> str:
    """``"triton"`` or ``"reference"`` for an op on ``tensors``.

    "auto" takes the kernels for CUDA tensors they support and the reference otherwise (CPU
    tensors too: the interpreter is for tests, which ask for "triton" by name); "triton" raises
    ValueError with the reason where the kernels cannot run. Reads only shapes, dtypes and the
    device's compute capability: no host synchronisation.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: allowed values are {BACKENDS}")
    if backend == "reference" or (backend == "auto" and tensors[0].device.type != "cuda"):
        return "reference"
    reason = unsupported_reason(*tensors, names=names)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run here: {reason}")
    return "reference"


def resolve_table_backend(backend: str, table: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for an op on a table of block values (float32 or integer).

    Such kernels (level choice, compaction, allocation) take any dtype; "auto" runs them on CUDA.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: allowed values are {BACKENDS}")
    on_device = HAS_TRITON and (table.device.type == "cuda" or (INTERPRETED and table.device.type == "cpu"))
    if backend == "triton" and not on_device:
        raise ValueError(f"backend='triton' cannot run here: {_IMPORT_ERROR or f'a tensor on {table.device}'}")
    return "triton" if backend == "triton" or (backend == "auto" and on_device and table.is_cuda) else "reference"


def check_supported(*tensors: torch.Tensor, names: tuple[str, ...]) -> None:
    reason = unsupported_reason(*tensors, names=names)
    if reason is not None:
        raise ValueError(f"Triton path unavailable: {reason}")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is contiguous (any other strides are fine), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def dot_upcast(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bf16 bit patterns as integers: upcast tiles to fp32 before tl.dot there."""
    return INTERPRETED and dtype == torch.bfloat16


POISON_OUTPUTS = False
"""Tests set this to True: every output buffer the launchers allocate is then filled with NaN (-1 for ints) first,
so a tile the kernel forgets to write fails loudly instead of reading stale memory."""


def new_output(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer for a kernel to fill: uninitialised, or NaN when :data:`POISON_OUTPUTS` is set."""
    if POISON_OUTPUTS:
        fill = float("nan") if dtype.is_floating_point else -1  # -1: no valid count or block id
        return torch.full(tuple(shape), fill, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)
