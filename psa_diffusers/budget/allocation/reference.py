"""Level allocation at a target density: every block's level chosen by the error it would cause.

The "budget" mode (``PSAConfig(mode="budget", target_density=...)``) gives each query-block
row a FLOP budget and spends it where it removes the most output error per unit of work.
The method and its measurements are in ``docs/allocation.md``; in short:

**Error model.** For one query, with ``p_t`` the exact attention probabilities and ``p~_t``
those a level map produces (skipped tokens 0, a pooled group of ``c`` keys gets
``exp(mean logit)`` for each of its tokens), and values uncorrelated with the
probabilities, the relative squared output error is about

    err**2 = (s + W**2) / (1 - W)**2,     s = sum_t (p~_t - p_t)**2 / sum_t p_t**2,
                                          W = sum_t (p_t - p~_t)

``s`` is the detail lost (the values a block's peaks would have contributed), ``W`` the
attention mass lost (skipped blocks, and pooled blocks since ``exp(mean z) <= mean exp(z)``);
the ``W**2`` and ``1 - W`` terms are the renormalisation error, which many small skipped
blocks add up coherently. Per KV block ``j`` of a row and per option (skip, 8, 4, 2, 1),
with the block's mass ``P_j``, squared mass ``Q_j`` and within-group logit variance ``V_j(s)``
(:class:`~psa_diffusers.budget.stats.PyramidStats`), logits within a group taken as Gaussian:

    skip:   s_j = Q_j / Q,                    w_j = P_j
    pool s: s_j = Q_j / Q * f(V_j(s)),        w_j = P_j * g(V_j(s))
    full:   s_j = 0,                          w_j = 0
    f(V) = 1 - 2 exp(-3V/2) + exp(-2V),       g(V) = 1 - exp(-V/2)

**Allocation.** ``err**2`` is linearised around the current allocation,
``sum_j s_j + c * sum_j w_j`` with ``c = 2 (W + s) / (1 - W)``, which makes it a sum over
blocks: a multiple-choice knapsack per row (options cost ``n_j / s`` tokens). It is solved by
the greedy on each block's lower convex hull of (cost, error) -- all hull steps of the row
sorted by error removed per token, taken while the budget lasts -- which is optimal for the
relaxed problem; then ``c`` is updated from the result and the knapsack solved again
(``iterations`` times in all). Everything is sort/cumsum/gather on ``[B, H, Nq, 4 Nk]``,
with integer costs and stable sorts: no host synchronisation, bit-identical results.
"""

from __future__ import annotations

import torch

from ..stats import PyramidStats, finite_stats

OPTIONS = (0, 8, 4, 2, 1)
"""The per-block options in the order of increasing cost: skip, then pooling 8, 4, 2, then full."""

COST_UNIT = 8
"""Costs are counted in 1/8 tokens, so ``n_j / s`` is an integer for every level."""

_HUGE = 1e30


def detail_loss(var: torch.Tensor) -> torch.Tensor:
    """``f(V)``: the share of a block's squared probabilities lost by pooling, logits ~ N(mean, V)."""
    return 1.0 - 2.0 * torch.exp(-1.5 * var) + torch.exp(-2.0 * var)


def mass_loss(var: torch.Tensor) -> torch.Tensor:
    """``g(V)``: the share of a block's mass lost by pooling (``exp(mean z)`` against ``mean exp(z)``)."""
    return 1.0 - torch.exp(-0.5 * var)


