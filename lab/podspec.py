"""How the sidecar pod runs, where a scenario needs other than a running default pod.

Every lab's sidecar pod runs its app, Envoy and pilot-agent as Istio's injection sets them
up.  The problems people hit often come from a pod that differs: an init container that
runs before Envoy listens, an app bound to 127.0.0.1 under an Envoy of one era or another,
a sidecar run as another user than injection picks, a KubeVirt VM behind the pod.  A
PodSpec says which; a lab is built for one (api.bring_up), and `run` builds one lab per
distinct rule set and PodSpec.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import plan

RUNNING, INIT = "running", "init"
STAGES = (RUNNING, INIT)
ORIGINAL_DST, LOCALHOST, AS_RELEASED = "original-dst", "localhost", "as-released"
ENVOY_INBOUND = (ORIGINAL_DST, LOCALHOST, AS_RELEASED)
INBOUND_CHANGE = (1, 10)  # Istio 1.10: inbound clusters dial the pod IP from 127.0.0.6, not 127.0.0.1


@dataclass(frozen=True)
class PodSpec:
    # "running": app, Envoy and pilot-agent up.  "init": istio-init's rules are in and the
    # pod's init containers run: Envoy, pilot-agent and the app are not started yet.
    stage: str = RUNNING
    # How Envoy's inbound side reaches the app: "original-dst" (Istio 1.10 on: the pod IP,
    # from 127.0.0.6), "localhost" (1.9 and older: 127.0.0.1:port for the pod's Service
    # ports), or "as-released": as the rules' Istio version did.
    envoy_inbound: str = ORIGINAL_DST
    app_localhost: bool = False  # the sidecar pod's app listens on 127.0.0.1 (and ::1) only
    proxy: plan.Identity | None = None  # the istio-proxy container's user, where not injection's
    vm: bool = False  # a KubeVirt VM behind the sidecar pod's k6t-eth0 (kubevirtInterfaces)

    def resolved(self, istio: tuple[int, int] | None) -> "PodSpec":
        """With "as-released" made the Envoy of the rules' Istio version (today's for a dump)."""
        if self.envoy_inbound != AS_RELEASED:
            return self
        old = istio is not None and istio < INBOUND_CHANGE
        return replace(self, envoy_inbound=LOCALHOST if old else ORIGINAL_DST)

    def sidecar_identity(self, inbound_mode: str) -> plan.Identity:
        """Who Envoy and pilot-agent run as: injection's choice for the mode, unless overridden."""
        return self.proxy or plan.SIDECAR_IDENTITY[inbound_mode]

    @property
    def default(self) -> bool:
        return self == PodSpec()

    def describe(self) -> str:
        """One line for reports: what differs from a running default pod."""
        out = []
        if self.stage == INIT:
            out.append("init containers running: Envoy, pilot-agent and the app not started yet")
        if self.envoy_inbound == LOCALHOST:
            out.append("Envoy as Istio 1.9 and older: inbound to 127.0.0.1:port")
        elif self.envoy_inbound == AS_RELEASED:
            out.append("Envoy as the rules' Istio release ran it (inbound to 127.0.0.1:port up to 1.9)")
        if self.app_localhost:
            out.append("the app listens on 127.0.0.1 only")
        if self.proxy is not None:
            caps = f" with {', '.join(self.proxy.capabilities)}" if self.proxy.capabilities else ""
            out.append(f"istio-proxy runs as uid {self.proxy.uid} gid {self.proxy.gid}{caps}")
        if self.vm:
            out.append(f"a KubeVirt VM behind {plan.VM_INTERFACE}")
        return "; ".join(out)
