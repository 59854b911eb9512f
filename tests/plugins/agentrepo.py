"""An agent git repo made from examples/hello-agent, with several commits, and release keys.

Commits: ``v1`` (hello), ``v2`` (greeting changed), ``broken`` (exits at start: health fails),
``unsigned`` (never signed), ``rogue`` (signed by a key the home does not trust).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from controlplane.governance import secrets
from controlplane.home import Home
from controlplane.release import trust as signing

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello-agent"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "PATH": "/usr/bin:/bin",
}
PASSWORD = b"test-password"  # protects a key generated for this test run only
SECRET_REF = "secret://local/web-api-token"


@dataclasses.dataclass(frozen=True)
class AgentRepo:
    path: Path
    commits: dict[str, str]
    secret_value: bytes


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, env=GIT_ENV, check=True
    )
    return out.stdout.strip()


def _commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def copy_example(dest: Path) -> Path:
    """The example agent's files, without the bytecode a test that imported them left behind
    (it would be committed and signed as part of the release)."""
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def make_agent_repo(root: Path, home: Home) -> AgentRepo:
    repo = copy_example(root / "hello-agent")
    git(repo, "init", "-q", "-b", "main")
    commits = {"v1": _commit(repo, "hello-agent v1")}
    agent = repo / "agent.py"
    agent.write_text(agent.read_text().replace('GREETING = "hello"', 'GREETING = "hello v2"'))
    commits["v2"] = _commit(repo, "hello-agent v2")
    text = agent.read_text()
    agent.write_text(
        text.replace("def main() -> None:\n", "def main() -> None:\n    raise SystemExit('broken')\n")
    )
    commits["broken"] = _commit(repo, "broken: exits at start")
    agent.write_text(text.replace('GREETING = "hello v2"', 'GREETING = "hello v3"'))
    commits["unsigned"] = _commit(repo, "v3, never signed")
    agent.write_text(text.replace('GREETING = "hello v2"', 'GREETING = "hello rogue"'))
    commits["rogue"] = _commit(repo, "signed by an untrusted key")
    git(repo, "checkout", "-q", commits["v2"])

    _, key, pub = signing.release_init(root / "release-key", PASSWORD)
    signing.trust_release_key(home, pub, "release")
    for name in ("v1", "v2", "broken"):
        signing.sign_release(home, repo, commits[name], key, PASSWORD)
    _, rogue_key, _ = signing.release_init(root / "rogue-key", PASSWORD)
    signing.sign_release(home, repo, commits["rogue"], rogue_key, PASSWORD)
    value = b"tok-" + os.urandom(16).hex().encode()
    secrets.put(home, SECRET_REF, value)
    return AgentRepo(path=repo, commits=commits, secret_value=value)


@pytest.fixture(scope="module")
def agent_repo(tmp_path_factory: pytest.TempPathFactory, golden_home: Home) -> AgentRepo:
    return make_agent_repo(tmp_path_factory.mktemp("agent"), golden_home)
