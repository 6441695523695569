"""Reading a JSON request body ourselves: the size cap while reading, then UTF-8, JSON, object.

FastAPI's own body parsing would buffer everything before any check and answer 422; reading the
stream here lets an oversized body be refused as it arrives and every failure be a precise 400.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from proxy.errors import InvalidRequest, PayloadTooLarge, from_pydantic

MAX_BODY_BYTES = 16 * 1024 * 1024
# After the cap is hit we keep reading (and dropping) this much more so a client that writes its
# whole body before reading the answer still sees the 413 instead of a reset connection.
_DISCARD_BYTES = 64 * 1024 * 1024

M = TypeVar("M", bound=BaseModel)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than {limit // (1024 * 1024)} MiB.")


async def read_json_object(request: Request, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + _DISCARD_BYTES:
        raise _too_large(limit)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            chunks.clear()  # never hold more than the cap
            if total > limit + _DISCARD_BYTES:
                break
            continue
        chunks.append(chunk)
    if total > limit:
        raise _too_large(limit)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid UTF-8.", code="invalid_encoding") from None
    if not text.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON (line {exc.lineno}, column {exc.colno}).",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return data


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """A dependency that reads, checks and validates the body as ``model``."""

    async def dependency(request: Request) -> M:
        data = await read_json_object(request)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise from_pydantic(exc) from None

    return dependency


def documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body ``json_body`` reads: FastAPI cannot see such a
    body, so the route names ``model`` as its request body here (see ``add_body_schemas``)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def add_body_schemas(openapi: dict[str, Any], models: Iterable[type[BaseModel]]) -> dict[str, Any]:
    """Put the JSON schemas of ``models`` (and the models they use) into the OpenAPI components,
    so the ``documented_body`` references resolve (``/docs``, client generators, fuzzers)."""
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    return openapi
