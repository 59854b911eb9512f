"""Per-VM SSH identity: a fresh ed25519 host key and client key for every VM, and the seed tar.

The golden image carries no host keys, so no two VMs can share one. The host key's public half
is pinned in the inventory before the first connection; the client key is the identity avm
logs in with. Keys are written 0600 into the VM's private state dir only.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from controlplane._internal.archive import Member, tar_bytes
from controlplane.vm.base import SshSeed


def _ed25519_pair(comment: str) -> tuple[bytes, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, f"{public.decode()} {comment}"


def fingerprint(public_line: str) -> str:
    """``SHA256:<base64>`` of an OpenSSH public key line, as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def sshd_dropin(port: int | None, listen: str | None) -> str:
    """The sshd drop-in: only our host key, keys only, and (nspawn) where to listen."""
    lines = [
        "# written by avm: per-VM host key, key-only root login",
        "HostKey /etc/ssh/ssh_host_ed25519_key",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
    ]
    if port is not None:
        lines.append(f"Port {port}")
    if listen is not None:
        lines.append(f"ListenAddress {listen}")
    return "\n".join(lines) + "\n"


def make_seed(state_dir: Path, name: str, *, port: int | None = None, listen: str | None = None) -> SshSeed:
    """Generate the VM's keys and write them into ``state_dir/ssh`` (0700, files 0600)."""
    ssh_dir = state_dir / "ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=False)
    host_private, host_public = _ed25519_pair(f"avm-{name}-host")
    client_private, client_public = _ed25519_pair(f"avm-{name}-client")
    dropin = sshd_dropin(port, listen)
    contents: dict[str, tuple[bytes, int]] = {
        "host_key": (host_private, 0o600),
        "host_key_pub": (host_public.encode() + b"\n", 0o644),
        "client_key": (client_private, 0o600),
        "client_key_pub": (client_public.encode() + b"\n", 0o644),
        "authorized_keys": (client_public.encode() + b"\n", 0o600),
        "sshd_dropin": (dropin.encode(), 0o644),
        "hostname": (f"avm-{name}\n".encode(), 0o644),
    }
    files: dict[str, Path] = {}
    for key, (data, mode) in contents.items():
        path = ssh_dir / key
        path.touch(mode=mode, exist_ok=False)
        path.write_bytes(data)
        files[key] = path
    return SshSeed(
        hostname=f"avm-{name}",
        host_key_private=host_private,
        host_key_public=host_public,
        authorized_keys=client_public + "\n",
        sshd_dropin=dropin,
        files=files,
    )


def placeholder_tar(name: str) -> bytes:
    """A throwaway host key for the qemu boot's first seconds, as a tar the initramfs extracts.

    sshd does not start without a host key, and a gated qemu VM gets its real one from the
    identity gate only later (after a restore, or once the boot reached the gate). Generating a
    key in the guest costs about 1.8 s of a TCG boot; this one is made on the host in a
    millisecond, fresh for every boot. It is never pinned, and nothing outside the guest can
    reach sshd while it is in use: the host forwards the SSH port only after the gate has
    replaced it. A booted snapshot holds the throwaway key of the boot that made it (as it held
    the guest-generated one before), and so does every copy restored from it until its gate
    installs the VM's own key; the fresh one QEMU passes a restored copy is never read."""
    private, public = _ed25519_pair(f"avm-{name}-placeholder")
    return tar_bytes(
        [
            Member("etc", mode=0o755, directory=True),
            Member("etc/ssh", mode=0o755, directory=True),
            Member("etc/ssh/ssh_host_ed25519_key", private, 0o600),
            Member("etc/ssh/ssh_host_ed25519_key.pub", public.encode() + b"\n", 0o644),
        ]
    )


def seed_tar(seed: SshSeed) -> bytes:
    """The seed the qemu initramfs extracts onto the root before ``switch_root``."""
    entries: list[tuple[str, bytes | None, int]] = [
        ("etc", None, 0o755),
        ("etc/ssh", None, 0o755),
        ("etc/ssh/sshd_config.d", None, 0o755),
        ("root", None, 0o700),
        ("root/.ssh", None, 0o700),
        ("etc/ssh/ssh_host_ed25519_key", seed.host_key_private, 0o600),
        ("etc/ssh/ssh_host_ed25519_key.pub", seed.host_key_public.encode() + b"\n", 0o644),
        ("root/.ssh/authorized_keys", seed.authorized_keys.encode(), 0o600),
        ("etc/hostname", seed.hostname.encode() + b"\n", 0o644),
        ("etc/ssh/sshd_config.d/avm.conf", seed.sshd_dropin.encode(), 0o644),
    ]
    return tar_bytes(
        Member(name, mode=mode, directory=True) if data is None else Member(name, data, mode)
        for name, data, mode in entries
    )
