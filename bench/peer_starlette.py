"""The benchmark's peer: a minimal broker on Starlette + uvicorn + sse-starlette.

Written the way such a service is usually written: one `asyncio.Queue` per subscriber, an
insert handler that puts the event into every queue, and an `EventSourceResponse` draining its
queue. Same `POST /insert` `{"event", "data"}` and `GET /sse` as broker, without auth and
without durability (events live in memory only). Library defaults are kept on purpose
(uvicorn's loop "auto" picks uvloop when installed; sse-starlette's 15 s ping, CRLF lines).

    python bench/peer_starlette.py --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator

import uvicorn
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

subscribers: set[asyncio.Queue] = set()
next_id = itertools.count(1)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def insert(request: Request) -> JSONResponse:
    try:
        body = await request.json()
    except ValueError:
        return error(400, "malformed JSON")
    if not isinstance(body, dict) or "data" not in body:
        return error(400, "data is required")
    event = body.get("event")
    if not isinstance(event, str) or not event or len(event) > 256:
        return error(400, "event must be a non-empty string")
    ident = next(next_id)
    message = {"id": str(ident), "event": event,
               "data": json.dumps(body["data"], separators=(",", ":"))}
    for queue in subscribers:
        queue.put_nowait(message)
    return JSONResponse({"id": ident, "event": event, "timestamp": int(time.time())})


async def sse(request: Request) -> EventSourceResponse:
    queue: asyncio.Queue = asyncio.Queue()
    subscribers.add(queue)

    async def stream() -> AsyncIterator[dict]:
        try:
            while True:
                yield await queue.get()
        finally:
            subscribers.discard(queue)

    return EventSourceResponse(stream())


async def health(request: Request) -> Response:
    return Response(status_code=200)


app = Starlette(routes=[Route("/", health, methods=["GET", "HEAD"]),
                        Route("/insert", insert, methods=["POST"]),
                        Route("/sse", sse, methods=["GET"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, loop=args.loop, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
