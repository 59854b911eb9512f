"""Controls observed in force on a real nspawn golden host (issue 11, item 4).

On this hybrid-cgroup machine ``IPAddressDeny=`` and the cgroup limits are not enforced inside
the container. The nspawn backend now boots each VM in a network namespace avm made, installs
each profile's default-deny chain there from the host side, and every promote and status
probes the sandbox. In order, against one VM: two VMs at once on their own addresses; an L1
promote that passes because the probe saw the deny; the agent user refused where root is not;
the container's root unable to touch the ruleset; status in sync with limits reported
not-enforced; a drop-in that runs a unit as another user refused at exit 3 and stopped; a
host-side rule removed, and status reporting drift.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from controlplane.home import Home
from controlplane.promote.enforcement import host_network
from controlplane.transport import inventory
from controlplane.transport.ssh import SshTransport
from tests.plugins.agentrepo import AgentRepo
from tests.plugins.vms import run_avm
from tests.plugins.vms import run_avm_json as avm

# Listens (as root) on the VM's own veth address, then connects to it as root and as the
# agent user (setpriv, no supplementary groups): prints both outcomes.
CONNECT_AS = r"""
import json, socket, subprocess, sys
addr, user = sys.argv[1], sys.argv[2]
connect = (
    "import socket,sys\ns=socket.socket();s.settimeout(3)\ntry:\n"
    " s.connect((sys.argv[1],int(sys.argv[2])));print('connected')\n"
    "except OSError as e:\n print('errno',e.errno)"
)
def run(prefix, port):
    argv = [*prefix, "python3", "-c", connect, addr, port]
    return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
with socket.socket() as listener:
    listener.bind((addr, 0)); listener.listen(4)
    port = str(listener.getsockname()[1])
    root = run([], port)
    agent = run(["setpriv", "--reuid", user, "--regid", user, "--clear-groups"], port)
