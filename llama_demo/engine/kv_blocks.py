"""The KV cache's blocks: which sequence holds which, and which hold a known prefix.

The KV cache is one pool of blocks of `block_size` positions (model.transformer allocates their
memory; this module only counts them). A sequence's block table lists its blocks in position
order, so capacity is tokens, not rows: a short chat holds a few blocks, a long one many.

Blocks are shared by content (vLLM's automatic prefix caching): a full block is named by a digest
of its tokens and of every token before them, so two sequences with the same name hold the same
keys and values there. A block whose last holder has finished keeps its name and its contents
until the pool needs it back (least recently released first), and any later or concurrent
sequence whose tokens start the same way takes it instead of prefilling those tokens again, with
no copy: a shared block is full, so nobody writes to it.

Every rank keeps the same pool and changes it in the same order (the scheduler's), so every rank
places every token in the same block.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

ROOT = b"llama_demo kv"  # the parent digest of a sequence's first block


def block_digest(parent: bytes, tokens) -> bytes:
    """The name of a full block: its tokens and its parent's name (so, every token before it).
    A cryptographic digest: a collision would hand one prompt another's keys and values."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def prefix_digests(tokens, block_size: int, blocks: int) -> list[bytes]:
    """Names of the first `blocks` full blocks of `tokens`."""
    names, parent = [], ROOT
    for i in range(blocks):
        parent = block_digest(parent, tokens[i * block_size: (i + 1) * block_size])
        names.append(parent)
    return names


class BlockPool:
    """The blocks of the KV cache: who holds each (a count), which are named, which are free.

    A block is in one of three states: held (by one sequence or more, `holders` > 0), cached
    (held by nobody but named: its contents are a known prefix, reusable until evicted), or free.
    Allocation takes a free block first, then evicts the least recently released cached one."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs at least one block of one position (got {num_blocks} x {block_size})")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))  # lowest first: a fresh pool fills in order
        self.cached: OrderedDict[int, None] = OrderedDict()  # named, held by nobody; least recently released first
        self.holders = [0] * num_blocks
        self.name_of: dict[int, bytes] = {}
        self.by_name: dict[bytes, int] = {}

    @property
    def available(self) -> int:
        """Blocks an allocation can have now (free, or cached and evictable)."""
        return len(self.free) + len(self.cached)

    @property
    def used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.available

    def find(self, names: list[bytes]) -> list[int]:
        """The blocks holding the longest run of `names` from the first (a prefix of the pool's)."""
        found = []
        for name in names:
            block = self.by_name.get(name)
            if block is None:
                break
            found.append(block)
        return found

    def hold(self, block: int) -> None:
        """One more holder of a named block found by `find`."""
        if self.holders[block] == 0:
            del self.cached[block]
        self.holders[block] += 1

    def allocate(self, evict: bool = True) -> int | None:
        """A block for one holder, or None when every block is held (or, without `evict`, when no
        block is free: a speculative proposal does not push a cached prefix out)."""
        if self.free:
            block = self.free.popleft()
        elif self.cached and evict:
            block, _ = self.cached.popitem(last=False)  # the least recently released prefix goes
            del self.by_name[self.name_of.pop(block)]
        else:
            return None
        self.holders[block] = 1
        return block

    def release(self, block: int) -> None:
        """One holder fewer; a block nobody holds stays cached if named, else is free."""
        self.holders[block] -= 1
        assert self.holders[block] >= 0, f"block {block} released more often than held"
        if self.holders[block] == 0:
            if block in self.name_of:
                self.cached[block] = None  # most recently released last
            else:
                self.free.append(block)

    def name(self, block: int, name: bytes) -> None:
        """Name a held block now full. A name another block already has (two sequences computed
        the same prefix at once) stays with that block: this one stays unnamed, freed when released."""
        if name not in self.by_name and block not in self.name_of:
            self.by_name[name] = block
            self.name_of[block] = name

    def forget(self) -> None:
        """Drop every name (the cached blocks become free): for a benchmark's fresh start."""
        while self.cached:
            block, _ = self.cached.popitem(last=False)
            self.free.append(block)
        self.by_name.clear()
        self.name_of.clear()
