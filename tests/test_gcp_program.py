"""The GCP Pulumi program, under ``pulumi.runtime.set_mocks``: every security property of the
declared resources (nested virt, CPU platform, Shielded VM, no public IP, OS Login, a service
account without roles or scopes, egress deny-all with an allowlist, the image from GCS).

What this does NOT prove: that GCP accepts these resources or that the VM boots. Mocks echo the
inputs back; no Pulumi CLI, provider plugin or GCP API is involved (none is reachable here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

# pulumi and pulumi-gcp come with the `gcp` extra, which `make test` installs: without them this
# module fails to import (an error, never a skip)
import pulumi
import pytest
from pydantic import ValidationError

from controlplane.vm import gcp_program
from controlplane.vm.gcp_program import GcpSettings

RESOURCES: list[tuple[str, str, dict[str, Any]]] = []


class Mocks(pulumi.runtime.Mocks):
    """Records every resource's type, name and (camelCase) inputs; returns the inputs as outputs."""

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        outs = dict(args.inputs)
        RESOURCES.append((args.typ, args.name, outs))
        if args.typ == "gcp:serviceaccount/account:Account":
            outs["email"] = f"{outs['accountId']}@proj.iam.gserviceaccount.com"
        if args.typ == "gcp:compute/image:Image":
            outs["selfLink"] = f"https://compute.example.test/images/{args.name}"
        return f"{args.name}_id", outs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], None]:
        return {}, None


pulumi.runtime.set_mocks(Mocks(), project="avm", stack="test", preview=False)