print(json.dumps({"root": root, "agent": agent}))
"""


TRANSIENT = ("systemd-run", "--quiet", "--wait", "--pipe", "--collect")
ALLOC_300M = "b = b'x' * (300 * 2**20); print(len(b))"  # every page written, not just reserved
FORK_100 = (
    "import os, time\npids = []\nfor _ in range(100):\n    pid = os.fork()\n"
    "    if pid == 0:\n        time.sleep(2); os._exit(0)\n    pids.append(pid)\n"
    "print(len(pids))\nfor pid in pids: os.waitpid(pid, 0)"
)


def on_host(home: Home, vm: str, *argv: str) -> subprocess.CompletedProcess[str]:
    with SshTransport.from_target(inventory.load(home, vm)) as ssh:
        result = ssh.run(list(argv), timeout=60)
    return subprocess.CompletedProcess(argv, result.rc, result.stdout, result.stderr)


def netns_of(home: Home, vm: str) -> str:
    net = host_network(inventory.load(home, vm))
    assert net is not None
    return net.netns


def host_rules(netns: str) -> dict[str, Any]:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "inet", "avm_egress"],
        capture_output=True,
        text=True,
        check=True,
    )
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def counter(netns: str, name: str) -> int:
    for item in host_rules(netns)["nftables"]:
        if "counter" in item and item["counter"]["name"] == name:
            return int(item["counter"]["packets"])
    raise AssertionError(f"no counter {name}")


def predicate(home: Home, seq: str) -> dict[str, Any]:
    return avm(home, "receipts", "show", seq)[1]["statement"]["predicate"]  # type: ignore[no-any-return]


def promote(home: Home, repo: AgentRepo, commit: str, vm: str, *extra: str) -> tuple[int, dict[str, Any]]:
    return avm(home, "promote", "--repo", str(repo.path), "--commit", commit, "--target", vm, *extra)


def test_two_nspawn_vms_run_at_once_on_their_own_addresses(golden_home: Home, nspawn_vm: str) -> None:
    rc, second = avm(golden_home, "vm", "up", "tnspawn2", "--backend", "nspawn", "--timeout", "120")
    assert rc == 0, second
    try:
        first = inventory.load(golden_home, nspawn_vm)
        other = inventory.load(golden_home, "tnspawn2")
        assert first.url != other.url
        assert first.url.endswith(":22") and other.url.endswith(":22")  # same port, no collision
        names = {on_host(golden_home, vm, "hostname").stdout.strip() for vm in (nspawn_vm, "tnspawn2")}
        assert len(names) == 2
        net = host_network(other)
        assert net is not None
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert net.netns in listed
    finally:
        rc, down = avm(golden_home, "vm", "down", "tnspawn2")
    assert rc == 0, down
    checks = {c["name"]: c["ok"] for c in down["checks"]}
    assert checks["netns-removed"] is True and checks["veth-removed"] is True
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert net.netns not in listed
    links = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert net.host_dev not in {link["ifname"] for link in json.loads(links)}


def test_l1_promote_passes_because_the_probe_observed_the_deny(
    golden_home: Home, agent_repo: AgentRepo, nspawn_vm: str
) -> None:
    rc, doc = promote(golden_home, agent_repo, agent_repo.commits["v1"], nspawn_vm, "--apply")
    assert rc == 0, doc
    pred = predicate(golden_home, doc["receipts"]["apply"])
    checks = {c["name"]: c for c in pred["checks"]}
    for profile in ("canary", "web", "batch"):
        assert checks[f"egress-rules:{profile}"]["ok"] is True
        denied = checks[f"egress-denied:{profile}"]
        assert denied["ok"] is True, denied
        assert "errno 113" in denied["detail"]  # the host-side reject: No route to host
        assert denied["detail"].startswith("denied: ")
        limits = checks[f"limits:{profile}"]
        assert limits["ok"] is False and limits["detail"].startswith("not-enforced: ")
    gates = [e for e in pred["events"] if e["type"] == "gate.decision" and e["gate"] == "observed"]
    assert {g["profile"]: g["outcome"] for g in gates} == {"canary": "pass", "web": "pass", "batch": "pass"}
    web = pred["result"]["controls"]["web"]
    assert web["egress"] == "denied" and web["limits"] == "not-enforced"
    # what the kernel applies to the unit, not what systemd was told
    assert web["limit_readings"]["memory"]["configured"] == str(128 * 1024 * 1024)
    assert web["limit_readings"]["memory"]["kernel"] == "9223372036854771712"
    assert web["limit_readings"]["memory"]["file"] == "/sys/fs/cgroup/memory/memory.limit_in_bytes"
    assert web["limit_readings"]["tasks"]["configured"] == "32"
    assert web["limit_readings"]["tasks"]["kernel"] is None
    assert web["limit_readings"]["cpu"]["kernel"] == "-1 100000"


def test_agent_user_is_refused_an_unlisted_address_where_root_is_not(
    golden_home: Home, nspawn_vm: str
) -> None:
    netns = netns_of(golden_home, nspawn_vm)
    before = counter(netns, "denied-web")
    address = inventory.load(golden_home, nspawn_vm).url.rsplit("@", 1)[1].rsplit(":", 1)[0]
    out = on_host(golden_home, nspawn_vm, "python3", "-c", CONNECT_AS, address, "agent-web")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"root": "connected", "agent": "errno 113"}
    assert counter(netns, "denied-web") > before


def test_root_in_the_container_cannot_change_the_netns_ruleset(golden_home: Home, nspawn_vm: str) -> None:
    netns = netns_of(golden_home, nspawn_vm)
    before = host_rules(netns)
    caps = on_host(golden_home, nspawn_vm, "grep", "CapEff", "/proc/self/status").stdout.split()[1]
    assert int(caps, 16) & (1 << 12) == 0  # no CAP_NET_ADMIN in the namespace
    for argv, rc in (
        (["ip", "link", "set", "host0", "down"], 2),
        (["ip", "addr", "flush", "dev", "host0"], 255),
    ):
        out = on_host(golden_home, nspawn_vm, *argv)
        assert out.returncode == rc and "Operation not permitted" in out.stderr, (argv, out)
    # a raw NETLINK_NETFILTER batch that deletes the table: the kernel refuses it
    out = on_host(golden_home, nspawn_vm, "python3", "-c", DELETE_TABLE)
    assert out.stdout.strip() == "errno 1", out
    after = host_rules(netns)
    rules = [i for i in after["nftables"] if "rule" in i]
    assert rules == [i for i in before["nftables"] if "rule" in i]


# NFT_MSG_DELTABLE for inet/avm_egress in one batch, sent over netlink as the container's root
DELETE_TABLE = r"""
import socket, struct
def nlattr(kind, data):
    body = struct.pack("HH", 4 + len(data), kind) + data
    return body + b"\0" * (-len(body) % 4)
def msg(kind, flags, seq, payload):
    return struct.pack("IHHII", 16 + len(payload), kind, flags, seq, 0) + payload
NFNL_SUBSYS_NFTABLES, NFT_MSG_DELTABLE, NFPROTO_INET = 10, 2, 1
nfgen = lambda family, res: struct.pack("BBH", family, 0, socket.htons(res))
begin = msg(0x10, 1, 1, nfgen(0, NFNL_SUBSYS_NFTABLES))
delete = msg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE, 1 | 4, 2,
             nfgen(NFPROTO_INET, 0) + nlattr(1, b"avm_egress\0"))
end = msg(0x11, 1, 3, nfgen(0, NFNL_SUBSYS_NFTABLES))
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
s.bind((0, 0))
s.send(begin + delete + end)
s.settimeout(3)
while True:
    data = s.recv(65536)
    length, kind = struct.unpack("IH", data[:6])
    if kind == 2:  # NLMSG_ERROR
        code = struct.unpack("i", data[16:20])[0]
        if code != 0:
            print("errno", -code)
            break
