"""Just enough HTTP/1.0 for the lab's stub servers and clients.

Every exchange is one request per connection, closed by the server, so a
client reads to EOF and never needs chunked encoding or keep-alive.  The
byte-level helpers are shared by the asyncio servers and the blocking client.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

from ..addr import text as addr_text

JSON = "application/json"
TEXT = "text/plain"
PROMETHEUS = "text/plain; version=0.0.4"
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


_live: set[asyncio.Task] = set()


def hold(task: asyncio.Task) -> asyncio.Task:
    """Keep a task alive until it ends.  The event loop holds tasks only weakly, and a socket
    its peer half-closed is no longer watched by the loop: a task waiting on one can be
    collected mid-connection ("Task was destroyed but it is pending!")."""
    _live.add(task)
    task.add_done_callback(_live.discard)
    return task


def held(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]):
    """A connection handler for asyncio.start_server whose task is held (hold) while it runs."""

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hold(asyncio.current_task())
        await handler(reader, writer)

    return run


def request_bytes(host: str, port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: istio-lab\r\n\r\n".encode()


def response_bytes(status: int, body: str, content_type: str = TEXT) -> bytes:
    data = body.encode()
    head = (f"HTTP/1.0 {status} {REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    return head.encode() + data


def parse_response(data: bytes) -> tuple[int, str]:
    """(status, body) of a whole HTTP/1.x response."""
    head, sep, body = data.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {data[:60]!r}")
    return int(parts[1]), body.decode(errors="replace")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    peer: str  # "ip:port", from getpeername
    local: str  # "ip:port", from getsockname


Route = Callable[[Request], Awaitable[tuple[int, str, str]]]  # -> (status, body, content type)


def server(route: Route) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """An asyncio client_connected_cb: read one request, answer it through `route`, close."""

    @held
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode(errors="replace").split()
            if len(line) < 2:
                return
            request = Request(line[0], line[1], addr_text(writer.get_extra_info("peername")),
                              addr_text(writer.get_extra_info("sockname")))
            if request.method != "GET":
                status, body, ctype = 405, "only GET\n", TEXT
            else:
                status, body, ctype = await route(request)
            writer.write(response_bytes(status, body, ctype))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    return serve


async def until_closed(reader: asyncio.StreamReader) -> None:
    """Read and drop whatever the peer sends until it closes (an idle xDS stream)."""
    try:
        while await reader.read(65536):
            pass
    except OSError:
        pass


async def get(host: str, port: int, path: str, timeout: float = 1.0) -> tuple[int, str]:
    """GET http://host:port/path from this process (its uid, its namespace)."""

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request_bytes(host, port, path))
            writer.write_eof()
            return await reader.read()
        finally:
            writer.close()

    return parse_response(await asyncio.wait_for(exchange(), timeout))