def pulumi_test(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``pulumi.runtime.test`` (untyped upstream): runs the test and waits for its Outputs."""
    return cast(Callable[[], Any], pulumi.runtime.test(fn))  # type: ignore[no-untyped-call]


SETTINGS = GcpSettings.model_validate(
    {
        "name": "avm-vm-g1-0123456789ab",
        "image_bucket": "avm-images",
        "image_object": "golden/disk.raw.tar.gz",
        "egress_allow": [
            {"cidr": "10.1.2.0/24", "ports": [443]},
            {"cidr": "192.0.2.7/32", "ports": [53], "protocol": "udp"},
        ],
    }
)
# nested virtualisation needs Haswell or newer on Intel (or any AMD Milan+ on N2D)
NESTED_OK = {"Intel Haswell", "Intel Broadwell", "Intel Skylake", "Intel Cascade Lake", "Intel Ice Lake"}


def declared(check: Any, settings: GcpSettings = SETTINGS) -> Any:
    """Declare the program, then run ``check(by_type)`` once every resource reached the mocks."""
    RESOURCES.clear()
    res = gcp_program.golden_vm(settings)
    every = [r for v in res.values() for r in (v if isinstance(v, list) else [v])]

    def run(_: object) -> None:
        by_type: dict[str, list[dict[str, Any]]] = {}
        for typ, _name, inputs in RESOURCES:
            by_type.setdefault(typ, []).append(inputs)
        check(by_type)

    return pulumi.Output.all(*[r.id for r in every]).apply(run)


def instance(by_type: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    [vm] = by_type["gcp:compute/instance:Instance"]
    return vm


@pulumi_test
def test_instance_has_nested_virt_on_a_cpu_platform_that_supports_it() -> Any:
    def check(by_type: dict[str, list[dict[str, Any]]]) -> None:
        vm = instance(by_type)
        assert vm["advancedMachineFeatures"]["enableNestedVirtualization"] is True
        assert vm["minCpuPlatform"] in NESTED_OK
        assert vm["machineType"].startswith(("n1-", "n2-", "c2-", "c3-", "n2d-"))

    return declared(check)


@pulumi_test
def test_instance_is_shielded_private_and_uses_os_login() -> Any:
    def check(by_type: dict[str, list[dict[str, Any]]]) -> None:
        vm = instance(by_type)
        shielded = vm["shieldedInstanceConfig"]
        assert shielded == {"enableSecureBoot": True, "enableVtpm": True, "enableIntegrityMonitoring": True}
        [nic] = vm["networkInterfaces"]
        assert not nic.get("accessConfigs") and not nic.get("ipv6AccessConfigs")  # no public IP
        assert vm["metadata"]["enable-oslogin"] == "TRUE"
        assert vm["metadata"]["block-project-ssh-keys"] == "TRUE"

    return declared(check)


@pulumi_test
def test_service_account_is_dedicated_without_scopes_or_roles() -> Any:
    def check(by_type: dict[str, list[dict[str, Any]]]) -> None:
        [sa] = by_type["gcp:serviceaccount/account:Account"]
        vm_sa = instance(by_type)["serviceAccount"]
        assert vm_sa["email"] == f"{sa['accountId']}@proj.iam.gserviceaccount.com"
        assert vm_sa["scopes"] == []
        assert not [t for t in by_type if "iam" in t.lower().split(":")[-1].lower()], by_type.keys()

    return declared(check)


@pulumi_test
def test_egress_is_denied_by_default_and_only_the_allowlist_is_open() -> Any:
    def check(by_type: dict[str, list[dict[str, Any]]]) -> None:
        rules = by_type["gcp:compute/firewall:Firewall"]
        egress = [r for r in rules if r["direction"] == "EGRESS"]
        [deny] = [r for r in egress if r.get("denies")]
        assert deny["denies"] == [{"protocol": "all"}] and deny["destinationRanges"] == ["0.0.0.0/0"]
        allows = [r for r in egress if r.get("allows")]
        assert sorted((r["destinationRanges"][0], r["allows"][0]["ports"][0]) for r in allows) == [
            ("10.1.2.0/24", "443"),
            ("192.0.2.7/32", "53"),
        ]
        # lower number wins: every allow must be evaluated before the deny-all
        assert all(r["priority"] < deny["priority"] < 65535 for r in allows)
        [ingress] = [r for r in rules if r["direction"] == "INGRESS"]
        assert ingress["sourceRanges"] == ["35.235.240.0/20"]
        assert ingress["allows"] == [{"protocol": "tcp", "ports": ["22"]}]
        [net] = by_type["gcp:compute/network:Network"]
        assert net["autoCreateSubnetworks"] is False

    return declared(check)


@pulumi_test
def test_image_comes_from_the_gcs_object_and_boots_the_instance() -> Any:
    def check(by_type: dict[str, list[dict[str, Any]]]) -> None:
        [image] = by_type["gcp:compute/image:Image"]
        assert (
            image["rawDisk"]["source"] == "https://storage.googleapis.com/avm-images/golden/disk.raw.tar.gz"
        )
        assert {"type": "UEFI_COMPATIBLE"} in image["guestOsFeatures"]  # secure boot needs UEFI
        disk = instance(by_type)["bootDisk"]["initializeParams"]
        assert disk["image"].endswith(f"/images/{SETTINGS.name}-image")

    return declared(check)


@pulumi_test
def test_every_gce_name_fits_even_for_the_longest_vm_name() -> Any:
    def check(by_type: dict[str, list[dict[str, Any]]]) -> None:
        names = [r["name"] for rs in by_type.values() for r in rs if "name" in r]
        assert len(names) >= 7 and all(len(n) <= 63 for n in names), names
        [sa] = by_type["gcp:serviceaccount/account:Account"]
        assert 6 <= len(sa["accountId"]) <= 30

    return declared(check, SETTINGS.model_copy(update={"name": "avm-vm-" + "x" * 32 + "-0123456789ab"}))


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"egress_allow": [{"cidr": "0.0.0.0/0", "ports": [443]}]}, "egress_allow"),
        ({"egress_allow": [{"cidr": "10.0.0.0/8", "ports": []}]}, "egress_allow"),
        ({"name": "Bad_Name"}, "name"),
        ({"image_bucket": ""}, "image_bucket"),
    ],
)
def test_invalid_settings_are_refused(override: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        GcpSettings.model_validate({**SETTINGS.model_dump(mode="json"), **override})
    assert err.value.errors()[0]["loc"][0] == field


def test_settings_from_pulumi_config() -> None:
    from pulumi.runtime import config

    config.set_all_config(
        {
            "avm:name": "avm-vm-c1-0123456789ab",
            "avm:imageBucket": "b-1",
            "avm:imageObject": "disk.raw.tar.gz",
            "avm:zone": "europe-west4-b",
            "avm:egressAllow": '[{"cidr": "10.9.0.0/16", "ports": [443]}]',
        }
    )
    s = GcpSettings.from_config(pulumi.Config("avm"))
    assert (s.name, s.zone, s.region) == ("avm-vm-c1-0123456789ab", "europe-west4-b", "europe-west4")
    assert [str(r.cidr) for r in s.egress_allow] == ["10.9.0.0/16"]
