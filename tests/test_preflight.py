"""What `istio-lab preflight` says for each missing piece, shown without changing the machine.

Each missing piece is made missing for one child process only: a PATH without a
command, an environment variable python-iptables reads, or a seccomp filter that
makes the kernel answer one kind of call as a kernel without the piece answers it
(a kernel without legacy xtables refuses the IPT_SO_* socket options with
ENOPROTOOPT; one without nfnetlink refuses NETLINK_NETFILTER sockets).  The
filter dies with the child; nothing is unloaded, uninstalled or reconfigured.
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# seccomp: audit arch and syscall numbers per machine (linux/audit.h, asm/unistd.h)
ARCH = {"x86_64": (0xC000003E, {"getsockopt": 55, "socket": 41}),
        "aarch64": (0xC00000B7, {"getsockopt": 209, "socket": 198})}
IPT_SO_GET_INFO, IPT_SO_GET_ENTRIES = 64, 65  # linux/netfilter_ipv4/ip_tables.h
SOL_IP, AF_NETLINK, NETLINK_NETFILTER = 0, 16, 12

# Installs a filter in this process, then runs the CLI: argv = [errno, syscall, (arg, lo, hi)..., "--", cli args]
SECCOMP_CHILD = r"""
import ctypes, sys
sep = sys.argv.index("--")
spec, cli = sys.argv[1:sep], sys.argv[sep + 1:]
arch, nr, err = (int(x, 0) for x in spec[:3])
conds = [tuple(int(x, 0) for x in c.split(":")) for c in spec[3:]]
LD, JEQ, JGE, JGT, RET = 0x20, 0x15, 0x35, 0x25, 0x06
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
prog = [(LD, "", 4), (JEQ, "", arch), (LD, "", 0), (JEQ, "", nr)]
for arg, lo, hi in conds:  # each argument's low 32 bits (little-endian seccomp_data.args[arg])
    prog += [(LD, "", 16 + 8 * arg), (JGE, "", lo), (JGT, "gt", hi)]
prog += [(RET, "", ERRNO | err), (RET, "", ALLOW)]
allow = len(prog) - 1
class Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]
insns = (Insn * len(prog))()
for i, (code, kind, k) in enumerate(prog):
    to_allow = allow - i - 1
    jt, jf = (to_allow, 0) if kind == "gt" else (0, to_allow) if code in (JEQ, JGE) else (0, 0)
    insns[i] = Insn(code, jt, jf, k)
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(Prog(len(prog), insns)), 0, 0):
    sys.exit("cannot install the seccomp filter: errno %d" % ctypes.get_errno())
