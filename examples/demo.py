"""`make demo`: the whole product, end to end, with real parts and nothing faked.

Every step runs the real `avm` CLI in a subprocess, shows the command and its output, and checks
the exit code the step must have (drift is 2, a refusal is 3). If any step does not behave as
it must, the demo stops with exit 1 and says which step. State lives in ./.demo (the golden
image store is kept between runs, so a second run reuses the cached image; the home with keys
and receipts is made fresh every time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / ".demo"
HOME = DEMO / "home"
IMAGES = DEMO / "images"
SNAPSHOTS = DEMO / "snapshots"  # booted snapshots, kept across runs like the images
AGENT = DEMO / "hello-agent"
KEYS = DEMO / "release-key"
VM = "demo"
PASSWORD = os.urandom(12).hex()  # protects the demo's release key; never printed
GIT_ENV = {
    "GIT_AUTHOR_NAME": "demo",
    "GIT_AUTHOR_EMAIL": "demo@example.invalid",
    "GIT_COMMITTER_NAME": "demo",
    "GIT_COMMITTER_EMAIL": "demo@example.invalid",
}
ENV = {
    **os.environ,
    "AVM_HOME": str(HOME),
    "AVM_IMAGE_CACHE": str(IMAGES),
    "AVM_SNAPSHOT_CACHE": str(SNAPSHOTS),
    "COSIGN_PASSWORD": PASSWORD,
}

console = Console(highlight=False)
timings: list[tuple[str, float, int]] = []


class DemoFailed(Exception):
    pass


def step(title: str, why: str) -> None:
    console.rule(f"[bold]{title}")
    console.print(f"[dim]{why}[/dim]")


def avm(*args: str, expect: int = 0, label: str | None = None, stdin: bytes | None = None) -> str:
    """Run `avm ARGS`, stream its progress, show its output, and check its exit code."""
    console.print(f"[cyan]$ avm {' '.join(args)}[/cyan]")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane", *args],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read() if proc.stdout else b""))
    reader.start()
    if stdin is not None and proc.stdin is not None:
        proc.stdin.write(stdin)
        proc.stdin.close()
    # progress (stderr) streams live: long steps show what they are doing as they do it
    with console.status(f"avm {args[0]} ...", spinner="dots"):
        for line in iter(proc.stderr.readline if proc.stderr else (lambda: b""), b""):
            console.print(f"[dim]  {line.decode(errors='replace').rstrip()}[/dim]")
    proc.wait()
    reader.join()
    elapsed = time.monotonic() - t0
    text = b"".join(chunks).decode(errors="replace")
    if text.strip():
        console.print(text.rstrip())
    timings.append((label or " ".join(args[:2]), elapsed, proc.returncode))
    verdict = "as expected" if proc.returncode == expect else f"EXPECTED {expect}"
    console.print(
        f"[{'green' if proc.returncode == expect else 'red'}]exit {proc.returncode} ({verdict}), "
        f"{elapsed:.1f}s[/]"
    )
    if proc.returncode != expect:
        raise DemoFailed(f"`avm {' '.join(args)}` exited {proc.returncode}, expected {expect}")
    return text


def git(*args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(AGENT), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **GIT_ENV},
        check=True,
    )
    return out.stdout.strip()


def make_agent_repo() -> dict[str, str]:
    shutil.rmtree(AGENT, ignore_errors=True)
    shutil.copytree(ROOT / "examples" / "hello-agent", AGENT, ignore=shutil.ignore_patterns("__pycache__"))
    git("init", "-q", "-b", "main")
    commits = {}
    agent = AGENT / "agent.py"
    for version, greeting in (("v1", "hello"), ("v2", "hello v2"), ("v3", "hello v3")):
        text = agent.read_text()
        agent.write_text(text.replace(text.split("GREETING = ")[1].splitlines()[0], json.dumps(greeting)))
        git("add", "-A")
        git("commit", "-q", "-m", f"hello-agent {version}")
        commits[version] = git("rev-parse", "HEAD")
        console.print(f"  {version}: {commits[version]}  (GREETING = {greeting!r})")
    return commits


TOOLS_PORT = 19243  # the example MCP server on this machine; the VM reaches it at 10.0.2.2
MCP_ENTRY = {"host": "tools.example.test", "methods": ["POST"], "paths": ["/mcp"], "mcp": True}


def start_tools_server() -> subprocess.Popen[bytes]:
    """The example MCP tool server with TLS from a CA of its own, which only the gateway trusts
    (``<home>/egress/<vm>/gateway.json``: that CA, and the name pinned to 10.0.2.2)."""
    from controlplane.boundary.ca import EgressCA

    ca = EgressCA.ensure(DEMO / "tools-ca", common_name="demo MCP server CA")
    cert, key = ca.leaf("tools.example.test")
    server = ROOT / "examples" / "mcp-tools" / "tools_server.py"
    argv = [sys.executable, str(server), "127.0.0.1", str(TOOLS_PORT), "--tls", str(cert), str(key)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    if proc.stdout is None or proc.stdout.readline().strip() != b"ready":
        raise DemoFailed("the example MCP tool server did not start")
    options = HOME / "egress" / VM / "gateway.json"
    options.parent.mkdir(parents=True, exist_ok=True)
    pins = {"tools.example.test:443": ["10.0.2.2", TOOLS_PORT]}
    options.write_text(json.dumps({"upstream_ca": str(ca.cert_path), "upstreams": pins}))
    # the post-apply probe's control: a name the VM resolves, which the sandbox must not
    avm(
        "vm",
        "ssh",
        VM,
        "--",
        "sh",
        "-c",
        "echo '10.0.2.2 outside.example.test' >> /etc/hosts",
        label="vm ssh",
    )
    return proc


def commit_mcp_use() -> str:
    import yaml

    manifest = yaml.safe_load((AGENT / "avm.yaml").read_text())
    web = next(p for p in manifest["profiles"] if p["name"] == "web")
    web["egress"] = [*web.get("egress", []), MCP_ENTRY]
    web["env"] = {**web.get("env", {}), "MCP_SERVER": "https://tools.example.test/mcp"}
    (AGENT / "avm.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    git("add", "-A")
    git("commit", "-q", "-m", "hello-agent v4: uses tools of the example MCP server, through the boundary")
    sha = git("rev-parse", "HEAD")
    console.print(f"  v4: {sha}  (web lists tools.example.test with mcp: true)")
    return sha


def ask_agent(query: str, label: str) -> dict[str, Any]:
    fetch = (
        "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())"
    )
    out = avm(
        "vm", "ssh", VM, "--", "python3", "-c", fetch, f"http://127.0.0.1:18082/use?{query}", label=label
    )
    doc: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return doc


def run() -> None:
    shutil.rmtree(HOME, ignore_errors=True)
    shutil.rmtree(KEYS, ignore_errors=True)
    DEMO.mkdir(exist_ok=True)

    step(
        "1. keys init", "The receipt signing key (ed25519). Its first receipt records the key's fingerprint."
    )
    avm("keys", "init")

    step(
        "2. image build",
        "The golden image from images/golden.yaml: mmdebstrap rootfs, ext4 + qcow2, kernel, "
        "SBOM, manifest. Cached by recipe digest: a second run takes about a second.",
    )
    avm("image", "build", label="image build")

    step(
        "3. vm up demo",
        "Boot the golden VM under QEMU (KVM if the probe says it works, else TCG). Its own host "
        "key is pinned before the first connection. The first run boots cold and saves a booted "
        "snapshot of this image; later runs restore it (a warm start, step 16).",
    )
    first_up = avm("vm", "up", VM, "--timeout", "900", label="vm up (qemu)")
    avm("vm", "ssh", VM, "--", "systemctl", "is-system-running", "--wait", label="vm ssh")

    step("4. the agent repo", "examples/hello-agent becomes a git repo with three commits.")
    commits = make_agent_repo()

    step(
        "5. sign v1 and v2",
        "A cosign-compatible release key (ECDSA P-256). Only explicitly trusted keys count. "
        "v3 is left unsigned on purpose.",
    )
    avm("keys", "release-init", "--out", str(KEYS))
    avm("keys", "trust", "--release", str(KEYS / "cosign.pub"), "--name", "release")
    for version in ("v1", "v2"):
        avm(
            "sign",
            "--repo",
            str(AGENT),
            "--commit",
            commits[version],
            "--key",
            str(KEYS / "cosign.key"),
            label=f"sign {version}",
        )
    avm(
        "secrets",
        "put",
        "secret://local/web-api-token",
        stdin=os.urandom(16).hex().encode(),
        label="secrets put",
    )

    step(
        "6. promote v1",
        "Dry-run first: resolve, verify the signature, gather host facts in one round trip, and "
        "print the plan with its digest. Then --apply executes exactly that plan.",
    )
    avm("promote", "--repo", str(AGENT), "--commit", "main~2", "--target", VM, label="promote v1 (dry-run)")
    avm(
        "promote",
        "--repo",
        str(AGENT),
        "--commit",
        commits["v1"],
        "--target",
        VM,
        "--apply",
        label="promote v1 --apply",
    )

    step("7. promote v2", "Canary first, soak, then the rest; each profile must report the new commit.")
    avm(
        "promote",
        "--repo",
        str(AGENT),
        "--commit",
        commits["v2"],
        "--target",
        VM,
        "--apply",
        label="promote v2 --apply",
    )

    step("8. status", "Re-derive everything from the host and compare it with the last apply receipt.")
    avm("status", "--target", VM)

    step("9. drift", "Someone edits a file of the running release on the VM. status finds it: exit 2.")
    release_file = f"/opt/agent/releases/{commits['v2']}/agent.py"
    avm(
        "vm",
        "ssh",
        VM,
        "--",
        "sh",
        "-c",
        f"chmod u+w {release_file} && echo '# hotfix' >> {release_file}",
        label="tamper",
    )
    avm("status", "--target", VM, expect=2, label="status (drift)")

    step(
        "10. rollback",
        "Back to the release recorded before the last promotion (v1), verified again and applied "
        "like any promotion. The host is in sync afterwards.",
    )
    avm("rollback", "--repo", str(AGENT), "--target", VM, "--apply", label="rollback --apply")
    avm("status", "--target", VM, label="status (after rollback)")

    step("11. unsigned v3", "Fail closed: no trusted signature, no promotion. Exit 3, host untouched.")
    avm(
        "promote",
        "--repo",
        str(AGENT),
        "--commit",
        commits["v3"],
        "--target",
        VM,
        "--apply",
        expect=3,
        label="promote v3 (refused)",
    )

    step(
        "12. MCP tools at the boundary",
        "hello-agent v4 uses the tools of the example MCP server (examples/mcp-tools) through the "
        "egress gateway: the web profile lists it with mcp: true, and its tools: become the "
        "gateway's rule. The agent then skips its own mcp_guard, as a compromised agent would: "
        "the gateway still refuses the unlisted tool (JSON-RPC error, reason tool-not-allowed).",
    )
    tools = start_tools_server()
    try:
        v4 = commit_mcp_use()
        avm("sign", "--repo", str(AGENT), "--commit", v4, "--key", str(KEYS / "cosign.key"), label="sign v4")
        avm(
            "promote",
            "--repo",
            str(AGENT),
            "--commit",
            v4,
            "--target",
            VM,
            "--apply",
            label="promote v4 --apply",
        )
        used = ask_agent("tool=search&query=boundary", "ask the agent: search (listed)")
        refused = ask_agent(
            "tool=delete_records&skip_guard=1", "ask the agent: delete_records, guard skipped"
        )
        reason = ((refused.get("answer") or {}).get("error") or {}).get("data", {}).get("reason")
        if used.get("status") != 200 or (refused.get("status"), reason) != (403, "tool-not-allowed"):
            raise DemoFailed(f"the boundary did not judge the tool calls as it must: {used} / {refused}")
    finally:
        tools.kill()
        tools.wait()

    step(
        "13. Tier-2 job",
        "A signed, digest-pinned job image runs in its own microVM with default-deny egress "
        "(no NIC at all), a hard timeout and verified teardown. Then the egress probes.",
    )
    job_image = avm(
        "--json",
        "image",
        "build-job",
        "demo-job",
        "--file",
        f"{ROOT / 'examples' / 'jobs' / 'hello.sh'}:/job/hello.sh",
        label="image build-job",
    )
    ref = json.loads(job_image)["image"]
    avm("image", "sign", ref, "--key", str(KEYS / "cosign.key"), label="image sign")
    spec = DEMO / "hello-job.json"
    spec.write_text(
        json.dumps(
            {
                "id": "demo-hello",
                "image": ref,
                "command": ["/bin/sh", "/job/hello.sh"],
                "env": {"GREETING": "hi from the demo"},
                "timeout": 120,
                "risk_tier": "L1",
                "egress": {"default": "deny", "allow": []},
            }
        )
    )
    avm("job", "run", str(spec), label="job run")
    # the probe boots a guest of the same image under the same (deny-all) spec and tries every
    # egress class from inside: with no allow entries the guest has no NIC, so all are denied
    avm("job", "probe-egress", str(spec), label="job probe-egress")

    step("14. receipts verify", "The auditor's check: every signature and the hash chain, offline.")
    avm("receipts", "verify")
    avm("receipts", "list")

    step("15. vm down demo", "Stop the VM and verify nothing of it is left.")
    avm("vm", "down", VM, label="vm down")

    step(
        "16. warm start",
        "Up again from the booted snapshot of step 3 (verified by sha256 before it resumes), on a "
        "fresh overlay. Identity arrives after the restore, before sshd accepts anyone: a new host "
        "key, login key and machine-id, and fresh entropy with a forced RNG reseed.",
    )
    up = json.loads(avm("--json", "vm", "up", VM, "--timeout", "900", label="vm up (warm)"))
    before = first_up.rsplit("key ", 1)[-1].rstrip(")\n ")  # "... (port N, key SHA256:...)"
    console.print(f"  host key before: {before}\n  host key now:    {up['host_key_fingerprint']}")
    if before == up["host_key_fingerprint"]:
        raise DemoFailed("the restored VM kept the previous VM's host key")
    avm("vm", "ssh", VM, "--", "cat", "/etc/machine-id", label="vm ssh (warm)")
    avm("vm", "down", VM, label="vm down (warm)")


def main() -> int:
    started = time.monotonic()
    ok = True
    try:
        run()
    except DemoFailed as exc:
        ok = False
        console.print(f"[bold red]demo failed: {exc}[/bold red]")
    finally:
        if not ok and (HOME / "run" / "vms" / VM).exists():
            subprocess.run([sys.executable, "-m", "controlplane", "vm", "down", VM], env=ENV, check=False)
    table = Table(title="make demo: step timings")
    for column in ("step", "seconds", "exit"):
        table.add_column(column)
    for label, seconds, rc in timings:
        table.add_row(label, f"{seconds:.1f}", str(rc))
    console.print(table)
    console.print(f"total {time.monotonic() - started:.0f}s; receipts in {HOME / 'receipts'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
