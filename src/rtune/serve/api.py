"""What every route shares: the API's error (OpenAI's error shape) and strict parsing of JSON bodies.

A separate module so that the routes beside the OpenAI ones (rtune.serve.page, .proxy, .rating)
raise the same errors without importing the app that mounts them.
"""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from rtune.serve.middleware import error_body


class StrictBody(BaseModel):
    # Strict types: a string is not a number, a number is not a boolean. Unknown fields are ignored
    # (clients send `user`, `metadata`, ...); the ones that would change the answer are refused by the routes.
    model_config = ConfigDict(strict=True, extra="ignore")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)


def _body_fields() -> set[str]:
    """Every field name of every request body: what in pydantic's error location is a field, not a
    union member's tag ('str', 'list[int]', ...)."""
    fields, todo = set(), [StrictBody]
    while todo:
        cls = todo.pop()
        fields.update(cls.model_fields)
        todo.extend(cls.__subclasses__())
    return fields


def _validation_error(e: ValidationError, union_hints: dict[str, str]) -> ApiError:
    err = e.errors()[0]
    known = _body_fields()
    path, field, in_union = "", None, False
    for part in err["loc"]:
        if in_union:
            break  # what follows a union member's tag belongs to that member
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in known:
            path += ("." if path else "") + part
            field = part
        else:
            in_union = True
    if err["type"] == "missing":
        return ApiError(400, f"'{path}' is required", path, "missing_field")
    if in_union and field in union_hints:
        return ApiError(400, f"'{path}' must be {union_hints[field]}", path, "invalid_type")
    given = err.get("input")
    shown = f" (got {given!r})" if isinstance(given, (str, int, float, bool)) and len(repr(given)) <= 40 else ""
    return ApiError(400, f"'{path}': {err['msg']}{shown}", path, "invalid_value")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json_body(model: type[StrictBody], body: bytes, union_hints: dict[str, str] | None = None):
    """`model` from a request body, or an ApiError (400) naming the field. `union_hints`: how to say
    what a field that takes several shapes accepts ({"stop": "a string or a list of strings"})."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e, union_hints or {}) from None
