"""Preflight's nf_tables probes on this machine, and the guard that keeps libnftables out of
the harness's own namespace."""

import pytest

from lab import backend, preflight
from lab.rules.nft import libnft, probes


def test_naming_no_namespace_outside_a_scratch_one_is_refused() -> None:
    """The guard runs before libnftables is touched: no root needed, and nothing is sent."""
    with pytest.raises(RuntimeError, match="outside a scratch namespace"):
        libnft.run(None, "add table inet ilab-never")


@pytest.mark.kernel
def test_this_machine_has_every_piece_and_auto_picks_legacy(monkeypatch) -> None:
    monkeypatch.delenv(backend.ENVIRONMENT, raising=False)  # what auto finds, not what CI names
    for finding in (probes.nf_tables(), probes.nftrace(), probes.owner_through_compat(), probes.native_rules(),
                    probes.legacy_xtables()):
        assert finding.ok, finding.line
    preflight.check("nft")
    preflight.check("mixed:legacy,nft")
    picked, why = backend.choose(backend.AUTO)
    assert (picked.name, why) == ("legacy", "auto: legacy (legacy xtables: the nat table loads)")
