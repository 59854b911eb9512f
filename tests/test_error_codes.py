"""Error codes are stable per class: every raise site uses a code of ``errors.CODES`` with the
class it is registered for, the constructor refuses anything else, and docs/cli.md's table is
the registry."""

from __future__ import annotations

import ast
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane import errors
from controlplane.errors import AvmError, ExitCode, OperationalError, RefusedError, UsageError

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "controlplane"
CLASSES: dict[str, type[AvmError]] = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, AvmError) and cls.__module__ == errors.__name__
}


def _name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _code_arg(call: ast.Call, index: int, keyword: str = "code") -> ast.expr | None:
    if len(call.args) > index:
        return call.args[index]
    return next((k.value for k in call.keywords if k.arg == keyword), None)


# _internal.loading's parsers raise ``error(code)`` (UsageError unless ``error=`` says otherwise)
LOADERS = {"validate", "read_document", "parse_yaml"}
KEBAB = re.compile(r"[a-z0-9]+(-[a-z0-9]+)+")


def _kebab_strings(node: ast.AST) -> list[str]:
    return [
        n.value
        for n in ast.walk(node)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and KEBAB.fullmatch(n.value)
    ]


def _literals(node: ast.expr | None, local: dict[str, list[str]], funcs: dict[str, list[str]]) -> list[str]:
    """The codes an argument can be: a string literal, either side of ``a if c else b``, a name
    assigned such literals in the module (``code = "x" if t else "y"``), or the result of a module
    function (``_code_for(message)``: every kebab-case string in it and in the module-level
    tables it reads)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _literals(node.body, local, funcs) + _literals(node.orelse, local, funcs)
    if isinstance(node, ast.Name):
        return local.get(node.id, [])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return funcs.get(node.func.id, [])
    return []


def raise_sites() -> list[tuple[str, str, str]]:
    """(where, code, class name) of every construction of an error class in controlplane/ with a
    literal code: direct calls, and calls of a module's helper that passes its ``code`` parameter
    straight into an error class (``_refuse("egress-metadata", ...)``)."""
    sites: list[tuple[str, str, str]] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        assigns = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)
        ]
        local: dict[str, list[str]] = collections.defaultdict(list)
        for node in assigns:
            local[ast.unparse(node.targets[0])] += _literals(node.value, {}, {})
        tables = {ast.unparse(n.targets[0]): _kebab_strings(n.value) for n in assigns if n in tree.body}
        funcs = {
            fn.name: _kebab_strings(fn)
            + [code for n in ast.walk(fn) if isinstance(n, ast.Name) for code in tables.get(n.id, [])]
            for fn in tree.body
            if isinstance(fn, ast.FunctionDef)
        }
        helpers: dict[str, tuple[int, str]] = {}  # helper name -> (index of its code param, class)
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            params = [a.arg for a in fn.args.args]
            for call in ast.walk(fn):
                if isinstance(call, ast.Call) and _name(call) in CLASSES:
                    arg = _code_arg(call, 0)
                    if isinstance(arg, ast.Name) and arg.id in params:
                        helpers[fn.name] = (params.index(arg.id), str(_name(call)))
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call):
                continue
            name = _name(call)
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            if name in ("CommandFailed", "CommandTimeout"):
                arg = next((k.value for k in call.keywords if k.arg == "code"), None)
                code = "command-failed" if name == "CommandFailed" else "command-timeout"
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    code = arg.value
                sites.append((where, code, name))
            elif name in CLASSES:
                sites += [(where, code, name) for code in _literals(_code_arg(call, 0), local, funcs)]
            elif name in LOADERS and any(k.arg == "code" for k in call.keywords):
                err = next((k.value for k in call.keywords if k.arg == "error"), None)
                cls = err.id if isinstance(err, ast.Name) else "UsageError"
                sites += [(where, code, cls) for code in _literals(_code_arg(call, 99), local, funcs)]
            elif name in helpers:
                index, cls = helpers[name]
                sites += [(where, code, cls) for code in _literals(_code_arg(call, index), local, funcs)]
    return sites


def test_the_walk_finds_the_raise_sites_it_must() -> None:
    sites = raise_sites()
    found = {(code, cls) for _, code, cls in sites}
    assert len(sites) > 250
    # a direct call, a helper's call (nftrules._refuse, ids._parse) and CommandFailed's default
    assert ("tier-controls-missing", "RefusedError") in found
    assert ("egress-metadata", "UsageError") in found
    assert ("invalid-job-id", "UsageError") in found
    assert ("command-failed", "CommandFailed") in found
    assert ("receipt-truncated", "RefusedError") in found  # code = "a" if ... else "b"; _refuse(code, ...)
    assert ("sigstore-sct-invalid", "RefusedError") in found  # _refuse(_code_for(message), ...)
    assert ("jobspec-invalid", "UsageError") in found  # validate(JobSpec, raw, code=...)
    assert ("tiers-invalid", "OperationalError") in found  # validate(..., error=OperationalError)


def test_every_raise_site_uses_a_registered_code_with_its_registered_class() -> None:
    wrong = []
    for where, code, cls_name in raise_sites():
        entry = errors.CODES.get(code)
        if entry is None:
            wrong.append(f"{where}: {code!r} is not registered")
        elif not issubclass(CLASSES[cls_name], entry[0]):
            wrong.append(f"{where}: {code!r} raised as {cls_name}, registered for {entry[0].__name__}")
    assert wrong == []


def test_every_registered_code_is_raised_somewhere() -> None:
    raised = {code for _, code, _ in raise_sites()}
    assert sorted(set(errors.CODES) - raised) == []


def test_one_code_one_class_across_the_package() -> None:
    by_code: dict[str, set[type[AvmError]]] = collections.defaultdict(set)
    for _, code, cls_name in raise_sites():
        cls = CLASSES[cls_name]
        by_code[code].add(next(c for c in (UsageError, RefusedError, OperationalError) if issubclass(cls, c)))
    assert {code: classes for code, classes in by_code.items() if len(classes) > 1} == {}


def test_the_registry_is_well_formed() -> None:
    for code, (cls, meaning) in errors.CODES.items():
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", code), code
        assert cls in (UsageError, RefusedError, OperationalError), code
        assert meaning and "\n" not in meaning and not meaning.endswith("."), code


@pytest.mark.parametrize(
    ("cls", "code", "message"),
    [
        (UsageError, "tool-missing", "registered for OperationalError, raised as UsageError"),
        (OperationalError, "key-invalid", "registered for UsageError, raised as OperationalError"),
        (RefusedError, "no-such-code", "'no-such-code' is not in controlplane.errors.CODES"),
    ],
)
def test_the_constructor_refuses_an_unregistered_code_or_another_class(
    cls: type[AvmError], code: str, message: str
) -> None:
    with pytest.raises(AssertionError) as caught:
        cls(code, "x")
    assert message in str(caught.value)


def test_the_two_codes_that_were_inconsistent_now_exit_with_their_class() -> None:
    assert errors.CODES["tool-missing"][0].exit_code is ExitCode.ERROR
    assert errors.CODES["key-invalid"][0].exit_code is ExitCode.USAGE
    assert OperationalError("tool-missing", "busybox is not installed").to_dict()["exit_code"] == 1


def _section(doc: str, start: str) -> str:
    begin = doc.index(start)
    return doc[begin : doc.index("\n\n", begin)]


def test_docs_cli_code_table_is_the_registry() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text()
    table = _section(doc, "| code | exit | meaning |")
    assert table == errors.code_table(), (
        "regenerate the table in docs/cli.md with "
        "`python -c 'from controlplane.errors import code_table; print(code_table())'`"
    )


def test_docs_cli_why_that_class_table_agrees_with_the_registry() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text()
    rows = _section(doc, "| code | exit | why that class |").splitlines()[2:]
    assert len(rows) == 7
    for row in rows:
        codes, exit_code = row.split("|")[1:3]
        for code in re.findall(r"`([a-z0-9-]+)`", codes):
            assert int(errors.CODES[code][0].exit_code) == int(exit_code), code


def test_a_missing_busybox_is_an_operational_error_exit_1_and_builds_nothing(tmp_path: Path) -> None:
    """Was UsageError (64) here and OperationalError (1) at the twelve other `tool-missing` sites:
    the command line is fine, the host lacks a tool."""
    src = tmp_path / "hello.txt"
    src.write_text("hi\n")
    home = tmp_path / "home"
    env = {**os.environ, "AVM_HOME": str(home), "PATH": str(tmp_path / "empty-path")}
    out = subprocess.run(
        [sys.executable, "-m", "controlplane", "image", "build-job", "demo", "--file", f"{src}:/hello.txt"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1, out.stderr
    assert "error[tool-missing]: busybox is not installed" in out.stderr
    assert "Traceback" not in out.stderr
    from controlplane.home import Home
    from controlplane.jobs.oci import store as ocistore

    assert not ocistore.store_dir(Home(home)).exists()


def test_a_home_key_that_is_not_ed25519_is_key_invalid_exit_64(tmp_path: Path) -> None:
    """Was OperationalError (1) here and UsageError (64) at the eleven other `key-invalid` sites."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from controlplane.evidence import keys
    from controlplane.home import Home

    home = Home(tmp_path / "home").ensure()
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    keys.private_path(home).write_bytes(pem)
    with pytest.raises(UsageError) as caught:
        keys.load_signer(home)
    assert caught.value.code == "key-invalid" and caught.value.exit_code == 64
    assert keys.private_path(home).read_bytes() == pem
