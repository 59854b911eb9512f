"""The Pulumi program of the ``gcp`` backend: one golden VM on GCE, locked down.

``golden_vm(settings)`` declares, from typed settings (no I/O of its own):

- a dedicated service account with **no** role bindings and **no** OAuth scopes: the VM gets an
  identity, not API access (add a role, a scope and an egress rule if you want Cloud Logging);
- a custom-mode VPC and subnet, an egress **deny-all** firewall rule at priority 65534 (above
  GCE's implied allow-all at 65535) and one allow rule per configured destination at priority
  1000; ingress only SSH from Google's IAP range, to this VM's service account only;
- the image from a GCS object (``raw_disk``: a ``disk.raw`` in a gzipped tar), UEFI-compatible;
- the instance: nested virtualisation, a CPU platform that has it, Shielded VM (secure boot,
  vTPM, integrity monitoring), no external IP (no access config), OS Login on.

``program()`` is what Pulumi runs (``Pulumi.yaml`` and the Automation API): it reads the
settings from the stack's ``avm:*`` config keys. Import this module only where pulumi is wanted.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any, Literal

import pulumi
import pulumi_gcp as gcp
from pydantic import BaseModel, ConfigDict, Field, field_validator

IAP_RANGE = "35.235.240.0/20"  # Google's source range for IAP TCP forwarding
DENY_ALL_PRIORITY = 65534
ALLOW_PRIORITY = 1000
NAME_PATTERN = r"^[a-z]([-a-z0-9]{0,50}[a-z0-9])?$"


class EgressRule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    cidr: ipaddress.IPv4Network
    protocol: Literal["tcp", "udp"] = "tcp"
    ports: list[int] = Field(min_length=1)

    @field_validator("cidr")
    @classmethod
    def _not_everything(cls, v: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
        # an allow rule for 0.0.0.0/0 would silently void the deny-all default
        if v.prefixlen == 0:
            raise ValueError("0.0.0.0/0 would allow all egress; list the destinations instead")
        return v


class GcpSettings(BaseModel):
    """The program's input; the ``avm:<camelCase>`` config keys map onto these fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)  # GCE resource names derive from it
    image_bucket: str = Field(min_length=3)
    image_object: str = Field(min_length=1)
    zone: str = "us-central1-a"
    machine_type: str = "n2-standard-4"  # N2 (Intel) supports nested virtualisation
    min_cpu_platform: str = "Intel Cascade Lake"  # Haswell or newer is required for nested virt
    disk_gb: int = Field(default=20, ge=10, le=2048)
    subnet_cidr: ipaddress.IPv4Network = ipaddress.IPv4Network("10.64.0.0/24")
    egress_allow: list[EgressRule] = Field(default_factory=list)
    seed_b64: str = ""  # the per-VM SSH seed tar, for the guest to read from metadata

    @property
    def region(self) -> str:
        return self.zone.rsplit("-", 1)[0]

    @classmethod
    def from_config(cls, config: Any) -> GcpSettings:
        """From a ``pulumi.Config('avm')``. Raises ``pydantic.ValidationError`` on bad values."""
        keys = {
            "name": "name",
            "image_bucket": "imageBucket",
            "image_object": "imageObject",
            "zone": "zone",
            "machine_type": "machineType",
            "min_cpu_platform": "minCpuPlatform",
            "disk_gb": "diskGb",
            "subnet_cidr": "subnetCidr",
            "seed_b64": "seed",
        }
        values: dict[str, Any] = {f: config.get(k) for f, k in keys.items() if config.get(k) is not None}
        egress = config.get_object("egressAllow")
        if egress is not None:
            values["egress_allow"] = egress
        return cls.model_validate(values)


