"""Reading a request body within the limits, for the ingress and the function host alike.

Every way a body can be unacceptable is a clear problem, never a 5xx: too large (by its
``Content-Length``, or by what a chunked or compressed body inflates to: 413), too slow
(408: a body trickled byte by byte must not hold a handler), or not decodable (a
``Content-Encoding`` that does not decode: 400).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from dispatcher.errors import EventError

__all__ = ["read_body"]


async def read_body(request: web.Request, *, limit: int, timeout: float) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise EventError(
            413, "Payload Too Large", f"body of {request.content_length} bytes exceeds {limit}"
        )
    content = request.content
    if content.is_eof() and content.exception() is None:
        # All there already (small bodies): what read() would gather, without its loop.
        body = content.read_nowait()
        if len(body) > limit:  # chunked or compressed: no length said so
            raise EventError(413, "Payload Too Large", f"body exceeds {limit} bytes")
        return body
    try:
        # Bounds a body trickled byte by byte (slowloris): headers alone start the handler.
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise EventError(
            408,
            "Request Timeout",
            f"the request body did not arrive within body_timeout ({timeout:g} s)",
            headers={"Connection": "close"},
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise EventError(413, "Payload Too Large", f"body exceeds {limit} bytes") from None
    except web.RequestPayloadError as exc:  # e.g. a Content-Encoding that does not decode
        raise EventError(
            400,
            "Malformed body",
            f"the request body cannot be read: {exc}",
            headers={"Connection": "close"},  # the rest of the body cannot be skipped
        ) from None
