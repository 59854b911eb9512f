"""The customize stage of the golden image, run by mmdebstrap as its ``--customize-hook``.

mmdebstrap execs the hook file directly (no shell) with the chroot directory as its only
argument; the hook runs ``main`` here, which reads the validated recipe from the JSON file named
by ``$AVM_IMAGE_RECIPE`` and writes what it did to ``$AVM_IMAGE_HOOK_REPORT``. It writes files
with Python and runs the image's own programs (passwd, useradd, systemctl, depmod) through
``chroot`` with argv lists only, so no recipe value ever passes through a shell.

What it does, in order: identity files (hostname, hosts, fstab, empty machine id, no host
resolver), the DHCP network, the sshd hardening drop-in, the first-boot host-key unit, locked
accounts, enabled and masked units, removal of the SSH host keys openssh-server generated at
install time, and the kernel-module trim (keep list plus its modules.dep closure, then depmod).
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from controlplane._internal import tools as imagetools
from controlplane.errors import AvmError, OperationalError
from controlplane.image.recipe import Recipe

RECIPE_ENV = "AVM_IMAGE_RECIPE"
REPORT_ENV = "AVM_IMAGE_HOOK_REPORT"

SSHD_DROPIN = "etc/ssh/sshd_config.d/00-avm-hardening.conf"
HOSTKEY_UNIT = "avm-ssh-hostkeys.service"
_HOSTKEY_UNIT_TEXT = """\
[Unit]
Description=Generate SSH host keys when none was injected (avm first boot)
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
# early, like sshd itself: default dependencies would hold sshd back until basic.target; the root
# file system is read-write from the start (`rw` on the kernel command line, or the container
# manager's overlay), so it does not wait for systemd-remount-fs either (about 1 s of a TCG boot)
DefaultDependencies=no
Before=ssh.service shutdown.target
Conflicts=shutdown.target

[Service]
Type=oneshot
# ed25519 only: the one key type the per-VM seed uses, and fast even under TCG (RSA is not)
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key

