"""``avm egress options``: a Tier-1 target's private upstream CA and pins, validated before written.

The options' effect on a real gateway is proven by the nspawn gateway tests, whose test upstream
is set up through this command (tests/plugins/tier1gw.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.boundary.ca import EgressCA
from controlplane.home import Home
from controlplane.promote import gwoptions
from controlplane.transport import inventory
from tests.plugins.vms import run_avm, run_avm_json

TARGET = "opts1"


@pytest.fixture
def home(tmp_path: Path) -> Home:
    h = Home(tmp_path / "home")
    h.ensure()
    inventory.save(h, inventory.Target(name=TARGET, url="local://"))
    return h


def test_pins_and_a_ca_are_written_and_read_back_as_the_renderer_takes_them(
    home: Home, tmp_path: Path
) -> None:
    ca = EgressCA.ensure(tmp_path / "upstream-ca", common_name="test upstream CA")
    rc, doc = run_avm_json(
        home,
        "egress", "options", "--target", TARGET,
        "--upstream-ca", str(ca.cert_path),
        "--pin", "api.example.test:443=10.9.0.7:8443",
        "--pin", "*.svc.example.test:8443=10.9.0.8:9443",
    )  # fmt: skip
    assert rc == 0, doc
    assert doc["upstreams"] == {
        "*.svc.example.test:8443": ["10.9.0.8", 9443],
        "api.example.test:443": ["10.9.0.7", 8443],
    }
    pem, pins = gwoptions.read(home, TARGET)
    assert pem == ca.cert_path.read_bytes()  # a copy in the home: the source may go away
    assert Path(doc["upstream_ca"]).parent == gwoptions.path(home, TARGET).parent
    assert pins == {"api.example.test:443": ("10.9.0.7", 8443), "*.svc.example.test:8443": ("10.9.0.8", 9443)}

    rc, doc = run_avm_json(home, "egress", "options", "--target", TARGET, "--unpin", "api.example.test:443")
    assert (rc, list(doc["upstreams"])) == (0, ["*.svc.example.test:8443"])
    rc, doc = run_avm_json(home, "egress", "options", "--target", TARGET, "--no-upstream-ca")
    assert (rc, doc["upstream_ca"]) == (0, None)
    assert gwoptions.read(home, TARGET)[0] is None


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--pin", "api.example.test:443"], "gateway-options-invalid"),
        (["--pin", "bad_name:443=10.0.0.1:1"], "egress-name-invalid"),
        (["--pin", "*:443=10.0.0.1:1"], "egress-name-wildcard"),
        (["--pin", "api.example.test:443=api.example.test:1"], "gateway-options-invalid"),
        (["--pin", "api.example.test:443=10.0.0.1:70000"], "gateway-options-invalid"),
        (["--pin", "api.example.test=10.0.0.1:1"], "gateway-options-invalid"),
        (["--unpin", "never.example.test:443"], "gateway-options-invalid"),
        (["--upstream-ca", "/etc/hostname"], "gateway-options-invalid"),
        (["--upstream-ca", "/nonexistent/ca.pem"], "gateway-options-invalid"),
        (["--upstream-ca", "/etc/hostname", "--no-upstream-ca"], "gateway-options-invalid"),
    ],
)
def test_a_bad_change_is_refused_and_the_file_is_unchanged(home: Home, args: list[str], code: str) -> None:
    assert (
        run_avm(
            home, "egress", "options", "--target", TARGET, "--pin", "a.example.test:443=10.0.0.2:2"
        ).returncode
        == 0
    )
    before = gwoptions.path(home, TARGET).read_bytes()
    rc, doc = run_avm_json(home, "egress", "options", "--target", TARGET, *args)
    assert (rc, doc["error"]["code"]) == (64, code), doc
    assert gwoptions.path(home, TARGET).read_bytes() == before


def test_an_unknown_target_is_refused_and_nothing_is_written(home: Home) -> None:
    rc, doc = run_avm_json(
        home, "egress", "options", "--target", "nosuch", "--pin", "a.example.test:443=10.0.0.2:2"
    )
    assert (rc, doc["error"]["code"]) == (64, "unknown-target")
    assert not gwoptions.path(home, "nosuch").exists()


def test_showing_without_a_file_says_system_store_and_no_pins(home: Home) -> None:
    out = run_avm(home, "egress", "options", "--target", TARGET)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "upstream CA: the system trust store",
        "pins: none (names are resolved by the gateway)",
    ]
    assert not gwoptions.path(home, TARGET).exists()


def test_an_unusable_file_is_reported_not_overwritten(home: Home) -> None:
    p = gwoptions.path(home, TARGET)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("{broken")
    rc, doc = run_avm_json(
        home, "egress", "options", "--target", TARGET, "--pin", "a.example.test:443=10.0.0.2:2"
    )
    assert (rc, doc["error"]["code"]) == (64, "gateway-options-invalid")
    assert p.read_text() == "{broken"
    assert doc["error"]["hint"].startswith("fix or remove the file")
