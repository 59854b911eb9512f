"""Where avm puts things on a Tier-1 host: every path and unit name, in one place.

::

    /opt/agent/releases/<sha>/              a release, write-once and read-only
    /opt/agent/releases/.incoming/<sha>.tar a release tar on its way in
    /opt/agent/profiles/<p>/current         symlink to the profile's release
    /etc/agent/<p>.env, <p>.policy.json     the profile's environment and policy
    /etc/agent/credentials/<p>/<name>       systemd credentials (0600)
    /etc/systemd/system/agent-gateway@.service                  the unit template
    /etc/systemd/system/agent-gateway@<p>.service.d/avm.conf    the profile's drop-in

and the profile's unit ``agent-gateway@<p>.service`` running as user ``agent-<p>``. No other
module of the control plane spells these (tests/test_hostlayout.py checks); the stdlib programs
in ``hostscripts/`` run on the host without avm, so they spell the unit names themselves.
``relocated(prefix)`` is the same layout under a scratch directory (the facts gatherer's tests).
"""

from __future__ import annotations

import dataclasses

from controlplane.ids import PROFILE_USER_PREFIX

UNIT_TEMPLATE_NAME = "agent-gateway@.service"


@dataclasses.dataclass(frozen=True)
class HostLayout:
    root: str = "/opt/agent"
    etc: str = "/etc/agent"
    unit_dir: str = "/etc/systemd/system"

    def relocated(self, prefix: str) -> HostLayout:
        return HostLayout(prefix + self.root, prefix + self.etc, prefix + self.unit_dir)

    @property
    def releases(self) -> str:
        return f"{self.root}/releases"

    @property
    def profiles(self) -> str:
        return f"{self.root}/profiles"

    @property
    def incoming(self) -> str:
        return f"{self.releases}/.incoming"

    @property
    def unit_template(self) -> str:
        return f"{self.unit_dir}/{UNIT_TEMPLATE_NAME}"

    @property
    def credentials(self) -> str:
        return f"{self.etc}/credentials"

    def release_dir(self, sha: str) -> str:
        return f"{self.releases}/{sha}"

    def incoming_tar(self, sha: str) -> str:
        return f"{self.incoming}/{sha}.tar"

    def profile_dir(self, profile: str) -> str:
        return f"{self.profiles}/{profile}"

    def current_link(self, profile: str) -> str:
        return f"{self.profile_dir(profile)}/current"

    def env_file(self, profile: str) -> str:
        return f"{self.etc}/{profile}.env"

    def policy_file(self, profile: str) -> str:
        return f"{self.etc}/{profile}.policy.json"

    def credentials_dir(self, profile: str) -> str:
        return f"{self.credentials}/{profile}"

    def credential(self, profile: str, name: str) -> str:
        return f"{self.credentials_dir(profile)}/{name}"

    def dropin(self, profile: str) -> str:
        return f"{self.unit_dir}/{unit_name(profile)}.d/avm.conf"

    def unit_name(self, profile: str) -> str:
        return unit_name(profile)

    def user(self, profile: str) -> str:
        return user(profile)


def unit_name(profile: str) -> str:
    """The profile's systemd unit: an instance of the template."""
    return f"agent-gateway@{profile}.service"


def user(profile: str) -> str:
    """The system user a profile's unit runs as."""
    return PROFILE_USER_PREFIX + profile


LAYOUT = HostLayout()