from lab.cli import main
sys.exit(main(cli))
"""


def _preflight(env: dict[str, str] | None = None, prefix: list[str] = (), backend: str = "legacy"
               ) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "lab.cli", "preflight", "--backend", backend], cwd=REPO,
                          env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)


def _preflight_denying(syscall: str, err: int, *conds: tuple[int, int, int], backend: str = "legacy"
                       ) -> subprocess.CompletedProcess:
    """preflight in a child whose `syscall` fails with `err` when every (arg, lo, hi) holds."""
    machine = platform.machine()
    assert machine in ARCH, f"no seccomp numbers for {machine}: add them to ARCH"
    arch, numbers = ARCH[machine]
    spec = [str(arch), str(numbers[syscall]), str(err)] + [f"{a}:{lo}:{hi}" for a, lo, hi in conds]
    env = {k: v for k, v in os.environ.items() if k != "ISTIO_LAB_BACKEND"}  # what auto finds, not what CI names
    return subprocess.run([sys.executable, "-c", SECCOMP_CHILD, *spec, "--", "preflight", "--backend", backend],
                          cwd=REPO, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)


@pytest.mark.kernel
@pytest.mark.parametrize("backend, pieces", [
    ("legacy", "legacy xtables, owner, REDIRECT, TRACE, nfnetlink_log"),
    ("nft", "nf_tables, nftrace in a namespace, owner and REDIRECT through nft_compat, "
             "Istio's native nftables rules"),
])
def test_preflight_passes_on_this_machine(backend, pieces) -> None:
    result = _preflight(backend=backend)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (f"istio-lab: this machine can run the lab on the {backend} backend "
                             f"(--backend {backend}): root, {pieces}\n")


def test_preflight_without_root() -> None:
    prefix = []
    if os.geteuid() == 0:  # a user namespace with no uid map: euid 65534 there
        probe = subprocess.run(["unshare", "--user", "id", "-u"], capture_output=True, text=True)
        if probe.returncode != 0 or probe.stdout.strip() == "0":
            pytest.skip(f"cannot drop root here: {probe.stderr.strip() or probe.stdout.strip()}")
        prefix = ["unshare", "--user"]
    from lab.preflight import ROOT_MESSAGE

    result = _preflight(prefix=prefix)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"istio-lab: {ROOT_MESSAGE}\n")


@pytest.mark.kernel
def test_preflight_without_iptables_legacy_save() -> None:
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not os.path.exists(os.path.join(d, "iptables-legacy-save")))
    assert shutil.which("iptables-legacy-save", path=path) is None
    result = _preflight({**os.environ, "PATH": path})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("istio-lab: iptables-legacy-save not found: "
                             "install Debian's iptables package (apt-get install iptables)\n")


@pytest.mark.kernel
def test_preflight_when_python_iptables_cannot_load_libxtables() -> None:
    # python-iptables looks for libxtables.so.<this> instead of any libxtables
    result = _preflight({**os.environ, "PYTHON_IPTABLES_XTABLES_VERSION": "999"})
    assert (result.returncode, result.stdout) == (2, "")
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("istio-lab: python-iptables cannot load libip4tc/libxtables (")
    assert lines[0].endswith("): install Debian's iptables package")


@pytest.mark.kernel
@pytest.mark.parametrize("err", [errno.ENOPROTOOPT, errno.ENOENT], ids=["no-ip_tables", "no-iptable_nat"])
def test_preflight_on_a_kernel_without_legacy_xtables(err: int) -> None:
    """ENOPROTOOPT: no legacy xtables at all (an nft-only kernel); ENOENT: no legacy nat table."""
    result = _preflight_denying("getsockopt", err, (1, SOL_IP, SOL_IP), (2, IPT_SO_GET_INFO, IPT_SO_GET_ENTRIES))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("istio-lab: legacy xtables has no nat table: this kernel offers no legacy "
                                    "iptables (CONFIG_IP_NF_IPTABLES_LEGACY"), result.stderr
    assert result.stderr.endswith("run the lab on nf_tables instead: --backend nft (or auto)\n")
    assert result.stderr.count("\n") == 1
    # auto takes nf_tables on such a kernel, and says why
    auto = _preflight_denying("getsockopt", err, (1, SOL_IP, SOL_IP), (2, IPT_SO_GET_INFO, IPT_SO_GET_ENTRIES),
                              backend="auto")
    assert (auto.returncode, auto.stderr) == (0, ""), auto.stderr
    assert auto.stdout.startswith("istio-lab: this machine can run the lab on the nft backend (auto: nft (no legacy "
                                  "nat table"), auto.stdout


@pytest.mark.kernel
def test_preflight_on_a_kernel_without_nfnetlink() -> None:
    result = _preflight_denying("socket", errno.EPROTONOSUPPORT, (0, AF_NETLINK, AF_NETLINK),
                                (2, NETLINK_NETFILTER, NETLINK_NETFILTER))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("istio-lab: the kernel lacks nfnetlink_log ([Errno 93] Protocol not supported): "
                             "load it: modprobe nfnetlink_log (CONFIG_NETFILTER_NETLINK_LOG)\n")  # and nothing else