"""


def test_status_in_sync_says_limits_are_not_enforced(golden_home: Home, nspawn_vm: str) -> None:
    rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
    assert rc == 0, doc
    assert doc["in_sync"] is True
    web = doc["controls"]["web"]
    assert web["egress"] == "denied" and web["limits"] == "not-enforced"
    assert {k: r["status"] for k, r in web["limit_readings"].items()} == {
        "memory": "not-enforced",
        "tasks": "not-enforced",
        "cpu": "not-enforced",
    }
    # and the verdict is true: under the same kind of limits a process goes past them here
    over = on_host(golden_home, nspawn_vm, *TRANSIENT, "-p", "MemoryMax=50M", "python3", "-c", ALLOC_300M)
    assert (over.returncode, over.stdout.strip()) == (0, str(300 * 2**20)), over
    forks = on_host(golden_home, nspawn_vm, *TRANSIENT, "-p", "TasksMax=10", "python3", "-c", FORK_100)
    assert (forks.returncode, forks.stdout.strip()) == (0, "100"), forks
    human = run_avm(golden_home, "status", "--target", nspawn_vm).stdout
    assert "web: egress denied, limits not-enforced" in human
    assert "memory not-enforced: configured 134217728" in human
    assert " ok" not in human


def test_a_deny_that_is_only_configured_fails_the_observed_gate_at_exit_3(
    golden_home: Home, agent_repo: AgentRepo, nspawn_vm: str
) -> None:
    """An nspawn host whose inventory has no network record (made before per-VM networks) gets
    no host-side rules, and the unit's IPAddressDeny= alone is not enforced there: the probe sees
    the connection go through and the promote is refused, the unit stopped (fail closed)."""
    target = inventory.load(golden_home, nspawn_vm)
    netns = netns_of(golden_home, nspawn_vm)
    inventory.save(
        golden_home,
        target.model_copy(update={"meta": {k: v for k, v in target.meta.items() if k != "network"}}),
    )
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "flush", "chain", "inet", "avm_egress", "profile-batch"],
        check=True,
    )
    # promoted earlier in the module: enabled, so it would come back at boot
    enabled = on_host(golden_home, nspawn_vm, "systemctl", "is-enabled", "agent-gateway@batch.service")
    assert enabled.stdout.strip() == "enabled"
    assert on_host(golden_home, nspawn_vm, "systemctl", "stop", "agent-gateway@batch.service").returncode == 0
    try:
        rc, doc = promote(
            golden_home, agent_repo, agent_repo.commits["v2"], nspawn_vm, "--apply", "--profile", "batch"
        )
        assert rc == 3, doc
        error = doc["error"]
        assert error["code"] == "tier-controls-missing"
        assert error["details"]["profile batch"]["missing"] == ["default-deny-egress"]
        assert "not observed in force (allowed)" in error["message"]
        state = on_host(golden_home, nspawn_vm, "systemctl", "is-active", "agent-gateway@batch.service")
        assert state.stdout.strip() == "inactive"  # fail closed: stopped
        enabled = on_host(golden_home, nspawn_vm, "systemctl", "is-enabled", "agent-gateway@batch.service")
        assert enabled.stdout.strip() == "disabled"  # and it stays stopped across a reboot
    finally:
        inventory.save(golden_home, target)
    receipts = avm(golden_home, "receipts", "list")[1]["receipts"]
    last_apply = next(r for r in reversed(receipts) if r["kind"] == "apply")
    pred = predicate(golden_home, str(last_apply["seq"]))
    checks = {c["name"]: c for c in pred["checks"]}
    assert checks["egress-denied:batch"]["ok"] is False
    assert checks["egress-denied:batch"]["detail"].startswith("allowed: uid ")
    assert checks["fail-closed:batch"]["ok"] is True
    assert pred["result"]["refused_controls"] == ["profile batch"]
    # with its network record back, the next promote reinstalls the rule and passes the gate
    rc, doc = promote(
        golden_home, agent_repo, agent_repo.commits["v2"], nspawn_vm, "--apply", "--profile", "batch"
    )
    assert rc == 0, doc


def test_a_host_side_rule_removed_is_drift(golden_home: Home, nspawn_vm: str) -> None:
    netns = netns_of(golden_home, nspawn_vm)
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "flush", "chain", "inet", "avm_egress", "profile-web"],
        check=True,
    )
    rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
    assert rc == 2, doc
    web = [f for f in doc["findings"] if "web" in f["where"]]
    whats = sorted(f["what"] for f in web)
    assert whats == ["egress deny not observed (allowed)", "host-side egress rules"], web
    assert doc["controls"]["web"]["egress"] == "allowed"
