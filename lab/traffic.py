"""The traffic the harness fires: client connections and queries made inside a pod as a
chosen user, and the triggers that make the lab's own processes send (pilot-agent's
re-dial to istiod, a Prometheus scrape).

A client is a socket made in the harness process itself, inside the pod's namespace with
the user's fs identity, which is all `-m owner` looks at.  Its source port is the lab's
choice, from a range the kernel never hands out on its own: a port from the ephemeral
range could also be given to a proxy's upstream socket for another destination (connect(2)
shares a local port between different 4-tuples), and then two legs of one flow would
share a client address.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from dataclasses import dataclass

from . import dns, netns, processes, proxylogs, workloads
from .addr import Address
from .errors import LabError
from .sidecar import httpio
from .world import Lab

# Below the kernel's ephemeral range (ip_local_port_range, 32768-60999 by default) and
# clear of every port the lab listens on.
CLIENT_PORTS = range(20000, 30000)
_next_port = [CLIENT_PORTS.start + int.from_bytes(os.urandom(2), "big") % len(CLIENT_PORTS)]
_PORT_TAKEN = (errno.EADDRINUSE, errno.EADDRNOTAVAIL)


class RequestError(LabError):
    """A flow that got no answer; names the destination and why.  When its first packet was
    sent, `local` is the client's address and `errno` what the client was told
    (ECONNREFUSED, say), so the flow can still be measured: it died somewhere."""

    def __init__(self, message: str, local: Address | None = None, peer: Address | None = None,
                 errno: int | None = None):
        super().__init__(message)
        self.local, self.peer, self.errno = local, peer, errno


@dataclass(frozen=True)
class Response:
    status: int  # HTTP status; a DNS answer's RCODE; 0 for a stream
    body: str
    local: Address  # the client socket's own address: the first leg's client
    peer: Address  # where it connected: the original destination, whatever NAT did

    def json(self):
        return json.loads(self.body)


def family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def client_port() -> int:
    """The next source port of the lab's clients, cycling through CLIENT_PORTS."""
    port = _next_port[0]
    _next_port[0] = CLIENT_PORTS.start + (port + 1 - CLIENT_PORTS.start) % len(CLIENT_PORTS)
    return port


def _bound_socket(ns: str, family: int, kind: int, uid: int, gid: int, port: int | None) -> socket.socket:
    """A socket of uid/gid in pod `ns`, bound to `port`, or to the next free client port."""
    with netns.entered(ns), netns.fs_identity(uid, gid):
        sock = socket.socket(family, kind)
    anywhere = "::" if family == socket.AF_INET6 else "0.0.0.0"
    try:
        if port is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((anywhere, port))
            return sock
        for _ in range(64):
            try:
                sock.bind((anywhere, client_port()))
                return sock
            except OSError as e:
                if e.errno not in _PORT_TAKEN:
                    raise
        raise OSError(errno.EADDRINUSE, "no free client port")
    except BaseException:
        sock.close()
        raise


def connect(ns: str, dst_ip: str, port: int, *, uid: int, gid: int, src_port: int | None = None,
            timeout: float = 2.0) -> socket.socket:
    """A TCP connection from pod namespace `ns`, owned (for xt_owner) by uid/gid, from a client
    port (or `src_port`)."""
    where = f"{Address(dst_ip, port)} from {ns} as {uid}:{gid}"
    try:
        sock = _bound_socket(ns, family_of(dst_ip), socket.SOCK_STREAM, uid, gid, src_port)
    except OSError as e:
        raise RequestError(f"connect to {where}: {e.strerror or e}") from None
    sock.settimeout(timeout)
    peer = Address(dst_ip, port)
    try:
        sock.connect((dst_ip, port))
    except socket.timeout:
        local = _local(sock)
        sock.close()
        raise RequestError(f"connect to {where}: timed out after {timeout}s", local, peer, errno.ETIMEDOUT) from None
    except OSError as e:
        local = _local(sock)
        sock.close()
        raise RequestError(f"connect to {where}: {e.strerror or e}", local, peer, e.errno) from None
    return sock