def golden_vm(s: GcpSettings) -> dict[str, Any]:
    """Declare every resource of one golden VM; returns them by role (for exports and tests)."""
    label = {"managed-by": "avm", "avm-vm": s.name}
    # GCE names are at most 63 characters (service accounts 30): a short hash of the VM's name
    # keeps every derived name unique and short
    short = "avm-" + hashlib.sha256(s.name.encode()).hexdigest()[:12]
    sa = gcp.serviceaccount.Account(f"{s.name}-sa", account_id=short, display_name=f"avm VM {s.name}")
    net = gcp.compute.Network(
        f"{s.name}-net", name=f"{short}-net", auto_create_subnetworks=False, routing_mode="REGIONAL"
    )
    subnet = gcp.compute.Subnetwork(
        f"{s.name}-subnet",
        name=f"{short}-subnet",
        network=net.id,
        region=s.region,
        ip_cidr_range=str(s.subnet_cidr),
        private_ip_google_access=True,
    )
    deny = gcp.compute.Firewall(
        f"{s.name}-egress-deny-all",
        name=f"{short}-egress-deny-all",
        network=net.id,
        direction="EGRESS",
        priority=DENY_ALL_PRIORITY,
        denies=[gcp.compute.FirewallDenyArgs(protocol="all")],
        destination_ranges=["0.0.0.0/0"],
        log_config=gcp.compute.FirewallLogConfigArgs(metadata="INCLUDE_ALL_METADATA"),
    )
    allows = [
        gcp.compute.Firewall(
            f"{s.name}-egress-allow-{i}",
            name=f"{short}-egress-allow-{i}",
            network=net.id,
            direction="EGRESS",
            priority=ALLOW_PRIORITY,
            allows=[gcp.compute.FirewallAllowArgs(protocol=r.protocol, ports=[str(p) for p in r.ports])],
            destination_ranges=[str(r.cidr)],
        )
        for i, r in enumerate(s.egress_allow)
    ]
    ssh = gcp.compute.Firewall(
        f"{s.name}-ingress-iap-ssh",
        name=f"{short}-ingress-iap-ssh",
        network=net.id,
        direction="INGRESS",
        priority=ALLOW_PRIORITY,
        allows=[gcp.compute.FirewallAllowArgs(protocol="tcp", ports=["22"])],
        source_ranges=[IAP_RANGE],
        target_service_accounts=[sa.email],
    )
    image = gcp.compute.Image(
        f"{s.name}-image",
        name=f"{short}-image",
        raw_disk=gcp.compute.ImageRawDiskArgs(
            source=f"https://storage.googleapis.com/{s.image_bucket}/{s.image_object}"
        ),
        guest_os_features=[
            gcp.compute.ImageGuestOsFeatureArgs(type=t) for t in ("UEFI_COMPATIBLE", "VIRTIO_SCSI_MULTIQUEUE")
        ],
        labels=label,
    )
    instance = gcp.compute.Instance(
        f"{s.name}-vm",
        name=s.name,
        zone=s.zone,
        machine_type=s.machine_type,
        min_cpu_platform=s.min_cpu_platform,
        boot_disk=gcp.compute.InstanceBootDiskArgs(
            initialize_params=gcp.compute.InstanceBootDiskInitializeParamsArgs(
                image=image.self_link, size=s.disk_gb, type="pd-balanced"
            )
        ),
        # no access_configs: no external IP; SSH arrives through IAP
        network_interfaces=[gcp.compute.InstanceNetworkInterfaceArgs(subnetwork=subnet.id)],
        advanced_machine_features=gcp.compute.InstanceAdvancedMachineFeaturesArgs(
            enable_nested_virtualization=True
        ),
        shielded_instance_config=gcp.compute.InstanceShieldedInstanceConfigArgs(
            enable_secure_boot=True, enable_vtpm=True, enable_integrity_monitoring=True
        ),
        service_account=gcp.compute.InstanceServiceAccountArgs(email=sa.email, scopes=[]),
        metadata={
            "enable-oslogin": "TRUE",
            "block-project-ssh-keys": "TRUE",
            "serial-port-enable": "FALSE",
            **({"avm-seed": s.seed_b64} if s.seed_b64 else {}),
        },
        labels=label,
        allow_stopping_for_update=True,
    )
    return {
        "service_account": sa,
        "network": net,
        "subnet": subnet,
        "egress_deny": deny,
        "egress_allow": allows,
        "ssh_ingress": ssh,
        "image": image,
        "instance": instance,
    }


def program() -> None:
    """The Pulumi entry point: settings from ``avm:*`` config, then export what avm needs."""
    settings = GcpSettings.from_config(pulumi.Config("avm"))
    res = golden_vm(settings)
    instance = res["instance"]
    pulumi.export("instance_name", instance.name)
    pulumi.export("zone", instance.zone)
    pulumi.export("internal_ip", instance.network_interfaces[0].network_ip)
    pulumi.export("service_account", res["service_account"].email)
