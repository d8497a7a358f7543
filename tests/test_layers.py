"""The modules' layers, bottom up, as README's "How it works" draws them: a module imports
only from its own layer or below, and imports the lab's modules at its top (a hidden
import inside a function hides a dependency).  Every module of lab/ has a layer here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[1] / "lab"
LAYERS = [
    ("values", {"errors", "addr", "netfilter", "plan", "interrupts", "podspec"}),
    ("text formats", {"rules.save", "rules.builder", "rules.profiles", "rules.features", "rules.foreign",
                      "rules.ruleset", "rules.nftset", "rules.nftbuilder", "rules.nftlisting", "rules.nftcompare", "rules.nftforeign", "rules.annotations", "rules.kubeproxy", "path", "dns",
                      "sidecar.httpio"}),
    ("kernel", {"netns", "procfs", "record", "world", "rules.xtables", "rules.routing", "trace", "preflight",
                "nftrace", "sockdiag", "rules.nft.libnft", "rules.nft.iptables_nft", "rules.nft.native",
                "rules.nft.tracing", "rules.nft.naming", "rules.nft.probes", "backend", "attached"}),
    ("processes", {"sidecar.envoy", "sidecar.agent", "sidecar.dnsproxy", "workloads", "proxylogs", "processes",
                   "traffic"}),
    ("input", {"scenario", "dualstack"}),
    ("predict", {"predict", "predict.inet", "predict.packet", "predict.errors", "predict.matches", "predict.targets",
                 "predict.iptables", "predict.nftexpr", "predict.nft", "predict.chains", "predict.hooks",
                 "predict.topology", "predict.stack", "predict.proxies", "predict.flow", "predict.notation"}),
    ("observe", {"observe", "join", "watch"}),
    ("judge", {"measure", "verdict", "compare"}),
    ("view", {"view"}),
    ("render", {"report", "markdown_report", "html_report"}),
    ("result", {"result"}),
    ("library", {"api", "runner", "attach", "matrix"}),
    ("edges", {"commands", "cli", "pytest_plugin"}),
]
LAYER = {module: n for n, (_, modules) in enumerate(LAYERS) for module in modules}
# Loaded by every pytest run in the environment, so it imports the lab inside its fixtures.
LAZY = {"pytest_plugin"}


def _modules() -> dict[str, Path]:
    out = {}
    for file in LAB.rglob("*.py"):
        parts = file.relative_to(LAB).with_suffix("").parts
        if parts[-1] == "__init__":  # a package's own module: counted when it holds code
            parts = parts[:-1]
            if not parts or "import" not in file.read_text():
                continue
        out[".".join(parts)] = file
    return out


def _imports(name: str, file: Path) -> list[tuple[str, bool]]:
    """(lab module imported, at the module's top level?) for every import of the lab."""
    tree = ast.parse(file.read_text())
    package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0] if "." in name else ""
    found = []
    top = set(map(id, tree.body))
    typing_only = {id(inner) for node in tree.body if isinstance(node, ast.If)  # `if TYPE_CHECKING:`
                   and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
                   for inner in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # names for annotations, never imported when the module runs
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)] if package else []
                base = [p for p in base if p]
                prefix = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "lab":
                prefix = node.module[4:]
            else:
                continue
            for alias in node.names:
                candidate = f"{prefix}.{alias.name}" if prefix else alias.name
                target = candidate if candidate in LAYER or candidate in _MODULES else prefix
                found.append((target, id(node) in top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lab" and alias.name != "lab":
                    found.append((alias.name[4:], id(node) in top))
    return [(target, at_top) for target, at_top in found if target]


_MODULES = _modules()


def test_every_module_has_a_layer():
    assert sorted(set(_MODULES) - set(LAYER)) == []
    assert sorted(set(LAYER) - set(_MODULES)) == []


@pytest.mark.parametrize("name", sorted(_MODULES))
def test_imports_come_from_the_same_layer_or_below(name):
    for target, at_top in _imports(name, _MODULES[name]):
        assert target in LAYER, f"{name} imports {target}, which has no layer"
        assert LAYER[target] <= LAYER[name], (
            f"{name} ({LAYERS[LAYER[name]][0]}) imports {target} ({LAYERS[LAYER[target]][0]}), a layer above")
        assert at_top or name in LAZY, f"{name} imports {target} inside a function"
