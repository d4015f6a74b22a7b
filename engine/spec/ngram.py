"""The n-gram proposer (prompt lookup): propose the tokens that followed an earlier occurrence of the
request's last n tokens, n from `prompt_lookup_max` down to `prompt_lookup_min`, the most recent
occurrence first.

Per request it keeps, for each n, a map from every n-gram seen to the position right after its latest
occurrence that has a token following it; the maps grow as tokens arrive (indexed on the next call), so a
proposal costs O(max - min + 1) lookups however long the request is. Pure Python, no torch. Owned by the
engine: `forget` drops a finished request's maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedserve.engine.core.request import Request


@dataclass
class _Index:
    num_indexed: int = 0  # tokens [0, num_indexed) are in the maps
    # n -> n-gram -> the position right after its latest occurrence (a token exists there).
    after: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min ({prompt_lookup_min}) <= prompt_lookup_max "
                             f"({prompt_lookup_max})")
        self.num_speculative_tokens = num_speculative_tokens
        self.prompt_lookup_min = prompt_lookup_min
        self.prompt_lookup_max = prompt_lookup_max
        self._indexes: dict[str, _Index] = {}

    def propose(self, request_id: str, token_ids: list[int], max_tokens: int | None = None) -> list[int]:
        """Up to `min(k, max_tokens)` tokens to follow `token_ids` (every one known: no placeholders), or []
        when the last n tokens occurred nowhere earlier for any n in the window."""
        limit = self.num_speculative_tokens if max_tokens is None else min(self.num_speculative_tokens, max_tokens)
        if limit <= 0:
            return []
        return self._lookup(self._index(request_id, token_ids), token_ids, limit)

    def propose_after(self, request_id: str, token_ids: list[int], extension: list[int], max_tokens: int) -> list[int]:
        """Up to `max_tokens` (not capped at k) tokens to follow `token_ids + extension`, where `token_ids` are the
        request's known tokens and `extension` tokens it may have next (a verification in flight: its proposals).
        The lookup finds the last n tokens among the known ones only; the extension is not indexed, so nothing
        is taken back if it does not come."""
        if max_tokens <= 0:
            return []
        return self._lookup(self._index(request_id, token_ids), token_ids + extension, max_tokens)

    def _index(self, request_id: str, token_ids: list[int]) -> _Index:
        """The request's maps, grown to cover `token_ids` (every n-gram that ends before the last token, so that a
        token follows it)."""
        index = self._indexes.setdefault(request_id, _Index())
        num_tokens = len(token_ids)
        if num_tokens < index.num_indexed:  # tokens were taken back: start over (not expected)
            index = self._indexes[request_id] = _Index()
        for end in range(max(index.num_indexed, 1), num_tokens):
            for n in range(self.prompt_lookup_min, min(self.prompt_lookup_max, end) + 1):
                index.after.setdefault(n, {})[tuple(token_ids[end - n:end])] = end
        index.num_indexed = max(index.num_indexed, num_tokens)
        return index

    def _lookup(self, index: _Index, token_ids: list[int], limit: int) -> list[int]:
        num_tokens = len(token_ids)
        for n in range(min(self.prompt_lookup_max, num_tokens), self.prompt_lookup_min - 1, -1):
            start = index.after.get(n, {}).get(tuple(token_ids[num_tokens - n:]))
            if start is not None:
                return token_ids[start:start + limit]
        return []

    def propose_batch(self, requests: Sequence[Request], max_tokens: Sequence[int]) -> dict[str, list[int]]:
        """`propose` for each request (every token known), by request id."""
        return {request.request_id: self.propose(request.request_id, request.all_token_ids, limit)
                for request, limit in zip(requests, max_tokens)}

    def forget(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)