def error_tables(stats: PyramidStats, num_blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-option detail loss ``s`` and mass loss ``w``, each ``[B, H, Nq, n, 5]`` float32 in ``OPTIONS`` order.

    Only the first ``num_blocks`` KV blocks (default: all) are tabled; ``s`` is normalised by
    the row's total squared mass and ``w`` by the row's total mass (both over all blocks).
    """
    n = stats.mass.shape[-1] if num_blocks is None else num_blocks
    mass = stats.mass.float()
    sq = stats.sq_mass.float()
    pn = (mass / mass.sum(-1, keepdim=True).clamp(min=1e-30))[..., :n]
    qn = (sq / sq.sum(-1, keepdim=True).clamp(min=1e-30))[..., :n]
    var = stats.logit_var[..., :n, :].float().clamp(min=0)  # factors 2, 4, 8
    f, g = detail_loss(var), mass_loss(var)
    zero = torch.zeros_like(pn)
    sep = torch.stack([qn, qn * f[..., 2], qn * f[..., 1], qn * f[..., 0], zero], -1)
    lost = torch.stack([pn, pn * g[..., 2], pn * g[..., 1], pn * g[..., 0], zero], -1)
    return sep, lost


def option_costs(block_tokens: torch.Tensor) -> torch.Tensor:
    """Cost of each option ``[n, 5]`` int64 in 1/8 tokens for KV blocks of ``block_tokens`` ``[n]`` real tokens."""
    n = block_tokens.to(torch.int64) * COST_UNIT
    return torch.stack([torch.zeros_like(n)] + [n // s for s in OPTIONS[1:]], -1)


def knapsack_options(
    err: torch.Tensor, cost: torch.Tensor, budget: torch.Tensor, start: torch.Tensor | None = None
) -> torch.Tensor:
    """Choose one option per block to minimise the row's summed error within the row's budget.

    err: ``[..., n, 5]`` (options by increasing cost, option 0 costs nothing); cost: ``[n, 5]``
    int64; budget: ``[...]`` int64, the cost allowed on top of ``start`` (default: every block
    at option 0). Returns the chosen option index ``[..., n]`` int64 (never below ``start``).

    Greedy on the lower convex hulls: from each block's current option the next hull point is
    the costlier option that removes the most error per unit of cost; the hull steps of all
    blocks of a row are sorted by that rate (stable, so ties keep block order and each block's
    steps stay in hull order) and taken, in order, while their cumulative cost fits the budget.
    """
    *lead, n, k = err.shape
    cost = cost.to(err.device).expand(*lead, n, k)
    if start is None:
        start = torch.zeros(*lead, n, dtype=torch.int64, device=err.device)
    cur = start
    opt_index = torch.arange(k, device=err.device)
    rates, steps, targets = [], [], []
    for _ in range(k - 1):
        e_cur = err.gather(-1, cur.unsqueeze(-1))
        c_cur = cost.gather(-1, cur.unsqueeze(-1))
        gain = e_cur - err
        extra = (cost - c_cur).to(err.dtype)
        ok = (opt_index > cur.unsqueeze(-1)) & (gain > 0) & (extra > 0)
        rate = torch.where(ok, gain / extra.clamp(min=1), torch.full_like(gain, -1.0))
        best_rate, nxt = rate.max(-1)
        move = best_rate > 0
        nxt = torch.where(move, nxt, cur)
        rates.append(torch.where(move, best_rate, torch.full_like(best_rate, -1.0)))
        steps.append(cost.gather(-1, nxt.unsqueeze(-1)).squeeze(-1) - c_cur.squeeze(-1))
        targets.append(nxt)
        cur = nxt
    rate = torch.stack(rates, -2).flatten(-2)  # [..., (k-1) * n], step-major
    step = torch.stack(steps, -2).flatten(-2)
    order = torch.sort(rate, dim=-1, descending=True, stable=True).indices
    valid = rate.gather(-1, order) > 0
    spent = torch.cumsum(torch.where(valid, step.gather(-1, order), torch.zeros_like(step)), -1)
    take = valid & (spent <= budget.unsqueeze(-1))
    taken = torch.zeros_like(take).scatter_(-1, order, take).view(*lead, k - 1, n)
    chosen = start
    for s, tgt in enumerate(targets):
        chosen = torch.where(taken[..., s, :], tgt, chosen)
    return chosen


def allocate_levels_reference(
    stats: PyramidStats,
    budget: torch.Tensor | int,
    block_tokens: torch.Tensor,
    *,
    num_blocks: int | None = None,
    caps: torch.Tensor | None = None,
    iterations: int = 2,
    start_loss: float = 0.1,
) -> torch.Tensor:
    """Level map ``[B, H, Nq, Nk]`` int64 minimising the modelled error within ``budget`` per row.

    stats:        block statistics (``estimate_pyramid_statistics``).
    budget:       work per query-block row, in 1/8 tokens (``COST_UNIT``): an int or ``[B, H, Nq]``.
    block_tokens: real tokens of each KV block ``[Nk]`` (the last block may be partial).
    num_blocks:   only the first ``num_blocks`` KV blocks compete; the others get level 0 here.
    caps:         optional largest allowed pooling factor per KV block ``[B, H, Nk]`` (similarity cap).
    iterations:   knapsack solves; each re-linearises the renormalisation term around the last
                  one (2 is as good as more on the benchmark inputs; see docs/allocation.md).
    start_loss:   the mass loss ``W`` assumed before the first solve.

    The row's most massive block is always level 1 (and always fits: the budget is raised to
    its cost where smaller), whatever the statistics hold: they are sanitised first (``finite_stats``).
    """
    stats = finite_stats(stats)
    nk = stats.mass.shape[-1]
    n = nk if num_blocks is None else num_blocks
    sep, lost = error_tables(stats, n)
    cost = option_costs(block_tokens[:n])
    lead = sep.shape[:-2]
    # the row's best block is level 1: every other option of it costs "infinite" error
    best = stats.mass[..., :n].argmax(-1, keepdim=True)  # first maximum: deterministic
    is_best = torch.zeros(sep.shape[:-1], dtype=torch.bool, device=sep.device).scatter_(-1, best, True)
    blocked = is_best.unsqueeze(-1) & (torch.arange(len(OPTIONS), device=sep.device) < len(OPTIONS) - 1)
    if caps is not None:
        levels = torch.tensor(OPTIONS, device=sep.device)
        too_coarse = (levels > caps[..., :n].unsqueeze(-2).unsqueeze(-1)) & (levels > 0)
        blocked = blocked | too_coarse
    budget = torch.as_tensor(budget, dtype=torch.int64, device=sep.device).expand(lead)
    best_cost = cost[:, -1].to(sep.device)[best.squeeze(-1)]
    budget = torch.maximum(budget, best_cost)
    loss = torch.full(lead, float(start_loss), dtype=sep.dtype, device=sep.device)
    detail = torch.zeros_like(loss)
    chosen = None
    rounds = max(1, iterations)
    for it in range(rounds):
        weight = 2.0 * (loss + detail) / (1.0 - loss).clamp(min=0.05)
        err = (sep + weight[..., None, None] * lost).masked_fill(blocked, _HUGE)
        chosen = knapsack_options(err, cost, budget)
        if it == rounds - 1:
            break
        loss = lost.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).sum(-1)
        detail = sep.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).sum(-1)
    level_of = torch.tensor(OPTIONS, dtype=torch.int64, device=sep.device)
    out = torch.zeros(*lead, nk, dtype=torch.int64, device=sep.device)
    out[..., :n] = level_of[chosen]
    return out


def row_budget(target_density: float, kv_tokens: int, forced_tokens: int = 0) -> int:
    """Budget per query-block row in 1/8 tokens: ``target_density`` of ``kv_tokens``, less ``forced_tokens``.

    ``forced_tokens`` are KV tokens every row sees at level 1 anyway (text), so the row's
    total work, forced blocks included, stays at the target.
    """
    return max(0, int(target_density * kv_tokens * COST_UNIT) - int(forced_tokens) * COST_UNIT)
