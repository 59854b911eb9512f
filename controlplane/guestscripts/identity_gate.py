"""The golden VM's identity gate (runs in the guest, by python3).

Installed by the qemu initramfs when the kernel command line says ``avm.identity=gate``, and run
by ``avm-identity.service``. It talks over the ``avm.identity`` virtio-serial port, which only the
host's QEMU process can write. sshd runs, but nothing outside the guest can reach it: QEMU
forwards no port to it until the host has this gate's "ok" (then ``hostfwd_add``). Each SSH
connection is served by a freshly exec'd sshd that reads the host key from disk, so the first
connection already gets this VM's own key, and session keys drawn after the reseed.

    guest -> {"avm": "waiting"}           blocks in write() until a host is connected
    host  -> {"op": "settle"}             (only when the host is about to save a snapshot)
    guest -> {"avm": "settled", ...}      every boot job but this one is done
    host  -> {"op": "identity", ...}      host key, login key, machine-id, entropy, clock
    guest -> {"avm": "ok", ...}           installed; the host now forwards the SSH port

When the host hangs up (it saves the snapshot then), read() returns EOF and the gate writes
"waiting" again, which blocks until the next host (a restored copy's QEMU) connects. So every
copy restored from one snapshot resumes here, and none is reachable before its identity is in.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import socket
import struct
import time

PORT_NAME = "avm.identity"
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07): make the CRNG use the input pool now
# the job that may still be queued when the boot has settled: this gate's own
GATED = ("avm-identity.service",)


def read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def port_device() -> str:
    ports = "/sys/class/virtio-ports"
    for _ in range(600):
        for entry in sorted(os.listdir(ports)) if os.path.isdir(ports) else ():
            if read(f"{ports}/{entry}/name").strip() == PORT_NAME:
                return f"/dev/{entry}"
        time.sleep(0.05)
    raise SystemExit(f"avm-identity: no virtio-serial port named {PORT_NAME}")


def settle(limit_s: float = 30.0) -> dict[str, str]:
    """Wait until no boot job is at work but this gate (a job that only waits, e.g. on a
    device that never comes, may stay); what was left, for the receipt."""
    import subprocess  # here, not at the top: a restored gate never runs it (a fork + exec under TCG)

    # the unit's Nice=-10 is for reaching "waiting" early; polling must not outrun the jobs it waits for
    os.setpriority(os.PRIO_PROCESS, 0, 0)
    polls = 0
    left: list[str] = []
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        polls += 1
        out = subprocess.run(
            ["systemctl", "list-jobs", "--no-legend", "--plain"], capture_output=True, text=True, check=False
        ).stdout
        jobs = [line.split() for line in out.splitlines() if len(line.split()) >= 4]
        left = sorted(f"{j[1]}:{j[3]}" for j in jobs if j[1] not in GATED)
        if all(j[1] in GATED or j[3] == "waiting" for j in jobs):
            break
        time.sleep(0.1)
    print(f"avm-identity: settled after {polls} polls; jobs left: {' '.join(left) or 'none'}", flush=True)
    unbind_machine_id()  # now: no copy restored from this snapshot then spends a fork + exec on it
    subprocess.run(["sync"], check=False)
    return {"avm": "settled", "polls": str(polls), "left": " ".join(left)}


def unbind_machine_id() -> None:
    """systemd may leave /etc/machine-id as a transient bind mount (read-only root, or an empty
    file at boot): unmount it, so that the file written later is the one everyone reads."""
    with open("/proc/self/mountinfo") as fh:
        if any(line.split()[4] == "/etc/machine-id" for line in fh):
            import subprocess

            subprocess.run(["umount", "/etc/machine-id"], capture_output=True, check=False)


def reseed(entropy: bytes) -> None:
    """Mix host entropy into the input pool, credit it, and force the CRNG to reseed from it."""
    with open("/dev/urandom", "wb") as fh:
        fh.write(entropy)
    fd = os.open("/dev/random", os.O_WRONLY)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def write(path: str, data: bytes, mode: int) -> None:
    tmp = f"{path}.avm-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def announce() -> None:
    """Send an ARP request for the gateway from the NIC avm configured (``avm.net=ADDR/P,GW``).

    A restored guest meets a new QEMU whose user-mode network has never seen its MAC address:
    its first forwarded SYN would wait for an ARP round and a TCP retransmission (seconds under
    TCG). The request teaches it the guest's address now."""
    cmdline = read("/proc/cmdline").split()
    net = [a.split("=", 1)[1] for a in cmdline if a.startswith("avm.net=")]
    devs = [d for d in sorted(os.listdir("/sys/class/net")) if d != "lo"]
    if not net or not devs:
        return
    addr, gateway = net[0].split("/")[0], net[0].split(",")[1]
    mac_text = read(f"/sys/class/net/{devs[0]}/address")
    mac = bytes.fromhex(mac_text.strip().replace(":", ""))
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + socket.inet_aton(addr)
    arp += b"\0" * 6 + socket.inet_aton(gateway)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind((devs[0], 0x0806))
        raw.send(b"\xff" * 6 + mac + struct.pack("!H", 0x0806) + arp)


def install(msg: dict[str, str]) -> dict[str, str]:
    t0 = time.monotonic()
    reseed(bytes.fromhex(msg["entropy"]))
    time.clock_settime_ns(time.CLOCK_REALTIME, int(msg["time_ns"]))
    unbind_machine_id()  # a no-op after a snapshot's settle did it
    write("/etc/machine-id", msg["machine_id"].encode() + b"\n", 0o444)
    os.makedirs("/root/.ssh", mode=0o700, exist_ok=True)
    os.makedirs("/etc/ssh/sshd_config.d", mode=0o755, exist_ok=True)
    write("/etc/ssh/ssh_host_ed25519_key", base64.b64decode(msg["host_key"]), 0o600)
    write("/etc/ssh/ssh_host_ed25519_key.pub", msg["host_key_pub"].encode(), 0o644)
    write("/root/.ssh/authorized_keys", msg["authorized_keys"].encode(), 0o600)
    write("/etc/ssh/sshd_config.d/avm.conf", msg["sshd_dropin"].encode(), 0o644)
    write("/etc/hostname", msg["hostname"].encode() + b"\n", 0o644)
    socket.sethostname(msg["hostname"])
    announce()
    with open("/dev/urandom", "rb") as fh:
        sample = fh.read(32).hex()
    took = f"{time.monotonic() - t0:.3f}"
    return {"avm": "ok", "machine_id": msg["machine_id"], "urandom_after_reseed": sample, "install_s": took}


def main() -> int:
    fd = os.open(port_device(), os.O_RDWR)
    with os.fdopen(fd, "r+b", buffering=0) as port:
        buf = b""
        port.write(b'{"avm": "waiting"}\n')
        while True:
            chunk = port.read(65536)
            if not chunk:  # the host hung up: wait for the next one
                buf = b""
                time.sleep(0.02)
                port.write(b'{"avm": "waiting"}\n')
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if msg["op"] == "settle":
                    reply = settle()
                elif msg["op"] == "identity":
                    port.write(json.dumps(install(msg)).encode() + b"\n")
                    return 0
                else:
                    reply = {"avm": "error", "detail": f"unknown op {msg['op']!r}"}
                port.write(json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    raise SystemExit(main())
