"""A step's tokens grouped by how they attend, and where their keys go in the paged KV pool.

Its own module so that the transformer and the C decode step (native_decode.py), which both
take parts, import it and not each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Part:
    """Tokens of a step that attend alike: B sequences (the rows of `tables`, their block tables),
    each with T new tokens at positions `pos` (B, T); they are `tokens` of the step's flat order.
    The decode rows of a step are one part (T = 1), each prompt chunk another (B = 1)."""
    tokens: slice
    tables: torch.Tensor  # (B, blocks) long: each sequence's cache blocks in position order
    pos: torch.Tensor  # (B, T) absolute positions
    block_size: int
    kv_len: int  # keys to attend to: the largest position + 1
    mask: torch.Tensor | None  # (B, 1, T, kv_len): each query sees keys at or before its position
    write_blocks: torch.Tensor  # (B T,) the block and offset in it where each token's keys go
    write_offsets: torch.Tensor

    @classmethod
    def of(cls, first_token: int, tables: torch.Tensor, pos: torch.Tensor, block_size: int,
           kv_len: int | None = None) -> "Part":
        """`kv_len`: the largest position + 1 as the caller knows it on the host (the engine does:
        its sequences' positions); without it, read from `pos` (a host sync on a GPU)."""
        B, T = pos.shape
        kv_len = int(pos.max()) + 1 if kv_len is None else kv_len
        if kv_len > tables.shape[1] * block_size:
            raise IndexError(f"position {kv_len - 1} is past its block table ({tables.shape[1]} blocks of {block_size})")
        # one token of one sequence sees all its keys (kv_len = position + 1): no mask needed; in a
        # batch, a shorter sequence's table is padded (with any block) past its own keys: masked
        mask = None if B * T == 1 else (torch.arange(kv_len, device=pos.device)[None, None, :] <= pos[:, :, None])[:, None]
        write_blocks = tables.gather(1, torch.div(pos, block_size, rounding_mode="floor")).reshape(-1)
        return cls(slice(first_token, first_token + B * T), tables, pos, block_size, kv_len, mask, write_blocks,
                   (pos % block_size).reshape(-1))

    def gather(self, cache: torch.Tensor) -> torch.Tensor:
        """(B, kv heads, kv_len, hd): the part's keys (or values) from the pool (blocks, kv heads,
        block_size, hd), in position order (a copy: blocks are anywhere in the pool)."""
        B, blocks = self.tables.shape[0], -(-self.kv_len // self.block_size)
        picked = cache[self.tables[:, :blocks]]  # (B, blocks, kvh, block_size, hd)
        return picked.transpose(1, 2).flatten(2, 3)[:, :, :self.kv_len]


def padded_tables(tables: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, longest) long tensor of block tables, the shorter ones padded with block 0 (a position
    past a sequence's own keys is masked, never read as its own)."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)
