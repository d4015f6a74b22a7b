"""Errors of the HTTP API: `APIError` (an OpenAI error body with its status) and the mapping of what a
replica call raises or returns onto it."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from pagedserve.engine.errors import InvalidRequestError

from pagedserve.serve_app import openai_protocol as oai
from pagedserve.serve_app.errors import ChannelLostError, ServiceOverloadedError
from pagedserve.serve_app.messages import ReplicaError

logger = logging.getLogger("ray.serve")


class APIError(Exception):
    """Raised anywhere in a route; the ingress's exception handler renders it as an OpenAI error body."""

    def __init__(
        self, status_code: int, message: str, error_type: str, param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error_type = error_type
        self.param = param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(
            oai.error_body(self.message, self.error_type, self.status_code, self.param),
            status_code=self.status_code,
            headers=self.headers,
        )


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def unwrap(exc: BaseException) -> BaseException:
    """Ray may wrap an error raised in another process; find the typed cause."""
    seen = 0
    while seen < 5:
        cause = getattr(exc, "cause", None) or exc.__cause__
        if isinstance(exc, (ServiceOverloadedError, InvalidRequestError, ChannelLostError)) or cause is None:
            return exc
        exc = cause
        seen += 1
    return exc


def routing_error(exc: BaseException) -> APIError:
    exc = unwrap(exc)
    if isinstance(exc, ServiceOverloadedError):
        return APIError(429, f"service overloaded: {exc.message}", "rate_limit_exceeded",
                        headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, InvalidRequestError):
        return bad_request(exc.message, exc.param)
    logger.warning("replica call failed: %s: %s", type(exc).__name__, exc)
    return APIError(503, f"no replica could serve the request: {type(exc).__name__}", "service_unavailable")


def replica_error(error: ReplicaError) -> APIError:
    return APIError(error.status_code, error.message, error.error_type, error.param)


def replica_lost(error: BaseException | ReplicaError) -> bool:
    """The replica under a request went away, through no fault of the request: worth sending again."""
    if isinstance(error, ReplicaError):
        return error.status_code == 503 and error.error_type == "service_unavailable"  # its engine died
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(unwrap(error), (RayActorError, ActorUnavailableError, ChannelLostError))


def as_api_error(error: BaseException | ReplicaError) -> APIError:
    if isinstance(error, APIError):  # already mapped (a continuation that could not start)
        return error
    return replica_error(error) if isinstance(error, ReplicaError) else routing_error(error)
