"""The server's prefix cache: keys and values of recent prompts, kept in fixed-size blocks.

Clients resend the same long prefix (a file, a conversation, an agent's instructions) with a
different ending. The cache keeps each prompt's whole blocks of BLOCK tokens after its
prefill, so a later prompt that starts with the same tokens copies those blocks into its
slot's cache row and prefills only the rest.

Host side, `PrefixIndex`: a block is named by a hash chain, key = hash(parent's key, its
tokens), so a key stands for the whole prefix up to the block's end. A hash only finds a
candidate: a lookup accepts a block only if its stored tokens equal the prompt's and its
stored parent is the block accepted just before, so by induction every reused block holds
exactly the keys and values of the prompt's own tokens at the same positions, whatever the
hash does. Blocks are evicted least recently used first, and only blocks no other block
continues (a chain never loses its middle).

Device side, `Pool`: one (N, K, BLOCK, H) array per layer for keys and one for values,
allocated once at the memory budget. `restore` copies listed pool blocks into cache rows,
`save_jit` copies cache row positions into pool blocks; both loop over a padded index list
with a traced count, so one compiled program serves any number of blocks.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spark_model.kv_cache import KVCache

# Tokens per block. A reuse stops at the last whole block inside the shared prefix, so the
# request prefills what is left of that prefix plus its own new tokens: smaller blocks
# leave less (with 64, a 2,000-token prefix and 20 new tokens left 37 tokens, a 64-token
# prefill; with 16, 21 tokens, a 32-token one, about half the time), while copying blocks
# in and out costs about the same (125 blocks of 16 restore in 1.0 ms, 31 of 64 in 0.7 ms,
# for spark-tiny on the development machine).
BLOCK = 16
_ROOT = 0x5EED  # the parent key of a prompt's first block


def block_bytes(cfg, block: int = BLOCK) -> int:
    """Bytes one block of `block` positions takes: keys and values of every layer."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * block * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


@dataclasses.dataclass(eq=False)
class Block:
    """One cached block: its key, the tokens it holds, the block before it, its pool row."""

    key: int
    tokens: tuple[int, ...]
    parent: "Block | None"
    row: int
    children: int = 0  # cached blocks that continue this one


