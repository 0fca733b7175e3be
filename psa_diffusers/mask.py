"""PyramidBlockMask: the compact per-row, per-level block lists that the kernels consume.

Compact form, for a level map ``M`` of shape ``[B, H, Nq, Nk]``:

* ``kv_counts``  int32 ``[B, H, Nq, 4]``: how many KV blocks row ``i`` sees at
  the pooling factors 1, 2, 4, 8.
* ``kv_indices`` int32 ``[B, H, Nq, Nk]``: a permutation of ``0..Nk-1`` per row,
  grouped by level in the order 1, 2, 4, 8, then the skipped blocks; ascending
  within each group. The first ``kv_counts[..., 0]`` entries are the level-1
  blocks, the next ``kv_counts[..., 1]`` the level-2 blocks, and so on. There are
  no sentinel values: the tail holds the skipped blocks, which kernels never read.

Everything is built with sort/cumsum on the mask's device, without host
synchronisation.
"""

from __future__ import annotations

import torch

from .config import LEVELS

_ALLOWED = (0,) + LEVELS


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return -(-a // b)


def level_rank(level_map: torch.Tensor) -> torch.Tensor:
    """Position of each level in the grouped order: 1->0, 2->1, 4->2, 8->3, 0->4."""
    lm = level_map.to(torch.int64)
    # log2 for powers of two, 4 for zero
    return torch.where(lm > 0, torch.log2(lm.clamp(min=1).double()).round().long(), torch.full_like(lm, 4))


def block_sizes(seq_len: int, block: int, num_blocks: int, device=None) -> torch.Tensor:
    """Real number of tokens in each of ``num_blocks`` blocks of ``block`` tokens: ``[num_blocks]`` float64."""
    starts = torch.arange(num_blocks, device=device, dtype=torch.float64) * block
    return (seq_len - starts).clamp(min=0, max=block)


class PyramidBlockMask:
    """Per (batch, head, query block) lists of KV blocks, grouped by pooling level.

    Build it with :meth:`from_level_map` (or ``build_block_mask``); read it back
    with :meth:`to_level_map`. ``kv_counts`` ``[B, H, Nq, 4]`` and ``kv_indices``
    ``[B, H, Nq, Nk]`` are described in the module docstring.
    """

    __slots__ = ("kv_counts", "kv_indices", "block_q", "block_kv")

    def __init__(self, kv_counts: torch.Tensor, kv_indices: torch.Tensor, *, block_q: int, block_kv: int):
        if kv_counts.dim() != 4 or kv_counts.shape[-1] != len(LEVELS):
            raise ValueError(f"kv_counts must have shape [B, H, Nq, 4], got {tuple(kv_counts.shape)}")
        if kv_indices.dim() != 4 or kv_indices.shape[:3] != kv_counts.shape[:3]:
            raise ValueError(
                f"kv_indices must have shape [B, H, Nq, Nk] matching kv_counts {tuple(kv_counts.shape)}, "
                f"got {tuple(kv_indices.shape)}"
            )
        self.kv_counts = kv_counts
        self.kv_indices = kv_indices
        self.block_q = int(block_q)
        self.block_kv = int(block_kv)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_level_map(cls, level_map: torch.Tensor, *, block_q: int, block_kv: int) -> PyramidBlockMask:
        """Compact a level map ``[B, H, Nq, Nk]`` with values in {0, 1, 2, 4, 8}.

        Raises ValueError for a value outside that set, a query row whose every
        block is 0, or a map that is not 4-D.
        """
        if not isinstance(level_map, torch.Tensor) or level_map.dim() != 4:
            shape = tuple(level_map.shape) if isinstance(level_map, torch.Tensor) else type(level_map).__name__
            raise ValueError(f"level_map must be a 4-D tensor [B, H, Nq, Nk], got {shape}")
        if level_map.is_floating_point() or level_map.is_complex() or level_map.dtype == torch.bool:
            raise ValueError(f"level_map must be an integer tensor, got dtype {level_map.dtype}")
        if min(level_map.shape) == 0:
            raise ValueError(f"level_map has an empty dimension: {tuple(level_map.shape)}")
        lm = level_map.to(torch.int64)
        valid = torch.zeros_like(lm, dtype=torch.bool)
        for v in _ALLOWED:
            valid |= lm == v
        if not bool(valid.all()):
            bad = torch.unique(lm[~valid])[:8].tolist()
            raise ValueError(f"level_map holds value(s) {bad}; allowed levels are {_ALLOWED}")
        empty = (lm == 0).all(dim=-1)
        if bool(empty.any()):
            where = empty.nonzero()[0].tolist()
            raise ValueError(
                f"level_map row (b, h, i)={tuple(where)} skips every KV block; every query block must see at least one"
            )
        return cls.from_valid_level_map(lm, block_q=block_q, block_kv=block_kv)

    @classmethod
    def from_valid_level_map(cls, level_map: torch.Tensor, *, block_q: int, block_kv: int) -> PyramidBlockMask:
        """Compact a level map ``[B, H, Nq, Nk]`` the caller knows to be valid: no checks, no host sync.

        The fast path of :meth:`from_level_map` for maps made by code (the level rules, benchmarks);
        a map with a value outside {0, 1, 2, 4, 8} or an all-zero row gives a mask the kernels misread.
        """
        lm = level_map.to(torch.int64)
        nk = lm.shape[-1]
        rank = level_rank(lm)
        key = rank * nk + torch.arange(nk, device=lm.device)
        order = torch.sort(key, dim=-1).values % nk
        counts = torch.stack([(lm == s).sum(-1) for s in LEVELS], dim=-1)
        return cls(counts.to(torch.int32), order.to(torch.int32), block_q=block_q, block_kv=block_kv)

    # ------------------------------------------------------------------ read
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, Nq, Nk)``."""
        return tuple(self.kv_indices.shape)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def to(self, device) -> PyramidBlockMask:
        return PyramidBlockMask(
            self.kv_counts.to(device), self.kv_indices.to(device), block_q=self.block_q, block_kv=self.block_kv
        )

    def to_level_map(self) -> torch.Tensor:
        """The dense level map ``[B, H, Nq, Nk]`` int64 with values in {0, 1, 2, 4, 8}."""
        nk = self.shape[-1]
        ends = self.kv_counts.to(torch.int64).cumsum(-1)  # [B, H, Nq, 4]
        pos = torch.arange(nk, device=self.device)
        # position p in the list belongs to group g = number of group ends <= p
        group = (pos.view(1, 1, 1, nk, 1) >= ends.unsqueeze(-2)).sum(-1)  # [B, H, Nq, Nk]
        levels = torch.tensor(LEVELS + (0,), device=self.device, dtype=torch.int64)[group]
        out = torch.empty_like(levels)
        out.scatter_(-1, self.kv_indices.to(torch.int64), levels)
        return out

    def check_fits(self, seq_len_q: int, seq_len_kv: int) -> None:
        """Raise ValueError unless the mask's block grid covers these sequence lengths exactly."""
        _, _, nq, nk = self.shape
        if nq != ceil_div(seq_len_q, self.block_q) or nk != ceil_div(seq_len_kv, self.block_kv):
            raise ValueError(
                f"mask with {nq}x{nk} blocks of {self.block_q}x{self.block_kv} does not fit seq_len_q={seq_len_q}, "
                f"seq_len_kv={seq_len_kv} (needs {ceil_div(seq_len_q, self.block_q)}x"
                f"{ceil_div(seq_len_kv, self.block_kv)} blocks)"
            )

    def density_map(self, seq_len_q: int, seq_len_kv: int) -> torch.Tensor:
        """FLOP-weighted density per (b, h): ``[B, H]`` float64 (docs/design.md, section 1)."""
        self.check_fits(seq_len_q, seq_len_kv)
        _, _, nq, nk = self.shape
        lm = self.to_level_map().double()
        n_kv = block_sizes(seq_len_kv, self.block_kv, nk, self.device)
        n_q = block_sizes(seq_len_q, self.block_q, nq, self.device)
        inv = torch.where(lm > 0, 1.0 / lm.clamp(min=1), torch.zeros_like(lm))
        work = (inv * n_kv).sum(-1)  # [B, H, Nq]: pooled tokens seen by each query block
        return (work * n_q).sum(-1) / (float(seq_len_q) * float(seq_len_kv))

    def head_densities(self, seq_len_q: int, seq_len_kv: int) -> torch.Tensor:
        """FLOP-weighted density of each head, the mean over the batch: ``[H]`` float64 on the mask's device.

        Computed from the per-level counts: no dense level map, no host data copied to the device and
        no host synchronisation, so it can run on every attention call (statistics, the dense fallback).
        """
        self.check_fits(seq_len_q, seq_len_kv)
        _, _, nq, nk = self.shape
        counts = self.kv_counts.to(torch.float64)  # [B, H, Nq, 4]
        inv = torch.exp2(-torch.arange(len(LEVELS), dtype=torch.float64, device=counts.device))  # 1 / LEVELS
        work = (counts * inv).sum(-1) * self.block_kv  # pooled tokens per row, as if every KV block were full
        last = seq_len_kv - (nk - 1) * self.block_kv
        if last < self.block_kv:  # the last KV block is partial: take back what it does not hold
            position = (self.kv_indices == nk - 1).to(torch.int32).argmax(-1, keepdim=True)  # [B, H, Nq, 1]
            group = (position >= self.kv_counts.to(torch.int64).cumsum(-1)).sum(-1)  # 0..3: level 1..8, 4: skipped
            work = work - torch.cat([inv, inv.new_zeros(1)])[group] * (self.block_kv - last)
        rows = block_sizes(seq_len_q, self.block_q, nq, counts.device)
        return (work * rows).sum(-1).mean(0) / (float(seq_len_q) * float(seq_len_kv))

    def density_tensor(self, seq_len_q: int, seq_len_kv: int) -> torch.Tensor:
        """Mean FLOP-weighted density as a 0-d float64 tensor on the mask's device (no host synchronisation)."""
        return self.head_densities(seq_len_q, seq_len_kv).mean()

    def density(self, seq_len_q: int, seq_len_kv: int) -> float:
        """Mean FLOP-weighted density over batch and heads: 1.0 is dense."""
        return float(self.density_map(seq_len_q, seq_len_kv).mean())

    def sparsity(self, seq_len_q: int, seq_len_kv: int) -> float:
        """``1 - density``."""
        return 1.0 - self.density(seq_len_q, seq_len_kv)

    def __repr__(self) -> str:
        b, h, nq, nk = self.shape
        per_level = self.kv_counts.double().mean(dim=(0, 1, 2))
        weights = torch.tensor([1 / s for s in LEVELS], dtype=torch.float64, device=per_level.device)
        density = float((per_level * weights).sum()) / nk  # as if every block were full
        levels = ", ".join(f"{s}x:{c:.1f}" for s, c in zip(LEVELS, per_level.tolist()))
        return (
            f"PyramidBlockMask(B={b}, H={h}, blocks={nq}x{nk} of {self.block_q}x{self.block_kv}, "
            f"mean blocks/row [{levels}], density~{density:.3f})"
        )
