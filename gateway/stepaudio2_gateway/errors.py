"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the matching HTTP status."""

from __future__ import annotations

_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
    413: "invalid_request_error", 429: "rate_limit_error", 499: "invalid_request_error",
    503: "server_error", 504: "timeout_error",
}


class APIError(Exception):
    """An error the client sees; `param` names the offending request field (OpenAI's convention)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """400 naming the field."""
    return APIError(400, message, param=param, code=code)


# gRPC status (as the client library reports it) -> HTTP status for errors coming back from Triton.
GRPC_TO_HTTP = {
    "INVALID_ARGUMENT": 400, "NOT_FOUND": 400, "UNAVAILABLE": 429, "RESOURCE_EXHAUSTED": 429,
    "DEADLINE_EXCEEDED": 504, "CANCELLED": 499,
}
