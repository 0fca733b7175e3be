"""The causal level rule: levels that never look ahead, for decoder prefill (plain PyTorch reference).

For self-attention over one sequence of ``L`` tokens, query block ``i`` (rows ``[i*bq, (i+1)*bq)``)
and KV block ``j`` (keys ``[j*bkv, (j+1)*bkv)``) are

* *past* when the whole KV block lies before the query block: ``(j + 1) * bkv <= i * bq``;
* *diagonal* when they overlap the causal boundary (some key of ``j`` is later than some row of ``i``
  but not later than all of them);
* *future* when every key of ``j`` is later than every row of ``i``.

Levels: future blocks are skipped (0); diagonal blocks are level 1 (attention applies the causal
mask inside them); past blocks holding one of the first ``sink_tokens`` tokens (the system/text
prompt) or lying within ``recent_tokens`` before the query block are level 1; the remaining past
blocks of each row compete under the quota or mass rule of ``PSAConfig`` exactly as in
``reference.levels_from_importance``, with the row's own number of competing blocks; query rows of
the last ``text_len`` tokens see every past block at level 1. A pooled group lies inside one past
block, so it never holds a future token (docs/design.md, section 8).

``causal_levels_reference`` is the reference (and the CPU path) of the one-launch Triton kernel
``kernel.build_causal_mask_triton``; ``ops.levels.causal_levels`` dispatches between them.
"""

from __future__ import annotations

import torch

from ...config import LEVELS, PSAConfig
from ...mask import PyramidBlockMask, block_sizes, ceil_div
from .reference import apply_caps

SINK_TOKENS = 128
"""Default count of first tokens (system and text prompt) every query sees at level 1."""
RECENT_TOKENS = 1024
"""Default count of tokens before each query block that it sees at level 1."""
PAST, DIAGONAL, FUTURE = 0, 1, 2
"""Values of :func:`causal_relation`."""
CAUSAL_MODES = ("quota", "mass")
"""The level rules the causal builder supports."""


def causal_relation(length: int, block_q: int, block_kv: int, device=None) -> torch.Tensor:
    """``[Nq, Nk]`` int64: ``PAST``, ``DIAGONAL`` or ``FUTURE`` of every (query block, KV block) of ``length``."""
    nq, nk = ceil_div(length, block_q), ceil_div(length, block_kv)
    first_row = torch.arange(nq, device=device) * block_q
    last_row = (first_row + block_q).clamp(max=length) - 1
    first_key = torch.arange(nk, device=device) * block_kv
    past = (first_key + block_kv).unsqueeze(0) <= first_row.unsqueeze(1)
    future = first_key.unsqueeze(0) > last_row.unsqueeze(1)
    out = torch.full((nq, nk), DIAGONAL, dtype=torch.int64, device=device)
    return out.masked_fill(past, PAST).masked_fill(future, FUTURE)


def causal_forced_full(
    length: int, block_q: int, block_kv: int, *, sink_tokens: int, recent_tokens: int, text_len: int = 0, device=None
) -> torch.Tensor:
    """``[Nq, Nk]`` bool: the blocks the causal rule keeps at level 1 whatever the importance.

    The diagonal blocks, the past blocks holding one of the first ``sink_tokens`` tokens, the past
    blocks ending within ``recent_tokens`` before the query block starts, and every past block of the
    query blocks that hold one of the last ``text_len`` tokens.
    """
    relation = causal_relation(length, block_q, block_kv, device)
    nq, nk = relation.shape
    first_row = (torch.arange(nq, device=device) * block_q).unsqueeze(1)
    first_key = (torch.arange(nk, device=device) * block_kv).unsqueeze(0)
    sink = first_key < sink_tokens
    recent = first_key + block_kv > first_row - recent_tokens
    text_rows = first_row + block_q > length - text_len if text_len else torch.zeros_like(first_row, dtype=torch.bool)
    past = relation == PAST
    return (relation == DIAGONAL) | (past & (sink | recent | text_rows))


