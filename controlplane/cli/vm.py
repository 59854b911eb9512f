"""avm vm: golden VM lifecycle on qemu, nspawn, libvirt and gcp."""

from __future__ import annotations

import click

from controlplane.cli.app import AppContext, pass_app
from controlplane.vm.names import BACKENDS, DEFAULT_BACKEND


@click.group("vm")
def vm() -> None:
    """Boot, inspect, reach and tear down golden VMs (qemu, nspawn, libvirt, gcp).

    \b
    Every VM gets its own SSH host key and login key, injected before first boot and pinned
    in the inventory before the first connection. `up` and `down` write receipts; `down`
    verifies that no process, cgroup, mount or state of the VM is left.
    """


@vm.command("up")
@click.argument("name")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default=DEFAULT_BACKEND, show_default=True)
@click.option("--vcpus", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option(
    "--memory", "memory_mib", type=click.IntRange(256), default=1024, show_default=True, help="MiB."
)
@click.option(
    "--ssh-port", type=click.IntRange(1024, 65535), default=None, help="Host port [default: a free one]."
)
@click.option("--timeout", "timeout_s", type=float, default=300.0, show_default=True, help="Seconds to SSH.")
@click.option("--no-wait", is_flag=True, help="Return once started, without waiting for SSH.")
@click.option(
    "--cold", is_flag=True, help="qemu: boot cold; do not restore or make a booted snapshot (warm start)."
)
@click.option(
    "--image",
    "image_digest",
    default=None,
    metavar="DIGEST",
    help="Boot this built image [default: the image of images/golden.yaml, built by `avm image build`].",
)
@pass_app
def up(
    app: AppContext,
    name: str,
    backend: str,
    vcpus: int,
    memory_mib: int,
    ssh_port: int | None,
    timeout_s: float,
    no_wait: bool,
    cold: bool,
    image_digest: str | None,
) -> None:
    """Boot golden VM NAME from the built image and wait for an SSH login.

    \b
    qemu starts warm when it can: restored from a booted snapshot of the same image, QEMU
    version and machine arguments, with the VM's own identity (host key, login key,
    machine-id, fresh entropy, clock) delivered before sshd starts. Without such a snapshot it
    boots cold and makes one. The vm-up receipt records which path was taken.
    """
    from controlplane.ids import parse_vm_name
    from controlplane.image.current import recipe_image
    from controlplane.image.golden import load_image
    from controlplane.vm import lifecycle
    from controlplane.vm.base import VmSpec, get_backend

    spec = VmSpec(
        name=parse_vm_name(name),
        backend=backend,
        vcpus=vcpus,
        memory_mib=memory_mib,
        ssh_port=ssh_port,
        wait=not no_wait,
        timeout_s=timeout_s,
        cold=cold,
    )
    home = app.home
    # the backend's own checks (tools, daemons, credentials) come first: they say what to fix
    get_backend(spec.backend).preflight(spec)
    image = load_image(home, image_digest) if image_digest else recipe_image(home)
    record = lifecycle.up(home, spec, image, progress=app.say)
    app.emit(
        record.model_dump(mode="json"),
        f"{record.name} is up ({record.backend}, {record.accelerator}); "
        f"ssh: avm vm ssh {record.name} -- CMD   (port {record.ssh_port}, key {record.host_key_fingerprint})",
    )


@vm.command("down")
@click.argument("name")
@click.option(
    "--grace", "grace_s", type=float, default=10.0, show_default=True, help="Seconds for a clean stop."
)
@pass_app
def down(app: AppContext, name: str, grace_s: float) -> None:
    """Stop VM NAME, remove its overlay and state, and verify nothing is left."""
    from controlplane.ids import parse_vm_name
    from controlplane.vm import lifecycle

    checks = lifecycle.down(app.home, parse_vm_name(name), grace_s=grace_s, progress=app.say)
    app.emit(
        {"name": name, "checks": [c._asdict() for c in checks]},
        "\n".join(f"  {'ok ' if c.ok else 'FAIL'} {c.name} {c.detail}".rstrip() for c in checks)
        + f"\n{name} is down; nothing of it is left",
    )


@vm.command("status")
@click.argument("name", required=False)
@pass_app
def status(app: AppContext, name: str | None) -> None:
    """Show VMs as the host sees them now (running, or dead after a crash or kill -9)."""
    from controlplane.ids import parse_vm_name
    from controlplane.vm import lifecycle

    states = lifecycle.status(app.home, parse_vm_name(name) if name else None)

    def human() -> None:
        if not states:
            click.echo("no VMs")
        for s in states:
            up_s = f"{s.uptime_s:.0f}s" if s.uptime_s is not None else "-"
            click.echo(
                f"{s.name:<16} {s.status.value:<8} {s.backend:<8} {s.accelerator or '-':<9} "
                f"pid {s.pid}  ssh {s.ssh_host}:{s.ssh_port}  up {up_s}  {s.detail}".rstrip()
            )

    app.emit({"vms": [s.model_dump(mode="json") for s in states]}, human)


@vm.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", type=float, default=120.0, show_default=True)
@pass_app
def ssh(app: AppContext, name: str, argv: tuple[str, ...], timeout: float) -> int:
    """Run a command in VM NAME: avm vm ssh NAME -- CMD ARGS...

    The command is an argv, quoted for the remote side by avm; the host key is the pinned one.
    Exits with the remote command's exit code.
    """
    from controlplane.ids import parse_vm_name
    from controlplane.vm import lifecycle

    result = lifecycle.ssh(app.home, parse_vm_name(name), list(argv), timeout=timeout)
    if app.json:
        app.emit({"argv": result.argv, "rc": result.rc, "stdout": result.stdout, "stderr": result.stderr}, "")
    else:
        click.echo(result.stdout, nl=False)
        click.echo(result.stderr, nl=False, err=True)
    return result.rc


commands = [vm]
