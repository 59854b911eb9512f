"""Names and addresses of a job network: pure functions of (job id, label, pool).

Every namespace, link and table a job network creates is named here, so ``egress.gc`` and
``egress.leftovers`` find them by the same rules even after the runner was killed with SIGKILL.
Interface names fit IFNAMSIZ (15): a label longer than 9 characters is replaced by a hash tag.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
from collections.abc import Iterator, Sequence

from controlplane.errors import UsageError
from controlplane.ids import parse_job_id

POOL = ipaddress.IPv4Network("10.231.0.0/16")
_LABEL_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")  # no "--": it separates label and job id


def digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def parse_label(label: str) -> str:
    """Return ``label`` or raise ``UsageError('invalid-egress-label')``."""
    if not (isinstance(label, str) and len(label) <= 32 and _LABEL_RE.fullmatch(label)):
        raise UsageError(
            "invalid-egress-label",
            f"label {label!r} is invalid: expected 1-32 of a-z 0-9 and single '-'",
            hint="the label prefixes every namespace and link of a job so gc can find them",
            details={"expected": _LABEL_RE.pattern, "actual": label},
        )
    return label


@dataclasses.dataclass(frozen=True)
class Names:
    """Every name a job's network uses. Build with ``Names.of`` (validates)."""

    job_id: str
    label: str

    @classmethod
    def of(cls, job_id: str, label: str) -> Names:
        """Raises ``UsageError`` (``invalid-job-id``, ``invalid-egress-label``)."""
        return cls(parse_job_id(job_id), parse_label(label))

    @property
    def tag(self) -> str:
        """The label as it appears in interface names: tag + "--" + 4 hex <= 15 characters."""
        return self.label if len(self.label) <= 9 else "h" + digest(self.label)[:8]

    @property
    def netns(self) -> str:
        return f"{self.netns_prefix}{self.job_id}"

    @property
    def netns_prefix(self) -> str:
        return f"avm-{self.label}--"

    @property
    def guest_netns(self) -> str:
        return f"{self.netns}+guest"  # '+' is not in job ids, so no job's netns can collide

    @property
    def tap(self) -> str:
        return f"{self.tag}-tap"

    @property
    def uplink_dev(self) -> str:
        return f"{self.tag}-up"

    @property
    def table(self) -> str:
        return f"avm_{digest(self.label, self.job_id)[:12]}"

    @property
    def alias(self) -> str:
        return f"avm:{self.label}:{self.job_id}"

    @property
    def log_prefix(self) -> str:
        return f"avm-{self.tag} {self.table} deny: "

    def host_dev(self, block: int) -> str:
        return f"{self.tag}--{block:04x}"


def block(pool: ipaddress.IPv4Network, index: int) -> ipaddress.IPv4Network:
    """The ``index``-th /29 of ``pool``: .1 gateway, .2 guest (tap /30); .5 netns, .6 host (veth /30)."""
    return ipaddress.IPv4Network((int(pool.network_address) + index * 8, 29))


def candidate_blocks(
    names: Names, pool: ipaddress.IPv4Network, taken: Sequence[ipaddress.IPv4Network]
) -> Iterator[int]:
    """/29 indexes to try, starting at the job's hash, skipping any that overlap ``taken``."""
    count = pool.num_addresses // 8
    start = int(digest(names.label, names.job_id)[:8], 16) % count
    for i in range(count):
        index = (start + i) % count
        if not any(block(pool, index).overlaps(t) for t in taken):
            yield index
