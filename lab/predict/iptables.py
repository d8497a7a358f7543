"""Reading an iptables-save dump as iptables reads it: its tables, their chains and rules, each
rule line into conditions and a target (lab.predict.matches, lab.predict.targets).

`-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN` and the hand-written
`-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN` are the same rule: an option no
loaded module knows is offered to the protocol's own match, which iptables loads
implicitly after `-p tcp` or `-p udp`.  `!` negates the option after it (and, in the old
syntax iptables still reads, the value after it: `--dport ! 80`).

A match or target predict does not model does not stop the reading: it becomes a
condition (or target) that says "cannot predict" when a packet gets that far, which is
when the kernel would evaluate it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from ..netfilter import BUILTIN_CHAINS, LEGACY_PREFIX, RuleRef, xt_priority
from ..rules.save import Dump, RuleLine
from . import inet, matches as m, targets
from .chains import Base, Chain, Placement, Rule, Table, check
from .errors import CannotPredict

IP_OPTIONS = {"-s": "-s", "--source": "-s", "-d": "-d", "--destination": "-d", "-i": "-i",
              "--in-interface": "-i", "-o": "-o", "--out-interface": "-o", "-p": "-p", "--protocol": "-p"}
ALIASES = {"--source-port": "--sport", "--destination-port": "--dport", "--source-ports": "--sports",
           "--destination-ports": "--dports", "--to-port": "--to-ports"}
# The options of each modelled match, with how many values each takes.
MODULES: dict[str, dict[str, int]] = {
    "tcp": {"--sport": 1, "--dport": 1, "--tcp-flags": 2, "--syn": 0, "--tcp-option": 1},
    "udp": {"--sport": 1, "--dport": 1},
    "multiport": {"--sports": 1, "--dports": 1, "--ports": 1},
    "owner": {"--uid-owner": 1, "--gid-owner": 1, "--socket-exists": 0, "--suppl-groups": 0},
    "mark": {"--mark": 1},
    "connmark": {"--mark": 1},
    "conntrack": {"--ctstate": 1},
    "state": {"--state": 1},
    "addrtype": {"--src-type": 1, "--dst-type": 1, "--limit-iface-in": 0, "--limit-iface-out": 0},
    "socket": {"--transparent": 0, "--nowildcard": 0},
    "comment": {"--comment": 1},
}
# Matches the kernel accepts only at some hooks (xt_check_match): a rule set that reaches them
# from elsewhere is refused when loaded.
MATCH_HOOKS = {"owner": frozenset({"OUTPUT", "POSTROUTING"}), "socket": frozenset({"PREROUTING", "INPUT"})}
# What makes the kernel track connections in a namespace (nf_ct_netns_get in a checkentry):
# conntrack is per namespace and family, and only on while some rule needs it.  Without it
# there is no connection, so no nat (an empty nat table is walked by nothing) and no
# SO_ORIGINAL_DST.
CONNTRACK_TARGETS = frozenset({"REDIRECT", "DNAT", "SNAT", "MASQUERADE", "NETMAP", "CT", "NOTRACK", "CONNMARK",
                               "CONNSECMARK"})
CONNTRACK_MATCHES = frozenset({"conntrack", "state", "connmark", "helper", "connbytes", "connlimit"})


@dataclass(frozen=True)
class Option:
    flag: str
    values: tuple[str, ...]
    negated: bool


@dataclass(frozen=True)
class Module:
    name: str
    options: list[Option]


def tables(dump: Dump, backend: str = "") -> list[Table]:
    """The dump's tables, each with its built-in chains as the kernel registers them (at the
    xtables priorities), checked as the kernel checks a table it loads.  `backend`: who wrote
    it, in a pod whose rules both backends wrote (legacy's tables are then `legacy-nat`, ...)."""
    out = []
    for name, saved in dump.tables.items():
        table = Table(LEGACY_PREFIX + name if backend == "legacy" else name, name, dump.family, backend)
        table.bases = tuple(Base(hook, hook, xt_priority(name, hook), _kind(name, hook),
                                 saved.policies.get(hook, "ACCEPT")) for hook in BUILTIN_CHAINS[name])
        # the built-in chains, then the dump's in its order: the chains' order (and which
        # problem check() meets first) is the dump's, not a set's
        declared = dict.fromkeys([*BUILTIN_CHAINS[name], *saved.chains])
        numbered: dict[str, list[Rule]] = {chain: [] for chain in declared}
        for line in saved.rules:
            rules = numbered[line.chain]
            rules.append(read(table, len(rules) + 1, line, declared))
        table.chains = {chain: Chain(chain, table, rules, chain if chain in BUILTIN_CHAINS[name] else None)
                        for chain, rules in numbered.items()}
        check(table)
        out.append(table)
    return out


def _kind(table: str, hook: str) -> str:
    """How the kernel runs a built-in chain: nat's by the nat core, mangle OUTPUT routed again."""
    if table == "nat":
        return "nat"
    return "route" if (table, hook) == ("mangle", "OUTPUT") else "filter"


def read(table: Table, number: int, rule: RuleLine, chains: Collection[str]) -> Rule:
    """The rule `rule` (number `number` of its chain) of `table`."""
    where, family = table.where(rule.chain, number), table.family
    ip_part, modules, target = _tokens(rule.args, where)
    conditions = _ip_conditions(ip_part, family, where)
    for module in modules:
        conditions += _module_conditions(module, where)
    chosen = None
    if target is not None:
        name, goto, options = target
        if goto:
            chosen = targets.Jump(name, goto=True)
        else:
            chosen = targets.build(name, [(o.flag, list(o.values)) for o in options], family, chains, where)
    loaded = {mod.name for mod in modules}
    tracks = bool(loaded & CONNTRACK_MATCHES) or (chosen is not None and chosen.name in CONNTRACK_TARGETS)
    placements = tuple(Placement(f"-m {mod}", MATCH_HOOKS[mod]) for mod in sorted(loaded & set(MATCH_HOOKS)))
    if chosen is not None and (chosen.TABLE or chosen.HOOKS):
        placements += (Placement(f"-j {chosen.name}", chosen.HOOKS, chosen.TABLE),)
    return Rule(RuleRef(table.name, rule.chain, number), str(rule), tuple(conditions), chosen, tracks, placements)


def _tokens(args: tuple[str, ...], where: str):
    """Split a rule's words into its IP header options, its modules and its target."""
    ip_part: list[Option] = []
    modules: list[Module] = []
    target = None  # (name, goto, options)
    negate = False
    i = 0
    while i < len(args):
        word = args[i]
        if word == "!":
            negate, i = True, i + 1
            continue
        if (word in IP_OPTIONS or word in ("-m", "--match", "-j", "--jump", "-g", "--goto")) and i + 1 == len(args):
            raise CannotPredict(f"{where}: {word} needs a value")
        if word in ("-m", "--match"):
            modules.append(Module(args[i + 1], []))
            i += 2
        elif word in ("-j", "--jump", "-g", "--goto"):
            target = (args[i + 1], word in ("-g", "--goto"), [])
            i += 2
        elif word in ("-f", "--fragment"):
            ip_part.append(Option("-f", (), negate))
            i += 1
        elif word in IP_OPTIONS:
            value, i, old_negate = _value(args, i + 1)
            ip_part.append(Option(IP_OPTIONS[word], (value,), negate or old_negate))
        elif word in ("-c", "--set-counters"):
            i += 3
        elif word.startswith("-"):
            flag = ALIASES.get(word, word)
            if target is not None:
                count = targets.ARITY.get(flag, 1)
                target[2].append(Option(flag, tuple(args[i + 1:i + 1 + count]), negate))
                i += 1 + count
            else:
                module = _module_for(flag, modules, ip_part, where)
                count = MODULES.get(module.name, {}).get(flag)
                if count is None:  # an option predict does not model: take what follows as its values
                    count = next((k for k, w in enumerate(args[i + 1:]) if w.startswith("-") or w == "!"),
                                 len(args) - i - 1)
                values, old_negate = [], False
                j = i + 1
                while len(values) < count and j < len(args):
                    if args[j] == "!" and not values:
                        old_negate = True
                    else:
                        values.append(args[j])
                    j += 1
                module.options.append(Option(flag, tuple(values), negate or old_negate))
                i = j
        else:
            raise CannotPredict(f"{where}: cannot read {word!r}")
        negate = False
    return ip_part, modules, target


def _value(args: tuple[str, ...], i: int) -> tuple[str, int, bool]:
    """An option's value, reading the old `-s ! 10.0.0.1` negation too."""
    if args[i] == "!" and i + 1 < len(args):
        return args[i + 1], i + 2, True
    return args[i], i + 1, False


def _module_for(flag: str, modules: list[Module], ip_part: list[Option], where: str) -> Module:
    """The loaded module that takes `flag`, newest first; else the protocol's own match, loaded
    implicitly as iptables does after -p tcp/-p udp; else the newest module (which predict
    does not model: the option becomes part of what it cannot predict)."""
    for module in reversed(modules):
        if flag in MODULES.get(module.name, {}):
            return module
    proto = next((o.values[0].lower() for o in ip_part if o.flag == "-p" and not o.negated), None)
    if proto in ("tcp", "udp") and flag in MODULES[proto]:
        modules.append(Module(proto, []))
        return modules[-1]
    if modules:
        return modules[-1]
    raise CannotPredict(f"{where}: no match takes {flag} (iptables would refuse the rule)")


def _ip_conditions(options: list[Option], family: int, where: str) -> list[m.Match]:
    """-s, -d, -i, -o, -p, -f in the order ip_packet_match tests them."""
    order = {"-s": 0, "-d": 1, "-i": 2, "-o": 3, "-p": 4, "-f": 5}
    out: list[m.Match] = []
    for o in sorted(options, key=lambda o: order[o.flag]):
        try:
            if o.flag in ("-s", "-d"):
                if "," in o.values[0]:
                    raise CannotPredict(f"{where}: {o.flag} {o.values[0]}: iptables splits an address list into rules")
                net = inet.network(o.values[0], family)
                out.append(m.Address(o.flag, net, o.negated))
            elif o.flag in ("-i", "-o"):
                out.append(m.Interface(o.flag, o.values[0], o.negated))
            elif o.flag == "-p":
                if o.values[0].lower() not in ("all", "0"):
                    out.append(m.Protocol(o.values[0], o.negated))
            else:
                out.append(m.Fragment(o.negated))
        except ValueError as e:
            raise CannotPredict(f"{where}: {o.flag} {o.values[0]}: {e}") from None
    return out


def _module_conditions(module: Module, where: str) -> list[m.Match]:
    """The conditions of one -m module; one the kernel would run but predict does not model
    becomes an Unknown condition at the same place."""
    known = MODULES.get(module.name)
    if known is None:
        return [m.Unknown(f"-m {module.name}", where)]
    other = next((o.flag for o in module.options if o.flag not in known), None)
    if other is not None:
        return [m.Unknown(f"-m {module.name} {other}", where)]
    try:
        return _build_module(module, where)
    except CannotPredict as e:
        return [m.Unknown(f"-m {module.name} ({e.problem})", where)]


def _build_module(module: Module, where: str) -> list[m.Match]:
    name, opts = module.name, module.options
    flags = {o.flag for o in opts}
    out: list[m.Match] = []
    if name in ("tcp", "udp"):
        for o in opts:
            if o.flag in ("--sport", "--dport"):
                out.append(m.Port(o.flag, o.flag[2:], m.port_ranges(o.values[0]), o.negated))
            elif o.flag == "--syn":
                out.append(m.TcpFlags("--syn", m.tcp_flags("SYN,RST,ACK,FIN"), m.SYN_ONLY, o.negated))
            elif o.flag == "--tcp-flags":
                out.append(m.TcpFlags(f"--tcp-flags {' '.join(o.values)}", m.tcp_flags(o.values[0]),
                                      m.tcp_flags(o.values[1]), o.negated))
            else:
                out.append(m.Unknown(f"-m {name} {o.flag}", where))
        return out or [m.Always(f"-m {name}")]
    if name == "multiport":
        which = {"--sports": "sport", "--dports": "dport", "--ports": "either"}
        return [m.Port(o.flag, which[o.flag], m.port_ranges(o.values[0]), o.negated) for o in opts]
    if name == "owner":
        groups = "--suppl-groups" in flags
        for o in opts:
            if o.flag in ("--uid-owner", "--gid-owner"):
                out.append(m.OwnerId(o.flag[2:5], o.values[0], o.negated, groups and o.flag == "--gid-owner"))
            elif o.flag == "--socket-exists":
                out.append(m.SocketExists(o.negated))
        return out
    if name in ("mark", "connmark"):
        return [m.Mark(o.values[0], name == "connmark", o.negated) for o in opts]
    if name in ("conntrack", "state"):
        return [m.ConnState(o.flag, o.values[0], o.negated) for o in opts]
    if name == "addrtype":
        device = "in" if "--limit-iface-in" in flags else "out" if "--limit-iface-out" in flags else None
        return [m.AddressType(o.flag[2:5], o.values[0], device, o.negated)
                for o in opts if o.flag in ("--src-type", "--dst-type")]
    if name == "socket":
        return [m.SocketMatch("--transparent" in flags, "--nowildcard" in flags)]
    return [m.Always("-m comment")]
