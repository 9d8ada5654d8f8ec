"""HTTP errors in the OpenAI / vLLM shape.

Every error the front-end answers has the body
``{"error": {"message": str, "type": str, "param": str | None, "code": int}}``
so that the official ``openai`` client turns it into the matching exception
class (BadRequestError, AuthenticationError, NotFoundError, ...).
"""

from __future__ import annotations

import msgspec
from aiohttp import web

# status -> error type, as vLLM names them (the type string is what clients log).
ERROR_TYPES: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: int


class ErrorBody(msgspec.Struct):
    error: ErrorInfo


class APIError(Exception):
    """An error with an HTTP status, raised anywhere in request handling.

    Raised before a stream starts it becomes a plain HTTP error; raised after,
    the streaming code sends it as a final SSE event instead.
    """

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.retry_after = retry_after  # seconds, sent as Retry-After (503: come back later)

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "Error")

    def body(self) -> ErrorBody:
        return ErrorBody(ErrorInfo(self.message, self.type, self.param, self.status))

    def response(self) -> web.Response:
        resp = json_error(self.status, self.message, self.param)
        if self.retry_after is not None:
            resp.headers["Retry-After"] = str(self.retry_after)
        return resp


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    info = ErrorInfo(message, ERROR_TYPES.get(status, "Error"), param, status)
    return msgspec.json.encode(ErrorBody(info))


def json_error(status: int, message: str, param: str | None = None) -> web.Response:
    return web.Response(
        status=status, body=error_body(status, message, param), content_type="application/json"
    )


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, status=400, param=param)
