"""Prompt caches found again by content, for transformers' ``generate`` on :class:`TieredCache`::

    caches = PromptCaches(model_id="my-model")
    cache, found = caches.lookup(prompt_ids)          # the longest kept prompt this one starts with (0: none)
    cache = cache or TieredCache(model.config)        # a copy of it, cropped to what matched: its own to use
    model.generate(prompt, cache=cache, ...)          # computes the prompt's tokens after ``found`` only
    caches.add(prompt_ids, cache)                     # keep it for later prompts (PromptCaches closes it)

transformers' own recipe for reusing a prompt's KV is ``copy.deepcopy(prompt_cache)`` of one cache the caller
chose; this finds which, by the prompt's tokens: each kept cache is indexed under kvtier's 128-bit chained keys of
its whole blocks (``kvtier.prefix``: the model's KV layout, ``model_id`` and the block size in them), a lookup
walks a new prompt's keys, and the hit is deep-copied and cropped: its resident layers' whole pages before the
crop stay shared with the kept cache (``TieredCache.__deepcopy__``), the rest is copied from whichever tier. Kept
caches go down the tiers like any idle TieredCache: their manager's demoter sends their pages to host memory or
NVMe under pressure.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from kvtier.errors import InvalidArgumentError
from kvtier.integrations.transformers import TieredCache
from kvtier.prefix import block_keys, fingerprint

__all__ = ["PromptCaches"]


class PromptCaches:
    """Kept prompt caches of one model, found by the tokens a new prompt starts with (see the module docstring)."""

    def __init__(self, model_id: str = "", block_size: int = 16) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise InvalidArgumentError(f"block_size must be a positive int (tokens a key covers), got {block_size!r}")
        self.model_id, self.block_size = model_id, block_size
        self.layout: bytes | None = None  # from the first cache kept: later ones must hold the same layout
        self.caches: list[TieredCache] = []
        self.index: dict[bytes, tuple[TieredCache, int]] = {}  # key -> (a cache holding it, tokens up to it)
        self.hits = self.misses = self.tokens_found = 0

    def _layout_of(self, cache: TieredCache) -> bytes:
        dtype = cache.spaces[0].dtype
        return fingerprint(len(cache.layers), cache.num_kv_heads, cache.head_dim, str(dtype), self.block_size,
                           model=self.model_id)

    def _keys(self, token_ids: Sequence[int] | torch.Tensor) -> list[bytes]:
        assert self.layout is not None  # keys exist only once a cache was kept
        return block_keys(_ids(token_ids), self.block_size, self.layout)

    def add(self, token_ids: Sequence[int] | torch.Tensor, cache: TieredCache) -> int:
        """Keep ``cache``, which holds the KV of ``token_ids`` from the first (one row: a prompt, and maybe its
        answer; ids past what it holds, such as ``generate``'s last token, are left out), for later prompts;
        PromptCaches closes it (``close``). Return the whole blocks it made findable."""
        ids = _ids(token_ids)
        if not isinstance(cache, TieredCache) or not cache.spaces or cache.rows != 1:
            raise InvalidArgumentError("add takes a TieredCache holding one row of KV (after a prefill)")
        layout = self._layout_of(cache)
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise InvalidArgumentError("this cache holds KV of another layout (layers, heads, head dim or dtype) "
                                       "than the caches kept so far: one PromptCaches per model")
        ids = ids[:cache.get_seq_length()]
        if cache not in self.caches:
            self.caches.append(cache)
        cache.idle()  # kept, not stepped: its pages may go down the tiers under pressure
        added = 0
        for n, key in enumerate(self._keys(ids), start=1):
            if key not in self.index:  # a key kept already keeps its cache (the same tokens, the same KV)
                self.index[key] = (cache, n * self.block_size)
                added += 1
        return added

    def lookup(self, token_ids: Sequence[int] | torch.Tensor) -> tuple[TieredCache | None, int]:
        """A cache of its own for a new prompt, holding the longest prefix of it that a kept cache holds (whole
        blocks, and never the whole prompt: ``generate`` computes at least its last token), and how many tokens
        that is; ``(None, 0)`` when none starts like it."""
        ids = _ids(token_ids)
        found: tuple[TieredCache, int] | None = None
        if self.layout is not None and len(ids) > 1:
            for key in self._keys(ids[:len(ids) - 1]):
                hit = self.index.get(key)
                if hit is None:
                    break
                found = hit
        if found is None:
            self.misses += 1
            return None, 0
        source, tokens = found
        twin = copy.deepcopy(source)  # resident whole pages shared, the rest copied once from whichever tier
        extra = twin.get_seq_length() - tokens
        if extra:
            twin.crop(-extra)
        self.hits += 1
        self.tokens_found += tokens
        return twin, tokens

    def stats(self) -> dict[str, int]:
        return {"caches": len(self.caches), "blocks_indexed": len(self.index), "hits": self.hits,
                "misses": self.misses, "tokens_found": self.tokens_found}

    def close(self) -> None:
        """Close every kept cache (their pages go back) and forget them."""
        for cache in self.caches:
            cache.close()
        self.caches, self.index = [], {}

    def __enter__(self) -> "PromptCaches":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _ids(token_ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() == 2 and token_ids.shape[0] == 1:
            token_ids = token_ids[0]
        if token_ids.dim() != 1:
            raise InvalidArgumentError(f"token ids must be one row, got a tensor of shape {tuple(token_ids.shape)}")
        return [int(t) for t in token_ids.tolist()]
    return [int(t) for t in token_ids]