[Install]
WantedBy=multi-user.target
"""


class Customizer:
    """Applies a recipe to a chroot directory and keeps a report of every change."""

    def __init__(self, rootfs: Path, recipe: Recipe) -> None:
        self.rootfs = rootfs
        self.recipe = recipe
        self.report: dict[str, Any] = {"files": [], "commands": []}

    def write(self, rel: str, text: str, mode: int = 0o644) -> None:
        path = self.rootfs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():  # never write through a link the packages left there
            path.unlink()
        path.write_text(text)
        path.chmod(mode)
        self.report["files"].append(rel)

    def chroot(self, *argv: str) -> None:
        res = imagetools.chroot(self.rootfs, argv)
        self.report["commands"].append(
            {"argv": res.argv, "rc": res.rc, "duration_s": round(res.duration_s, 3)}
        )

    def run(self) -> dict[str, Any]:
        self.identity()
        self.network()
        self.ssh()
        self.accounts()
        self.units()
        self.report["removed_ssh_host_keys"] = self.remove_host_keys()
        self.report["kernel_modules"] = self.trim_modules()
        return self.report

    def identity(self) -> None:
        r = self.recipe
        self.write("etc/hostname", f"{r.hostname}\n")
        self.write(
            "etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{r.hostname}\n::1\tlocalhost ip6-localhost\n"
        )
        # No root entry: the kernel command line mounts it (root=, rw). An entry would have to name
        # a device, and none fits every backend (vda under QEMU, sda/nvme on GCE, nothing under
        # nspawn, where systemd-remount-fs fails on a LABEL= it cannot resolve).
        self.write("etc/fstab", "# avm: the root file system comes from the kernel command line\n")
        # mmdebstrap copies the build host's resolver and hostname in: neither belongs in the image
        self.write("etc/resolv.conf", "# avm: no resolver is configured in the image\n")
        if r.first_boot.empty_machine_id:
            self.write("etc/machine-id", "", 0o444)
            (self.rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)

    def network(self) -> None:
        names = " ".join(self.recipe.first_boot.dhcp_interfaces)
        if names:
            self.write(
                "etc/systemd/network/10-avm-dhcp.network", f"[Match]\nName={names}\n\n[Network]\nDHCP=ipv4\n"
            )

    def ssh(self) -> None:
        h = self.recipe.hardening
        self.write(
            SSHD_DROPIN,
            "# written by avm image build: key-only login\n"
            f"PermitRootLogin {h.ssh_permit_root_login}\n"
            f"PasswordAuthentication {'yes' if h.ssh_password_authentication else 'no'}\n"
            "KbdInteractiveAuthentication no\n"
            "PermitEmptyPasswords no\n",
        )
        if self.recipe.first_boot.generate_missing_ssh_host_keys:
            self.write(f"etc/systemd/system/{HOSTKEY_UNIT}", _HOSTKEY_UNIT_TEXT)
        self.early_sshd()
        self.quiet_sshd_session()

    def quiet_sshd_session(self) -> None:
        """Drop pam_motd and pam_mail from sshd's PAM session: nobody reads a message of the day
        on an automation login, and running update-motd.d costs about 2 s of every TCG login."""
        pam = self.rootfs / "etc/pam.d/sshd"
        kept = [
            line
            for line in pam.read_text().splitlines()
            if not line.lstrip().startswith("session")
            or ("pam_motd.so" not in line and "pam_mail.so" not in line)
        ]
        pam.write_text("\n".join(kept) + "\n")

    def early_sshd(self) -> None:
        """Start sshd without waiting for network.target.

        sshd listens on wildcard addresses, so it needs no configured network; the packaged
        unit's ``After=network.target`` made it wait for systemd-networkd's DHCP (about 6 s of
        a TCG boot). The override is the packaged unit with only that ordering removed, and the
        redundant config pre-check dropped (sshd checks its config when it starts anyway).
        """
        packaged = (self.rootfs / "lib/systemd/system/ssh.service").read_text()
        lines = []
        for line in packaged.splitlines():
            if line.startswith("After="):
                kept = [u for u in line.removeprefix("After=").split() if u != "network.target"]
                line = "After=" + " ".join(kept) if kept else ""
            if line.startswith("ExecStartPre=/usr/sbin/sshd -t"):
                continue
            lines.append(line)
        # sshd needs only the root filesystem (read-write from the start) and its keys, so it
        # starts as early as the journal: not after sysinit/basic.target (about 4 s of a TCG boot)
        # nor systemd-remount-fs (about 1 s more)
        unit = "\n".join(lines).replace(
            "[Unit]\n",
            "[Unit]\nDefaultDependencies=no\nConflicts=shutdown.target\nBefore=shutdown.target\n"
            "After=systemd-journald.socket avm-ssh-hostkeys.service\n",
            1,
        )
        text = "# written by avm image build: the packaged ssh.service, started early\n"
        self.write("etc/systemd/system/ssh.service", text + unit + "\n")

    def accounts(self) -> None:
        for user in self.recipe.users:
            if user.name != "root":
                uid = ["--uid", str(user.uid)] if user.uid is not None else []
                self.chroot(
                    "useradd", "--create-home", "--user-group", "--shell", user.shell, *uid, user.name
                )
            self.chroot("passwd", "--lock", user.name)

    def units(self) -> None:
        enable = list(self.recipe.enable_units)
        if self.recipe.first_boot.generate_missing_ssh_host_keys:
            enable.append(HOSTKEY_UNIT)
        if enable:
            self.chroot("systemctl", "enable", *enable)
        if self.recipe.mask_units:
            self.chroot("systemctl", "mask", *self.recipe.mask_units)

    def remove_host_keys(self) -> list[str]:
        removed = []
        for key in sorted((self.rootfs / "etc/ssh").glob("ssh_host_*")):
            key.unlink()
            removed.append(str(key.relative_to(self.rootfs)))
        return removed

    def trim_modules(self) -> dict[str, Any]:
        keep_globs = self.recipe.trim.kernel_modules_keep
        if keep_globs is None:
            return {"trimmed": False}
        out: dict[str, Any] = {"trimmed": True, "versions": {}}
        for moddir in sorted(_module_dirs(self.rootfs)):
            stats = trim_module_tree(moddir, keep_globs)
            self.chroot("depmod", moddir.name)
            out["versions"][moddir.name] = stats
        return out


def _module_dirs(rootfs: Path) -> list[Path]:
    # bookworm is merged-/usr: /lib is a link to usr/lib, so look only at the real directory
    base = rootfs / "usr/lib/modules"
    if not base.is_dir():
        base = rootfs / "lib/modules"
    return [p for p in base.iterdir() if (p / "kernel").is_dir()] if base.is_dir() else []


def module_closure(deps: dict[str, list[str]], keep_globs: tuple[str, ...]) -> set[str]:
    """The modules (paths as in modules.dep, ``kernel/...``) matching a keep glob, plus every
    module they depend on. Pure."""
    wanted = {m for m in deps if any(fnmatch.fnmatchcase(m.removeprefix("kernel/"), g) for g in keep_globs)}
    todo = list(wanted)
    while todo:
        for dep in deps.get(todo.pop(), []):
            if dep not in wanted:
                wanted.add(dep)
                todo.append(dep)
    return wanted


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if sep:
            deps[name.strip()] = rest.split()
    return deps


def trim_module_tree(moddir: Path, keep_globs: tuple[str, ...]) -> dict[str, int]:
    """Remove every module under ``moddir/kernel`` outside the keep closure; return counts.

    Raises ``OperationalError('modules-dep-missing')`` when the kernel's modules.dep is absent
    (trimming blind could drop a dependency of a kept module).
    """
    dep_file = moddir / "modules.dep"
    if not dep_file.is_file():
        raise OperationalError(
            "modules-dep-missing",
            f"{dep_file} is missing: cannot tell which modules the kept ones depend on",
            hint="the kernel package did not run depmod; rebuild with --force",
        )
    keep = module_closure(parse_modules_dep(dep_file.read_text()), keep_globs)
    kept = removed = removed_bytes = 0
    for dirpath, _dirs, files in os.walk(moddir / "kernel", topdown=False):
        for name in files:
            path = Path(dirpath) / name
            if str(path.relative_to(moddir)) in keep:
                kept += 1
                continue
            removed_bytes += path.lstat().st_size
            path.unlink()
            removed += 1
        if not os.listdir(dirpath):
            os.rmdir(dirpath)
    return {"kept": kept, "removed": removed, "removed_bytes": removed_bytes}


def main(argv: list[str]) -> int:
    """Hook entry point: ``argv[0]`` is the chroot directory. Exit 0 on success, 1 on failure
    (the report then carries the error, and mmdebstrap fails the build)."""
    report_path = Path(os.environ[REPORT_ENV])
    report: dict[str, Any]
    try:
        recipe = Recipe.model_validate_json(Path(os.environ[RECIPE_ENV]).read_bytes())
        report = Customizer(Path(argv[0]), recipe).run()
        rc = 0
    except AvmError as exc:
        report, rc = {"error": exc.to_dict()}, 1
    except Exception as exc:
        report = {
            "error": {"code": "customize-crashed", "message": repr(exc), "trace": traceback.format_exc()}
        }
        rc = 1
    report_path.write_text(json.dumps(report, indent=2, sort_keys=True))
    if rc:
        print(f"avm customize hook failed: {report['error']['message']}", file=sys.stderr)
    return rc