class PrefixIndex:
    """Which pool rows hold which token blocks; LRU eviction within `n_blocks` rows."""

    def __init__(self, n_blocks: int, block: int = BLOCK,
                 key_fn: Callable[[tuple], int] = hash):
        if n_blocks < 1 or block < 1:
            raise ValueError("a prefix cache needs at least one block of at least one token")
        self.n_blocks, self.block = n_blocks, block
        self.key_fn = key_fn  # replaceable, so tests can force collisions
        self._free = list(range(n_blocks - 1, -1, -1))
        self._blocks: collections.OrderedDict[int, Block] = collections.OrderedDict()  # LRU first
        # Every key present from the start: /health reads them from another thread.
        self.counts: collections.Counter[str] = collections.Counter(dict.fromkeys(
            ("lookups", "hits", "tokens_reused", "blocks_inserted", "blocks_evicted"), 0))

    def __len__(self) -> int:
        return len(self._blocks)

    def _key(self, parent: Block | None, tokens: tuple[int, ...]) -> int:
        return self.key_fn((_ROOT if parent is None else parent.key, tokens))

    def _blocks_of(self, ids: list[int], n: int) -> Iterable[tuple[int, tuple[int, ...]]]:
        b = self.block
        return ((j, tuple(ids[j * b:(j + 1) * b])) for j in range(n))

    def lookup(self, ids: list[int], max_blocks: int) -> list[Block]:
        """The longest chain of cached blocks that holds ids[:n * BLOCK], n <= max_blocks,
        each verified token by token; its blocks become the most recently used."""
        chain: list[Block] = []
        parent = None
        for _, tokens in self._blocks_of(ids, min(max_blocks, len(ids) // self.block)):
            found = self._blocks.get(self._key(parent, tokens))
            if found is None or found.tokens != tokens or found.parent is not parent:
                break  # absent, or a hash that names other tokens: recompute from here
            chain.append(found)
            parent = found
        for blk in chain:
            self._blocks.move_to_end(blk.key)
        return chain

    def insert(self, ids: list[int], chain: list[Block], pinned: set[int]
               ) -> list[tuple[int, int]]:
        """Add the whole blocks of `ids` after `chain` (the blocks it reused), evicting least
        recently used blocks other than those in `pinned` (Block ids) and this prompt's own.
        Returns (pool row, first position) for each block whose keys and values must now
        be copied from the prompt's cache row."""
        parent = chain[-1] if chain else None
        mine = set(pinned) | {id(b) for b in chain}
        copies = []
        n_full = len(ids) // self.block
        for j, tokens in list(self._blocks_of(ids, n_full))[len(chain):]:
            key = self._key(parent, tokens)
            found = self._blocks.get(key)
            if found is not None:
                if found.tokens != tokens or found.parent is not parent:
                    break  # the key is taken by other tokens: cache no further
                self._blocks.move_to_end(key)  # another request cached it already
                parent = found
                mine.add(id(found))
                continue
            row = self._take_row(mine)
            if row is None:
                break  # every block is in use by this round's requests
            blk = Block(key, tokens, parent, row)
            self._blocks[key] = blk
            if parent is not None:
                parent.children += 1
            mine.add(id(blk))
            copies.append((row, j * self.block))
            parent = blk
            self.counts["blocks_inserted"] += 1
        return copies

    def _take_row(self, keep: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        for key, blk in self._blocks.items():  # least recently used first
            if blk.children == 0 and id(blk) not in keep:
                del self._blocks[key]
                if blk.parent is not None:
                    blk.parent.children -= 1
                self.counts["blocks_evicted"] += 1
                return blk.row
        return None

    def stats(self, bytes_per_block: int) -> dict:
        return {"block_tokens": self.block, "blocks_total": self.n_blocks,
                "blocks_used": len(self._blocks),
                "bytes_budget": self.n_blocks * bytes_per_block,
                "bytes_used": len(self._blocks) * bytes_per_block, **self.counts}


# ---- device side -----------------------------------------------------------------------

@struct.dataclass
class Pool:
    """Cached blocks of every layer: tuples of (N, K, BLOCK, H) arrays."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


def init_pool(cfg, n_blocks: int, block: int = BLOCK) -> Pool:
    shape = (n_blocks, cfg.n_kv_heads, block, cfg.head_dim)
    dt = jnp.dtype(cfg.dtype)
    dev = jax.devices()[0]
    return Pool(k=tuple(jnp.zeros(shape, dt, device=dev) for _ in range(cfg.n_layers)),
                v=tuple(jnp.zeros(shape, dt, device=dev) for _ in range(cfg.n_layers)))


@struct.dataclass
class Copies:
    """A padded list of block copies for the device: (cache row, first position, pool row)
    of each, as int32 arrays of a fixed length, and how many are real."""

    row_m: np.ndarray
    pos_m: np.ndarray
    pool_m: np.ndarray
    count: np.ndarray

    @classmethod
    def make(cls, entries: list[tuple[int, int, int]], length: int) -> "Copies":
        if len(entries) > length:
            raise ValueError(f"{len(entries)} block copies in a list of {length}")
        out = np.zeros((3, length), np.int32)
        if entries:
            out[:, :len(entries)] = np.array(entries, np.int32).T
        return cls(out[0], out[1], out[2], np.asarray(len(entries), np.int32))


def restore(cache: KVCache, pool: Pool, row_m, pos_m, pool_m, count) -> KVCache:
    """Copy pool block pool_m[i] into cache row row_m[i] at positions pos_m[i] onwards, for
    i < count (traceable; in place when the cache is donated)."""
    zero = jnp.zeros((), jnp.int32)

    def body(i, kv):
        ks, vs = kv
        at = (row_m[i], zero, pos_m[i], zero)

        def put(big, src):
            return jax.lax.dynamic_update_slice(
                big, jax.lax.dynamic_index_in_dim(src, pool_m[i], 0, keepdims=True), at)

        return (tuple(put(c, p) for c, p in zip(ks, pool.k)),
                tuple(put(c, p) for c, p in zip(vs, pool.v)))

    ks, vs = jax.lax.fori_loop(0, count, body, (cache.k, cache.v))
    return KVCache(k=ks, v=vs)


@functools.partial(jax.jit, donate_argnums=(0,))
def save_jit(pool: Pool, cache: KVCache, row_m, pos_m, pool_m, count) -> Pool:
    """Copy positions pos_m[i] .. + BLOCK of cache row row_m[i] into pool block pool_m[i],
    for i < count."""
    zero = jnp.zeros((), jnp.int32)
    block = pool.k[0].shape[2]

    def body(i, kv):
        ks, vs = kv

        def put(dst, big):
            src = jax.lax.dynamic_slice(big, (row_m[i], zero, pos_m[i], zero),
                                        (1, big.shape[1], block, big.shape[3]))
            return jax.lax.dynamic_update_slice(dst, src, (pool_m[i], zero, zero, zero))

        return (tuple(put(p, c) for p, c in zip(ks, cache.k)),
                tuple(put(p, c) for p, c in zip(vs, cache.v)))

    ks, vs = jax.lax.fori_loop(0, count, body, (pool.k, pool.v))
    return Pool(k=ks, v=vs)


class PrefixCache:
    """The index and the pool together, as the engine thread uses them.

    budget_bytes: the pool's size (whole blocks); more than the memory available is refused
    before anything is allocated. cache_length: positions of a slot's cache row (a reuse
    is cut short where the prefill after it would run past the row). max_batch: slots.
    """

    def __init__(self, cfg, budget_bytes: int, cache_length: int, max_batch: int, *,
                 block: int = BLOCK, key_fn: Callable[[tuple], int] = hash):
        from spark_model.formats.memory import available_memory, size_text

        self.per_block = block_bytes(cfg, block)
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) \
                or budget_bytes < self.per_block:
            raise ValueError(f"a prefix cache of {budget_bytes!r} bytes holds no block: one "
                             f"block of {block} tokens takes {size_text(self.per_block)} for "
                             f"this model")
        avail = available_memory()
        if avail is not None and budget_bytes > avail:
            raise ValueError(f"a prefix cache of {size_text(budget_bytes)} is more than the "
                             f"{size_text(avail)} of memory available; give a smaller budget")
        self.index = PrefixIndex(budget_bytes // self.per_block, block, key_fn)
        self.pool = init_pool(cfg, self.index.n_blocks, block)
        self.block, self.cache_length = block, cache_length
        self.copy_length = max_batch * (cache_length // block)  # block copies per call

    def reuse(self, ids: list[int], bucket: Callable[[int], int]) -> list[Block]:
        """The cached blocks a prompt reuses: the longest verified chain that leaves at
        least one token to prefill, cut short until the prefill of the rest (padded to
        bucket(rest) positions) fits in the cache row."""
        c = self.index.counts
        c["lookups"] += 1
        chain = self.index.lookup(ids, (len(ids) - 1) // self.block)
        n = len(chain)
        while n and n * self.block + bucket(len(ids) - n * self.block) > self.cache_length:
            n -= 1
        if n:
            c["hits"] += 1
            c["tokens_reused"] += n * self.block
        return chain[:n]

    def fits(self, starts: list[int], width: int) -> bool:
        """Whether prompts continuing at `starts`, padded to `width`, fit in a cache row."""
        return all(s + width <= self.cache_length for s in starts)

    def restore_list(self, chains: list[list[Block]]) -> Copies:
        """The block copies that put each request's reused blocks back (row_m: request)."""
        entries = [(i, j * self.block, blk.row) for i, chain in enumerate(chains)
                   for j, blk in enumerate(chain)]
        return Copies.make(entries, len(chains) * (self.cache_length // self.block))

    def save(self, cache: KVCache, admitted: list[tuple[int, list[int], list[Block]]],
             pinned: set[int]) -> int:
        """Add the admitted prompts' whole blocks (slot, ids, reused chain) to the cache,
        copying them from the slots' cache rows; returns the number of blocks copied."""
        entries = [(slot, pos, row) for slot, ids, chain in admitted
                   for row, pos in self.index.insert(ids, chain, pinned)]
        if entries:
            copies = Copies.make(entries, self.copy_length)
            self.pool = save_jit(self.pool, cache, copies.row_m, copies.pos_m, copies.pool_m,
                                 copies.count)
        return len(entries)

    def clear(self) -> None:
        """Forget every block (the pool's contents are then never read)."""
        counts = self.index.counts
        self.index = PrefixIndex(self.index.n_blocks, self.block, self.index.key_fn)
        self.index.counts = counts

    def stats(self) -> dict:
        return {"enabled": True, **self.index.stats(self.per_block)}
