"""What a request may ask: one definition of each limit, applied by the ingress, the router and the engine.

Each check raises the engine's typed error with one message wherever it runs, naming both numbers (what the
request needs, what the limit holds) and the request field to change; the ingress answers it with a 400.
"""

from __future__ import annotations

from collections.abc import Iterable

from pagedserve.engine.errors import InvalidRequestError, RequestTooLargeError


CONTEXT = "this model's context"
KV_CACHE = "a replica's whole KV cache"


def too_large(num_prompt_tokens: int, max_new_tokens: int, limit_tokens: int, limit: str) -> RequestTooLargeError:
    """The error of a request whose prompt + new tokens exceed `limit_tokens`; `limit` names what holds them."""
    needed = num_prompt_tokens + max_new_tokens
    return RequestTooLargeError(
        f"the request needs {needed} tokens ({num_prompt_tokens} in the prompt + {max_new_tokens} to generate) "
        f"but {limit} holds {limit_tokens}; shorten the prompt or lower max_tokens",
        param="prompt" if num_prompt_tokens >= limit_tokens else "max_tokens",
    )


def check_fits(num_prompt_tokens: int, max_new_tokens: int, limit_tokens: int, limit: str) -> None:
    """Raise `too_large` when prompt + new tokens exceed `limit_tokens`."""
    if num_prompt_tokens + max_new_tokens > limit_tokens:
        raise too_large(num_prompt_tokens, max_new_tokens, limit_tokens, limit)


def check_token_ids(token_ids: Iterable[int], vocab_size: int, param: str) -> None:
    """Raise `InvalidRequestError` for the first token id outside [0, vocab_size)."""
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})", param=param)
