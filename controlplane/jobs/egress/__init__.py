"""The network of one Tier-2 job: a private namespace, a /30 link and an nftables table.

* ``network.open_network``: build it (default deny), yield a ``live.JobNetwork``, tear it down.
* ``rules``: egress entries validated into ``Allow`` values, and the ruleset rendered from them.
* ``names``: every namespace, link and table name, a pure function of (job id, label).
* ``probe``: connectivity probes run inside a namespace, the evidence the rules hold.
"""
