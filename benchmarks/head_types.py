"""A battery of synthetic attention heads unlike one another, for judging level choice on every kind of head.

``structured_qkv`` makes local heads only: each query attends to a 3D neighbourhood of its own
position. Real video heads are more varied, and a level choice tuned on local heads can lose
badly to plain binary block-sparse attention on the others. The head types here:

============== ===========================================================================
``local``      the shared local heads (``structured_qkv``: isotropic Gaussian kernel, width 2-6 tokens)
``aniso``      local, with a different length scale along t, h and w (0.7-1.5, 1.5-4, 5-14 tokens,
               the axes shuffled per head)
``temporal``   the same place in every frame: long along t (8-20 frames), narrow in h, w (1-2.5)
``spatial``    the own frame only (t width 0.35), wide in h, w (4-12 tokens)
``diffuse``    global: widths 12-40 tokens and a softer peak (logit scale 4-7), mass spread over most keys
``frame0``     a local head whose first frame's keys are a sink: 30-80% of every query's mass on
               frame 0, spread over its keys with log-normal per-key weights (sd 0.3-1.2)
``sinks``      a local head plus 2-8 scattered sink keys that together take 30-90% of every
               query's mass, with log-normal per-key weights (sd 0.5)
``text``       CogVideoX-style joint text: the last ``text_len`` keys take 20-70% of every video
               query's mass (log-normal per-key weights, sd 1); video-only shapes make it a ``local``
``mixture``    one head of each of the other types, in one call
============== ===========================================================================

Logits follow the construction of ``structured_qkv``: random Fourier features of the token
position make ``scale * q . k`` approximate ``logit_scale * exp(-|dt/l_t, dh/l_h, dw/l_w|**2 / 2)``,
plus independent noise. A sink adds ``z_t`` to the logit of sink key ``t`` for every query: one
shared unit direction ``u`` is removed from all base features and added back as ``alpha * u`` to
every query and ``z_t / (scale * alpha)`` times it to each sink key, so the extra logit is exactly
``z_t``. The sink strengths are calibrated from the log-sum-exp of the other keys' logits over 64
sampled queries, so the sink takes the drawn share of the mass whatever the head's width.

Everything is drawn from a CPU generator seeded by ``(seed, head index)``, so the tensors are the
same on every machine; values are white noise (uncorrelated with the probabilities, the
conservative case). Text queries (rows that PSA computes densely) are noise.

    q, k, v, kinds = battery_qkv((11, 30, 26), dim=128, seed=0, kinds=HEAD_TYPES)
"""

from __future__ import annotations

import math

import torch

from benchmarks.structured_qkv import structured_qkv

HEAD_TYPES = ("local", "aniso", "temporal", "spatial", "diffuse", "frame0", "sinks", "text", "mixture")
"""Every head type of the battery; ``mixture`` is one head of each other type."""

PURE_TYPES = HEAD_TYPES[:-1]

LOGIT_SCALE = 10.0
"""The largest base logit (a query against its own position), as in ``structured_qkv``."""
NOISE = 0.3
"""Relative size of the independent noise on q and k, as in ``structured_qkv``."""


def _positions(grid: tuple[int, int, int]) -> torch.Tensor:
    t, y, x = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    return torch.stack([t, y, x], dim=-1).reshape(-1, 3).double()


def _kernel_qk(pos, widths, dim, g, *, logit_scale=LOGIT_SCALE, noise=NOISE):
    """q, k ``[L, D]`` float64 whose scaled products approximate a Gaussian kernel of the given widths."""
    inv = torch.tensor([0.0 if math.isinf(w) else 1.0 / w for w in widths], dtype=torch.double)
    omega = torch.randn(3, dim, dtype=torch.double, generator=g) * inv[:, None]
    phase = torch.rand(1, dim, dtype=torch.double, generator=g) * 2 * math.pi
    feat = torch.cos(pos @ omega + phase) * math.sqrt(2.0 / dim)
    amp = math.sqrt(logit_scale * math.sqrt(dim))
    length = pos.shape[0]
    q = amp * (feat + noise * torch.randn(length, dim, dtype=torch.double, generator=g) / math.sqrt(dim))
    k = amp * (feat + noise * torch.randn(length, dim, dtype=torch.double, generator=g) / math.sqrt(dim))
    return q, k


def _uniform(g, lo, hi) -> float:
    return lo + (hi - lo) * torch.rand((), dtype=torch.double, generator=g).item()