def _local(sock: socket.socket) -> Address | None:
    """The client's own address after a connect that failed (its port is ours; its address may
    be the wildcard it was bound to, which the measurement reads back from the SYN's events)."""
    try:
        return Address.of(sock.getsockname())
    except OSError:
        return None


def get(sock: socket.socket, path: str = "/") -> Response:
    """Send one HTTP/1.0 GET, half-close, read to EOF; the socket stays open for the caller."""
    local, peer = Address.of(sock.getsockname()), Address.of(sock.getpeername())
    where = f"GET http://{peer}{path}"
    try:
        sock.sendall(httpio.request_bytes(peer.ip, peer.port, path))
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        if not chunks:  # a proxy took the connection and closed it: its leg ended somewhere
            raise RequestError(f"{where}: the connection closed with no answer", local, peer, errno.ECONNRESET)
        status, body = httpio.parse_response(b"".join(chunks))
    except socket.timeout:
        raise RequestError(f"{where}: no answer within {sock.gettimeout()}s", local, peer, errno.ETIMEDOUT) from None
    except (OSError, ValueError) as e:
        raise RequestError(f"{where}: {e}", local, peer, getattr(e, "errno", None)) from None
    return Response(status, body, local, peer)


def request(ns: str, dst_ip: str, port: int, *, uid: int, gid: int, path: str = "/", src_port: int | None = None,
            timeout: float = 2.0) -> Response:
    """GET http://dst_ip:port/path from pod namespace `ns` as uid/gid; the socket is closed after."""
    with connect(ns, dst_ip, port, uid=uid, gid=gid, src_port=src_port, timeout=timeout) as sock:
        return get(sock, path)


def stream(ns: str, dst_ip: str, port: int, *, uid: int, gid: int, timeout: float = 2.0) -> Response:
    """Open a TCP stream (as pilot-agent opens its xDS stream), half-close, wait for the peer's close.

    For servers that speak no HTTP, such as istiod's 15012; status is 0 and body
    whatever the peer sent before closing.
    """
    with connect(ns, dst_ip, port, uid=uid, gid=gid, timeout=timeout) as sock:
        local, peer = Address.of(sock.getsockname()), Address.of(sock.getpeername())
        try:
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except socket.timeout:
            raise RequestError(f"stream to {peer}: no answer within {timeout}s", local, peer, errno.ETIMEDOUT) from None
        except OSError as e:
            raise RequestError(f"stream to {peer}: {e.strerror or e}", local, peer, e.errno) from None
        return Response(0, b"".join(chunks).decode(errors="replace"), local, peer)


def dns_query(ns: str, dst_ip: str, port: int, name: str, *, transport: str, uid: int, gid: int,
              src_port: int | None = None, timeout: float = 2.0) -> Response:
    """Ask `name`'s A record of dst_ip:port over UDP (one datagram) or TCP (length-prefixed), as
    a resolver library does, from pod namespace `ns` as uid/gid.

    The UDP socket is connected, as glibc's is: the kernel then takes only an answer from
    dst_ip:port, so an answer reaches the app only if conntrack gave it back the address it
    asked.  status is the answer's RCODE; body {"name", "rcode", "answers"} as JSON.
    """
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    where = f"DNS {name} over {transport} to {dst_ip}:{port} from {ns} as {uid}:{gid}"
    query = dns.query(name, id=int.from_bytes(os.urandom(2), "big"))
    try:
        sock = _bound_socket(ns, socket.AF_INET, kind, uid, gid, src_port)
    except OSError as e:
        raise RequestError(f"{where}: {e.strerror or e}") from None
    with sock:
        sock.settimeout(timeout)
        local, peer = None, Address(dst_ip, port)
        try:
            sock.connect((dst_ip, port))
            local, peer = Address.of(sock.getsockname()), Address.of(sock.getpeername())
            if transport == "udp":
                sock.send(query)
                reply = sock.recv(65535)
            else:
                sock.sendall(dns.frame(query))
                sock.shutdown(socket.SHUT_WR)
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
                reply = dns.unframe(b"".join(chunks))
            answer = dns.parse(reply)
        except socket.timeout:
            local = local or _local(sock)
            raise RequestError(f"{where}: no answer within {timeout}s", local, peer, errno.ETIMEDOUT) from None
        except (OSError, dns.DnsFormatError) as e:
            local = local or _local(sock)
            raise RequestError(f"{where}: {getattr(e, 'strerror', None) or e}", local, peer,
                               getattr(e, "errno", None)) from None
    if not answer.response or answer.id != dns.parse(query).id:
        raise RequestError(f"{where}: the answer is not a response to the query")
    return Response(answer.rcode, json.dumps(dns.describe(reply)), local, peer)


