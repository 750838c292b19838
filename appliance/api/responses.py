"""Wire types onto the socket: JSON or msgpack, and one JSON shape for every error.

A response with many faces is encoded in the executor, so the event loop keeps serving while
512 floats per face become text.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from appliance.api import state
from appliance.api.wire import ErrorDetail, ErrorResponse, encode_json, encode_msgpack

# Above this many faces the encoding (about 10 us a face as JSON) leaves the event loop; below
# it the hop to a thread costs more than it saves.
OFFLOAD_FACES = 16


def wants_msgpack(request: web.Request, asked: bool) -> bool:
    return asked or "application/msgpack" in request.headers.get("Accept", "")


async def respond(
    request: web.Request,
    payload: Any,
    use_msgpack: bool,
    faces: int = 0,
    status: int = 200,
) -> web.Response:
    """Encode a wire type (or what a zero-argument builder returns) as JSON or msgpack.

    With more than OFFLOAD_FACES faces, building and encoding both run in the executor: the
    per-face work (numpy rounding, 512 floats to text) is what grows with the answer.
    """
    as_msgpack = wants_msgpack(request, use_msgpack)
    encode = encode_msgpack if as_msgpack else encode_json

    def work() -> bytes:
        return encode(payload() if callable(payload) else payload)

    if faces > OFFLOAD_FACES:
        body = await asyncio.get_running_loop().run_in_executor(request.app[state.EXECUTOR], work)
    else:
        body = work()
    return web.Response(
        body=body,
        status=status,
        content_type="application/msgpack" if as_msgpack else "application/json",
    )


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = ErrorResponse(ErrorDetail(code=code, message=message))
    return web.Response(
        body=encode_json(body), status=status, headers=headers, content_type="application/json"
    )
