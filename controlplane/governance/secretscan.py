"""Does a plain env value look like a secret? Known token patterns, then a high-entropy check. Pure.

Manifests (and job specs, through the tier gate) carry secrets only as ``secret://STORE/NAME``
references; a value that looks like a credential is refused. Two rules, each explained in the
verdict, and neither ever echoes the value:

1. **Known token patterns**: private key blocks, JWTs, and the documented prefixes of AWS, GitHub,
   GitLab, Slack, Stripe, Google, OpenAI and Anthropic keys, and bearer/basic credentials.
2. **High entropy**: a single token (no spaces) of at least ``MIN_LEN`` characters drawn from a
   key alphabet whose Shannon entropy is at least ``MIN_BITS_MIXED`` bits per character when it
   mixes lower case, upper case and digits, or ``MIN_BITS`` with two classes; or a hex run of 32+
   digits (128 bits or more: a key, not a port or a version). Absolute paths are never secrets
   by this rule (release directories carry commit hashes).
"""

from __future__ import annotations

import math
import re
from collections import Counter

MIN_LEN = 20
MIN_BITS = 4.3  # a token mixing two character classes (model names, hostnames stay below)
MIN_BITS_MIXED = 3.9  # a token mixing lower, upper and digits (random keys reach 4.2-4.6 at 24 chars)
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("private key block", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("JSON web token", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.")),
    ("AWS access key id", re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")),
    ("GitHub token", re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})")),
    ("GitLab token", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}")),
    ("Slack token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    ("Stripe key", re.compile(r"\b[sr]k_(live|test)_[A-Za-z0-9]{16,}")),
    ("Google API key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b")),
    ("OpenAI/Anthropic key", re.compile(r"\bsk-(ant-|proj-)?[A-Za-z0-9_-]{20,}")),
    ("credential in a URL", re.compile(r"://[^/\s:@]+:[^/\s@]+@")),
    ("bearer/basic credential", re.compile(r"^(Bearer|Basic|token)\s+\S{12,}$", re.IGNORECASE)),
)
# literals each pattern's match contains: ``find`` skips a pattern none of whose hints is in a
# text (re costs per position; ``in`` does not), which keeps a 64 KiB body in milliseconds
_HINTS: dict[str, tuple[str, ...]] = {
    "private key block": ("-----BEGIN",),
    "JSON web token": ("eyJ",),
    "AWS access key id": ("AKIA", "ASIA"),
    "GitHub token": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    "GitLab token": ("glpat-",),
    "Slack token": ("xox",),
    "Stripe key": ("k_live_", "k_test_"),
    "Google API key": ("AIza",),
    "OpenAI/Anthropic key": ("sk-",),
    "credential in a URL": ("://",),
}
_TOKEN = re.compile(r"^[A-Za-z0-9+/=_.~-]+$")
_HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")
_KEYLIKE = re.compile(rf"[A-Za-z0-9+/=_~-]{{{MIN_LEN},}}")  # a token of the key alphabet in a text


def entropy_bits(value: str) -> float:
    """Shannon entropy of the value's characters, in bits per character."""
    if not value:
        return 0.0
    counts = Counter(value)
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _classes(value: str) -> int:
    return sum(
        (
            any(c.islower() for c in value),
            any(c.isupper() for c in value),
            any(c.isdigit() for c in value),
        )
    )


def verdict(value: str) -> str | None:
    """Why ``value`` looks like a secret, or None. The reason never contains the value."""
    for label, pattern in _PATTERNS:
        if pattern.search(value):
            return f"matches the {label} pattern"
    if value.startswith("/"):
        return None
    if _HEX_RUN.search(value):
        return "contains a run of 32+ hex digits (128+ bits: a key or token, not configuration)"
    if len(value) < MIN_LEN or not _TOKEN.fullmatch(value):
        return None
    bits, classes = entropy_bits(value), _classes(value)
    threshold = MIN_BITS_MIXED if classes == 3 else MIN_BITS
    if classes >= 2 and bits >= threshold:
        return (
            f"is a {len(value)}-character token with {bits:.2f} bits/char of entropy "
            f"(>= {threshold} over >= {MIN_LEN} chars looks random, like a credential)"
        )
    return None


def find(text: str) -> list[tuple[str, int]]:
    """(label, offset) of each secret in a free text (a request body), in offset order: the known
    token patterns, then 32+ hex runs and high-entropy tokens (``verdict`` on each run of the key
    alphabet) outside those. Like ``verdict``, never the matched value."""
    found = [
        (label, m.span())
        for label, pattern in _PATTERNS
        if not pattern.pattern.startswith("^")  # the whole-value rules fit a value, not a body
        and any(hint in text for hint in _HINTS[label])
        for m in pattern.finditer(text)
    ]
    for label, regex in (("hex run", _HEX_RUN), ("high-entropy token", _KEYLIKE)):
        for m in regex.finditer(text):
            inside = any(a < m.end() and m.start() < b for _, (a, b) in found)
            if not inside and (label == "hex run" or verdict(m.group()) is not None):
                found.append((label, m.span()))
    return sorted(((label, span[0]) for label, span in found), key=lambda x: (x[1], x[0]))


def scan_env(env: dict[str, str]) -> dict[str, str]:
    """env key -> reason, for every value that looks like a secret."""
    return {key: reason for key, value in sorted(env.items()) if (reason := verdict(value)) is not None}
