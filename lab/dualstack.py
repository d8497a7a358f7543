"""Scenarios over IPv6: each scenario run again with its addresses' IPv6 twins.

A scenario file names pods, Services and 127.0.0.1; the address plan gives each its IPv6
twin (10.244.0.10 -> fd00:10:244::10, 10.96.0.80 -> fd00:10:96::80, 127.0.0.1 -> ::1), so
one file describes the traffic for both families.  The twin's id is the scenario's with
"@ipv6"; its expected path is the scenario's under the same profile: over IPv6 the kernel
was measured to take the IPv4 path rule for rule under ip6tables (only the rules' addresses
differ), and a run where it does not fails.  Istio's native nftables rules keep both
families in one inet chain, each IPv4 address rule followed by its IPv6 twin, so there the
numbers differ: the file's `expected.ipv6` holds the twin's own measured path.
"""

from __future__ import annotations

import dataclasses

from . import plan
from .addr import Address
from .scenario import Scenario, ScenarioError

SUFFIX = "@ipv6"


def over_ipv6(scenario: Scenario) -> Scenario:
    try:
        twin = plan.ipv6_twin(scenario.traffic.to.ip)
    except ValueError as e:  # 127.0.0.2, say: IPv6 has one loopback address
        raise ScenarioError(f"{scenario.file}: traffic.to: {e}, so it cannot run over IPv6") from None
    traffic = dataclasses.replace(scenario.traffic, to=Address(twin, scenario.traffic.to.port))
    expected = scenario.expected.over_ipv6() if scenario.expected else None
    return dataclasses.replace(scenario, id=scenario.id + SUFFIX, traffic=traffic, expected=expected)


def both_families(scenarios: list[Scenario]) -> list[Scenario]:
    """Each scenario, then its IPv6 twin: the order a dual-stack run reports them in.  A DNS
    query has none: the lab's resolver, like the DNS capture rules, is IPv4 only (10.96.0.10)."""
    return [twin for s in scenarios for twin in ((s,) if s.traffic.protocol == "dns" else (s, over_ipv6(s)))]