def datagram(ns: str, dst_ip: str, port: int, *, uid: int, gid: int, timeout: float = 2.0) -> Response:
    """One UDP datagram from pod namespace `ns` as uid/gid, and its echo (an app with udp_echo).

    The socket is connected, so only an answer from dst_ip:port is taken: a datagram that
    reached a Service's endpoint comes back only if conntrack gave the answer the VIP back.
    status is 0, body the echo ({"pod", "peer", "local", "echo"} as JSON)."""
    where = f"UDP to {Address(dst_ip, port)} from {ns} as {uid}:{gid}"
    try:
        sock = _bound_socket(ns, family_of(dst_ip), socket.SOCK_DGRAM, uid, gid, None)
    except OSError as e:
        raise RequestError(f"{where}: {e.strerror or e}") from None
    with sock:
        sock.settimeout(timeout)
        local, peer = Address.of(sock.getsockname()), Address(dst_ip, port)
        try:
            sock.connect((dst_ip, port))
            local = Address.of(sock.getsockname())
            sock.send(b"ping")
            reply = sock.recv(65535)
        except socket.timeout:
            raise RequestError(f"{where}: no answer within {timeout}s", local, peer, errno.ETIMEDOUT) from None
        except OSError as e:
            raise RequestError(f"{where}: {e.strerror or e}", local, peer, e.errno) from None
    return Response(0, reply.decode(errors="replace"), local, peer)


# -- triggers: the lab's own processes send -------------------------------------------------

def redial_istiod(lab: Lab, family: int = 4, timeout: float = 2.0) -> Address:
    """Make istiod drop the family's xDS stream and return the address pilot-agent's re-dial
    comes from: the agent's own traffic, not a stand-in for it."""
    seen = len(proxylogs.read(lab.run_dir, proxylogs.ISTIOD_LOG))
    os.kill(lab.record.pids["istiod"], workloads.DROP_SIGNALS[family])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes.check(lab, "pilot-agent")
        connects = [e for e in proxylogs.read(lab.run_dir, proxylogs.ISTIOD_LOG)[seen:] if e["event"] == "connect"]
        if connects:
            return Address.parse(connects[0]["peer"])
        time.sleep(0.0005)  # the agent re-dials 2 ms after the drop: a coarse poll would double the wait
    raise LabError(f"pilot-agent did not re-dial istiod within {timeout}s "
                   f"(log: {processes.log_path(lab, 'pilot-agent')})")


def scrape(lab: Lab, timeout: float = 2.0) -> list[dict]:
    """Make Prometheus scrape every target once now (SIGUSR1); its new log lines."""
    before = len(proxylogs.read(lab.run_dir, proxylogs.SCRAPE_LOG))
    os.kill(lab.record.pids["prometheus"], signal.SIGUSR1)
    processes.wait_for_scrapes(lab, before + len(processes.scrape_targets(lab)), timeout)
    return proxylogs.read(lab.run_dir, proxylogs.SCRAPE_LOG)[before:]
