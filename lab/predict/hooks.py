"""What one namespace's packets of one IP family meet at each hook, in the order the kernel runs it.

Every table registers its base chains with the kernel (an xtables table its built-in
chains, at the xtables priorities; an nf_tables table its base chains, at their own), and
a hook runs what is registered there by priority.  Between them:

  - conntrack at -200 (PREROUTING, OUTPUT): a packet is filed under its connection there;
  - the nat core at -100 (PREROUTING, OUTPUT) and 100 (INPUT, POSTROUTING): nat chains are not
    hooks of their own but run by it, in their own priority order, for a connection's first
    packet only, and only until one of them sets up a translation: the others never judge
    that connection (nf_nat_inet_fn).  Once any nat chain of the family exists, the nat core
    runs at all four hooks, and a connection nothing translated gets a null binding there.

Two registered at one priority run last-registered first (nf_hook_entries_grow inserts a
new one before the first of equal or higher priority): so in a pod whose rules two
backends wrote, the backend that wrote last runs first.  A rule set's tables are
registered in the order they were written (`groups`, in write order); within one nft rule
set the order of two base chains of different tables is not something a listing says, so
two such chains at one hook and priority, both with something to do, are not predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..netfilter import HOOKS
from .chains import Base, Table
from .errors import CannotPredict

CONNTRACK = -200  # NF_IP_PRI_CONNTRACK: PREROUTING and OUTPUT
NAT = {"PREROUTING": -100, "OUTPUT": -100, "INPUT": 100, "POSTROUTING": 100}  # the nat core
DESTINATION_HOOKS = ("PREROUTING", "OUTPUT")  # where nat rewrites destinations; INPUT, POSTROUTING: sources


@dataclass(frozen=True)
class Entry:
    """One base chain registered at a hook."""

    table: Table
    base: Base

    @property
    def acts(self) -> bool:
        """Could it change anything: a rule, or a policy that drops?"""
        return bool(self.table.chains[self.base.chain].rules) or self.base.acts


@dataclass(frozen=True)
class NatCore:
    """The nat chains of one hook, in the order the nat core runs them."""

    entries: tuple[Entry, ...]


class Conntrack:
    """Where conntrack files the packet (a marker in a hook's order)."""


TRACK = Conntrack()
Step = Entry | NatCore | Conntrack


class Hooks:
    """One family's registrations in a namespace, from its rule sets' tables in write order
    (`groups`: each a rule set written at once, its tables in the order made)."""

    def __init__(self, family: int, groups: list[list[Table]]):
        self.family = family
        self.tracks_connections = any(t.tracks for group in groups for t in group if t.family in (None, family))
        regular: dict[str, list[tuple[int, int, Step]]] = {hook: [] for hook in HOOKS}
        nat: dict[str, list[tuple[int, int, Entry]]] = {hook: [] for hook in HOOKS}
        for rank, group in enumerate(groups):
            for table in group:
                if table.family not in (None, family):
                    continue
                for base in table.bases:
                    where = nat if base.kind == "nat" else regular
                    _register(where[base.hook], rank, Entry(table, base))
        self.steps: dict[str, tuple[Step, ...]] = {}
        for hook in HOOKS:
            order = list(regular[hook])
            if hook in DESTINATION_HOOKS:
                _clash(order, CONNTRACK, "conntrack")
                _register(order, -1, TRACK, CONNTRACK)
            if hook in NAT and any(nat.values()):  # the nat core is registered at its hooks once any nat chain is
                _clash(order, NAT[hook], "the nat core")
                _register(order, -1, NatCore(tuple(e for _, _, e in nat[hook])), NAT[hook])
            self.steps[hook] = tuple(step for _, _, step in order)

    def at(self, hook: str) -> tuple[Step, ...]:
        return self.steps[hook]


def _register(order: list, rank: int, step: Step, priority: int | None = None) -> None:
    """Insert as nf_hook_entries_grow does: before the first of equal or higher priority.  Two
    entries of one rule set (`rank`) at one priority come from different tables, whose order of
    registration the rule set does not say: refused where both have something to do."""
    priority = step.base.priority if priority is None else priority
    for p, other_rank, other in order if isinstance(step, Entry) else ():
        if (p, other_rank) == (priority, rank) and other.table is not step.table and step.acts and other.acts:
            raise CannotPredict(f"base chains {other.base.chain} (table {other.table.name}) and {step.base.chain} "
                                f"(table {step.table.name}) both hook {step.base.hook} at priority {priority}: which "
                                f"runs first depends on the order the kernel registered them, which the rule set "
                                f"does not say")
    at = next((i for i, (p, _, _) in enumerate(order) if p >= priority), len(order))
    order.insert(at, (priority, rank, step))


def _clash(order: list, priority: int, what: str) -> None:
    """A base chain at the very priority of conntrack or the nat core runs before or after it as
    they happened to register: not predicted where it has something to do."""
    for p, _, step in order:
        if p == priority and isinstance(step, Entry) and step.acts:
            raise CannotPredict(f"base chain {step.base.chain} (table {step.table.name}) hooks {step.base.hook} at "
                                f"priority {priority}, {what}'s own: which runs first depends on the order they "
                                f"registered")