def check_causal_rule(config: PSAConfig, sink_tokens: int, recent_tokens: int) -> None:
    """Raise ValueError for a config mode without a causal rule or a negative ``sink_tokens``/``recent_tokens``."""
    if config.mode not in CAUSAL_MODES:
        raise ValueError(f"causal PSA supports mode in {CAUSAL_MODES}, got PSAConfig.mode={config.mode!r}")
    for name, value in (("sink_tokens", sink_tokens), ("recent_tokens", recent_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be an integer >= 0")


def causal_levels_reference(
    importance: torch.Tensor,
    config: PSAConfig,
    *,
    length: int,
    sink_tokens: int,
    recent_tokens: int,
    text_len: int = 0,
    caps: torch.Tensor | None = None,
) -> PyramidBlockMask:
    """The compact causal mask for ``importance`` ``[B, H, Nq, Nk]`` of a sequence of ``length`` tokens.

    Module docstring for the rule; ``caps`` ``[B, H, Nk]`` lower the competing blocks' levels.
    """
    check_causal_rule(config, sink_tokens, recent_tokens)
    bq, bkv = config.block_q, config.block_kv
    device = importance.device
    relation = causal_relation(length, bq, bkv, device)
    if importance.shape[-2:] != relation.shape:
        raise ValueError(f"importance of shape {tuple(importance.shape)} does not match {tuple(relation.shape)} blocks")
    forced = causal_forced_full(
        length, bq, bkv, sink_tokens=sink_tokens, recent_tokens=recent_tokens, text_len=text_len, device=device
    )  # fmt: skip
    competing = (relation == PAST) & ~forced  # [Nq, Nk]
    n = competing.sum(-1)  # [Nq] competing blocks of each row
    s = importance.float().masked_fill(~competing, -1.0)  # importance >= 0: competitors sort first
    vals, order = torch.sort(s, dim=-1, descending=True, stable=True)
    rank = torch.arange(relation.shape[1], device=device)
    in_row = rank < n.unsqueeze(-1)  # [Nq, Nk]: sorted position holds a competing block
    nf = n.double()
    if config.mode == "quota":
        shares = config.budgets
        n_full = torch.maximum(torch.round(shares[0] * nf), torch.ceil(config.min_full_share * nf)).clamp(min=1)
        sizes = torch.stack([n_full] + [torch.round(x * nf) for x in shares[1:]], dim=-1)  # [Nq, 4]
        bounds = torch.minimum(sizes.cumsum(-1), nf.unsqueeze(-1)).long()
        group = (rank.view(1, -1, 1) >= bounds.unsqueeze(1)).sum(-1)  # [Nq, Nk]: 0..4
        group = group.expand_as(vals)
    else:
        mass = vals.clamp(min=0) / vals.clamp(min=0).sum(-1, keepdim=True).clamp(min=1e-30)
        before = torch.cumsum(mass, dim=-1) - mass
        thresholds = torch.tensor(config.budgets, device=device, dtype=mass.dtype)
        group = (before.unsqueeze(-1) >= thresholds).sum(-1)
        min_full = torch.ceil(config.min_full_share * nf).clamp(min=1).long()
        group = torch.where(rank < min_full.unsqueeze(-1), torch.zeros_like(group), group)
    level_of_group = torch.tensor(LEVELS + (0,), device=device, dtype=torch.int64)
    sorted_levels = level_of_group[group]
    sorted_levels[..., 0] = 1  # the best competing block of every row
    sorted_levels = torch.where(in_row, sorted_levels, torch.zeros_like(sorted_levels))
    level_map = torch.zeros(importance.shape, dtype=torch.int64, device=device).scatter_(-1, order, sorted_levels)
    level_map = apply_caps(level_map, caps)
    level_map = torch.where(forced, torch.ones_like(level_map), level_map)
    level_map = level_map.masked_fill(relation == FUTURE, 0)
    return PyramidBlockMask.from_valid_level_map(level_map, block_q=bq, block_kv=bkv)


def check_causal_mask(mask: PyramidBlockMask, length: int) -> None:
    """Raise ValueError unless every diagonal block of ``mask`` (for ``length`` tokens) is level 1.

    That guarantees each query row sees its own key. Reads the mask on the host (a synchronisation):
    for masks a user made, not for those of the causal rule.
    """
    mask.check_fits(length, length)
    relation = causal_relation(length, mask.block_q, mask.block_kv, mask.device)
    bad = (relation == DIAGONAL) & (mask.to_level_map() != 1)
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"causal mask block (b, h, i, j)={where} crosses the diagonal: it must be level 1")


def causal_density(mask: PyramidBlockMask, length: int) -> torch.Tensor:
    """FLOP density of ``mask`` against causal dense attention of ``length`` tokens: ``[B, H]`` float64.

    The work of query row ``r`` is the number of pooled tokens it sees (those whose last key is at most
    ``r``); dense causal attention costs ``L (L + 1) / 2``.
    """
    mask.check_fits(length, length)
    bq, bkv = mask.block_q, mask.block_kv
    lm = mask.to_level_map()  # [B, H, Nq, Nk]
    nq, nk = lm.shape[-2:]
    device = lm.device
    relation = causal_relation(length, bq, bkv, device)
    n_kv = block_sizes(length, bkv, nk, device)  # [Nk]
    n_q = block_sizes(length, bq, nq, device)  # [Nq]
    level = lm.clamp(min=1).double()
    past_work = torch.where((lm > 0) & (relation == PAST), torch.ceil(n_kv / level), torch.zeros_like(level))
    work = (past_work.sum(-1) * n_q).sum(-1)  # [B, H]
    # the blocks a row block does not see wholly: count, row by row, the pooled tokens that end by the row
    span = ceil_div(bq, bkv) + 1
    j = (torch.arange(nq, device=device) * bq // bkv).unsqueeze(1) + torch.arange(span, device=device)  # [Nq, T]
    valid = j < nk
    j = j.clamp(max=nk - 1)
    diag = valid & (relation.gather(1, j) != PAST)  # [Nq, T]
    rows = torch.arange(nq, device=device).view(nq, 1, 1) * bq + torch.arange(bq, device=device)  # [Nq, 1, bq]
    real_row = rows < length
    n_j = n_kv[j].unsqueeze(-1)  # [Nq, T, 1]
    x = (rows + 1 - j.unsqueeze(-1) * bkv).double().clamp(min=0).minimum(n_j)  # [Nq, T, bq] keys up to the row
    s = lm.gather(-1, j.expand(lm.shape[:2] + j.shape)).unsqueeze(-1)  # [B, H, Nq, T, 1]
    sd = s.clamp(min=1).double()
    seen = torch.where(x < n_j, torch.floor(x / sd), torch.ceil(n_j / sd))
    seen = torch.where((s > 0) & diag.unsqueeze(-1) & real_row, seen, torch.zeros_like(seen))
    work = work + seen.sum(dim=(-1, -2, -3))
    return work / (length * (length + 1) / 2)
