"""Errors the router raises into the ingress's handle calls.

Kept out of router.py on purpose: Ray pickles a custom request-router's module *by value*
(`RequestRouterConfig` registers it with cloudpickle), so a class defined there would arrive in the
ingress as a copy that `isinstance` does not recognize. Classes here travel by reference.
"""

from __future__ import annotations


class ServiceOverloadedError(Exception):
    """No replica has room and the wait queue is full or the wait timed out; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class ChannelLostError(Exception):
    """The stream channel from an engine replica ended or failed while requests of this ingress were on it
    (serve_app/stream_channel.py): their deltas can no longer arrive, so they count as lost with the replica."""


class KeyOverShareError(Exception):
    """No replica has room the request's API key may take (other keys are owed the rest, serve_app/key_shares.py)
    and the key already holds blocks. Never reaches a client: the ingress's fair queue holds the request and
    sends it again when one of its key's requests ends (serve_app/fair_queue.py)."""
