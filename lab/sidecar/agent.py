"""A stub pilot-agent: the sidecar's other uid-1337 process and the traffic it makes.

  - a long-lived TCP stream to istiod, re-dialed with bounded backoff when it drops.  The lab
    has no kube-proxy, so it dials istiod's pod IP (10.244.0.30:15012), not the Service VIP;
    as uid 1337 its SYN leaves by ISTIO_OUTPUT rule 4 (owner 1337: RETURN), never through Envoy.
    Nothing is sent on it: no heartbeats, so pods stay quiet for TRACE.  In a dual-stack lab
    it holds a second stream, to istiod's IPv6 address, so each family's re-dial can be
    traced (the real agent holds one, over whichever family istiod's name resolves to).
  - at start-up, polls Envoy's admin http://127.0.0.1:15000/ready until LIVE, then opens
    15020; so once 15020 listens, start-up traffic is over.
  - on each GET /stats/prometheus on 15020, fetches Envoy's 127.0.0.1:15000/stats/prometheus
    and the app's 127.0.0.1:8080/metrics (localhost, like the real agent: the pod IP over lo
    would be redirected to 15006 for uid 1337) and serves them merged with its own counters.
  - with DNS capture on, the DNS proxy on 127.0.0.1:15053 (dnsproxy.py), started before its
    other listeners (the real agent starts it before Envoy; here Envoy is already up).
Nothing runs periodically once started.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .. import addr, plan
from . import dnsproxy, httpio


@dataclass(frozen=True)
class Config:
    istiods: tuple[tuple[str, int], ...] = ((plan.PODS["istiod"], plan.Port.ISTIOD),)  # one stream each
    envoy_admin: tuple[str, int] = ("127.0.0.1", plan.Port.ADMIN)
    app_metrics: tuple[str, int, str] = ("127.0.0.1", plan.Port.SIDECAR_APP, "/metrics")
    listen: tuple[str, int] = ("0.0.0.0", plan.Port.AGENT)
    backoff: tuple[float, float] = (0.002, 2.0)  # first re-dial delay, cap (short: a trace waits for it)
    ready_timeout: float = 10.0
    dns: dnsproxy.Config | None = None  # the DNS proxy, when the pod's rules capture DNS


def say(*words) -> None:
    print(*words, flush=True)  # stdout is the process log


class Agent:
    def __init__(self, config: Config):
        self.config = config
        self.xds_connects = 0
        self.xds_connected = 0
        self.scrape_failures = {"envoy": 0, "app": 0}

    async def hold_istiod(self, istiod: tuple[str, int]) -> None:
        """Keep one connection to istiod open; re-dial after base..cap backoff when it drops."""
        base, cap = self.config.backoff
        delay = base
        while True:
            try:
                reader, writer = await asyncio.open_connection(*istiod)
            except OSError as e:
                say(f"istiod {addr.text(istiod)}: {e}; re-dial in {delay:.2f}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, cap)
                continue
            self.xds_connects += 1
            self.xds_connected += 1
            delay = base
            say(f"istiod stream up {addr.text(writer.get_extra_info('sockname'))} -> "
                f"{addr.text(writer.get_extra_info('peername'))}")
            await httpio.until_closed(reader)
            writer.close()
            self.xds_connected -= 1
            say(f"istiod stream dropped; re-dial in {delay:.2f}s")
            await asyncio.sleep(delay)

    async def wait_envoy_ready(self) -> None:
        host, port = self.config.envoy_admin
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + self.config.ready_timeout, 0.002
        while True:
            try:
                if (await httpio.get(host, port, "/ready"))[0] == 200:
                    return
            except (OSError, ValueError, asyncio.TimeoutError):
                pass
            if loop.time() > deadline:
                raise RuntimeError(f"envoy admin {host}:{port}/ready not LIVE after {self.config.ready_timeout}s")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)

    async def fetch(self, source: str, host: str, port: int, path: str) -> str:
        try:
            status, body = await httpio.get(host, port, path)
            if status == 200:
                return body.rstrip("\n") + "\n" if body else ""
            why = f"HTTP {status}"
        except (OSError, ValueError, asyncio.TimeoutError) as e:
            why = repr(e)
        self.scrape_failures[source] += 1
        return f"# {source} {host}:{port}{path}: {why}\n"

    async def status(self, req: httpio.Request) -> tuple[int, str, str]:
        if req.path != "/stats/prometheus":
            return 404, "", httpio.TEXT
        envoy, app = await asyncio.gather(self.fetch("envoy", *self.config.envoy_admin, "/stats/prometheus"),
                                          self.fetch("app", *self.config.app_metrics))
        own = ["# TYPE istio_agent_xds_connects_total counter", f"istio_agent_xds_connects_total {self.xds_connects}",
               "# TYPE istio_agent_xds_connected gauge", f"istio_agent_xds_connected {self.xds_connected}",
               "# TYPE istio_agent_scrape_failures_total counter"]
        own += [f'istio_agent_scrape_failures_total{{source="{s}"}} {n}' for s, n in self.scrape_failures.items()]
        return 200, envoy + app + "\n".join(own) + "\n", httpio.PROMETHEUS

    async def main(self) -> None:
        dns = [asyncio.create_task(dnsproxy.DnsProxy(self.config.dns).serve())] if self.config.dns else []
        streams = [asyncio.create_task(self.hold_istiod(istiod)) for istiod in self.config.istiods]
        await self.wait_envoy_ready()
        server = await asyncio.start_server(httpio.server(self.status), *self.config.listen, backlog=128)
        say(f"envoy ready; serving {addr.text(self.config.listen)}")
        await asyncio.gather(*streams, server.serve_forever(), *dns)


def run(config: Config) -> None:
    """The child's entry point (uid/gid 1337 in the sidecar pod)."""
    asyncio.run(Agent(config).main())
