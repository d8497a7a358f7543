"""The nf_tables backend: rule sets in nf_tables, read back by handle, traced with nftrace.

- libnft: libnftables contexts made inside a pod's namespace (apply, list); a listing read
  as lab.rules.nftset, the one model of an nft rule set (handles, positions, counters).
- iptables_nft: an iptables-save rule set applied and read back as iptables-nft does.
- native: an `nft -f` script applied atomically, its rules listed, its tables deleted.
- tracing: the lab's `inet ilab-trace` table and its `meta nftrace set 1` rules.
- naming: nftrace events named as legacy TRACE names them (RuleRef, rule/return/policy).
- probes: what preflight asks of this machine (nf_tables, nftrace, owner through compat).
"""