def _add_sinks(q, k, sink, share, jitter_sd, g, n_video):
    """Make keys ``sink`` (index tensor) take about ``share`` of every video query's mass."""
    dim = q.shape[1]
    scale = dim**-0.5
    u = torch.randn(dim, dtype=torch.double, generator=g)
    u = u / u.norm()
    q = q - (q @ u)[:, None] * u
    k = k - (k @ u)[:, None] * u
    jitter = jitter_sd * torch.randn(sink.numel(), dtype=torch.double, generator=g)
    # calibrate over 64 evenly spaced video queries: the sink's log-mass against the other keys'
    rows = torch.linspace(0, n_video - 1, 64, dtype=torch.double).round().long()
    others = torch.ones(k.shape[0], dtype=torch.bool)
    others[sink] = False
    z_rows = scale * q[rows] @ k.T
    gap = torch.logsumexp(z_rows[:, sink] + jitter, -1) - torch.logsumexp(z_rows[:, others], -1)
    z = math.log(share / (1 - share)) - gap.median() + jitter  # the extra logit of each sink key
    alpha = dim**0.25  # scale * alpha**2 = 1
    q = q + alpha * u
    k[sink] = k[sink] + (z / (scale * alpha))[:, None] * u
    return q, k


def head_qkv(kind: str, grid: tuple[int, int, int], dim: int, *, seed: int, text_len: int = 0):
    """q, k, v ``[L, D]`` float64 of one head of type ``kind``; ``L = T*H*W + text_len``, raster order, text last."""
    if kind not in PURE_TYPES:
        raise ValueError(f"kind={kind!r}: expected one of {PURE_TYPES}")
    g = torch.Generator().manual_seed(seed)
    n_video = grid[0] * grid[1] * grid[2]
    length = n_video + text_len
    if kind == "local":
        q, k, _ = structured_qkv(*grid, heads=1, dim=dim, seed=seed, dtype=torch.float64)
        q, k = q[0, 0], k[0, 0]
    else:
        widths = {
            "aniso": lambda: [_uniform(g, 0.7, 1.5), _uniform(g, 1.5, 4.0), _uniform(g, 5.0, 14.0)],
            "temporal": lambda: [_uniform(g, 8.0, 20.0), _uniform(g, 1.0, 2.5), _uniform(g, 1.0, 2.5)],
            "spatial": lambda: [0.35, _uniform(g, 4.0, 12.0), _uniform(g, 4.0, 12.0)],
            "diffuse": lambda: [_uniform(g, 12.0, 40.0) for _ in range(3)],
        }.get(kind, lambda: [_uniform(g, 2.0, 6.0)] * 3)()
        if kind == "aniso":
            widths = [widths[i] for i in torch.randperm(3, generator=g).tolist()]
        logit_scale = _uniform(g, 4.0, 7.0) if kind == "diffuse" else LOGIT_SCALE
        q, k = _kernel_qk(_positions(grid), widths, dim, g, logit_scale=logit_scale)
    if text_len:  # text tokens: noise of the same norm, little mass unless made a sink below
        amp = math.sqrt(LOGIT_SCALE * math.sqrt(dim)) / math.sqrt(dim)
        q = torch.cat([q, amp * torch.randn(text_len, dim, dtype=torch.double, generator=g)])
        k = torch.cat([k, amp * torch.randn(text_len, dim, dtype=torch.double, generator=g)])
    if kind == "frame0":
        sink = torch.arange(grid[1] * grid[2])
        q, k = _add_sinks(q, k, sink, _uniform(g, 0.3, 0.8), _uniform(g, 0.3, 1.2), g, n_video)
    elif kind == "sinks":
        n = int(torch.randint(2, 9, (), generator=g))
        sink = torch.randperm(n_video, generator=g)[:n]
        q, k = _add_sinks(q, k, sink, _uniform(g, 0.3, 0.9), 0.5, g, n_video)
    elif kind == "text" and text_len:
        sink = torch.arange(n_video, length)
        q, k = _add_sinks(q, k, sink, _uniform(g, 0.2, 0.7), 1.0, g, n_video)
    v = torch.randn(length, dim, dtype=torch.double, generator=g)
    return q, k, v


def battery_qkv(
    grid: tuple[int, int, int],
    dim: int,
    *,
    seed: int,
    kinds=HEAD_TYPES,
    heads_per_kind: int = 1,
    text_len: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """``q, k, v`` ``[1, H, L, D]`` (raster order, text last) and the type of each head.

    Each kind in ``kinds`` gets ``heads_per_kind`` heads (``mixture``: one head of every pure type
    instead, ``heads_per_kind`` times). Head ``n`` is drawn with seed ``1000 * seed + n``.
    """
    labels, heads = [], []
    for kind in kinds:
        members = PURE_TYPES * heads_per_kind if kind == "mixture" else (kind,) * heads_per_kind
        for member in members:
            heads.append(head_qkv(member, grid, dim, seed=1000 * seed + len(heads), text_len=text_len))
            labels.append(kind)
    q, k, v = (torch.stack([h[i] for h in heads])[None].to(dtype) for i in range(3))
    return q, k, v, labels
