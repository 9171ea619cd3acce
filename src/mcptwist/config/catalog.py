# -*- test-case-name: tests.test_catalog -*-
"""The catalog of ready servers: one small TOML file per common MCP server.

Each file (C{etc/catalog/NAME.toml} in the source tree, installed under
C{share/mcptwist/catalog}) says what runs the server (C{command}, C{args},
with its package pinned), what it needs (C{[env.VAR]}: variables of its
environment; C{[params.NAME]}: values written into its arguments as
C{{NAME}}), the sharing mode that suits it, and what it is for. L{table}
turns an entry and an operator's values into the C{[servers.NAME]} table of
a configuration. A secret is never written in the clear: it becomes a
C{${VAR}} reference, which the bridge reads from its environment.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from mcptwist.config.model import SHARING_MODES

# Where the catalog is found, unless told: installed with the package, or the source tree's.
INSTALLED: Final = Path(sys.prefix) / "share" / "mcptwist" / "catalog"
SOURCE_TREE: Final = Path(__file__).resolve().parents[3] / "etc" / "catalog"
REGISTRIES: Final = ("pypi", "npm")
_NAME: Final = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")
_VAR: Final = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
_PLACEHOLDER: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_REFERENCE: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")


class CatalogError(Exception):
    """A catalog file, or a request to use one, that cannot be taken as it is."""


@attrs.frozen
class Value:
    """Something an entry needs from the operator: a variable of the
    server's environment, or a value of its arguments."""

    name: str
    description: str
    secret: bool = False
    required: bool = True
    default: str | None = None
    example: str | None = None


@attrs.frozen
class Entry:
    """One server of the catalog."""

    name: str
    description: str
    command: str
    args: tuple[str, ...]
    sharing: str
    registry: str
    package: str
    env: tuple[Value, ...] = ()
    params: tuple[Value, ...] = ()
    notes: str = ""

    @property
    def values(self) -> tuple[Value, ...]:
        return self.params + self.env


def directory(environ: Mapping[str, str], given: str | None = None) -> Path:
    """The catalog's folder: C{given}, C{MCPTWIST_CATALOG}, the installed one,
    else the source tree's."""
    for candidate in (given, environ.get("MCPTWIST_CATALOG")):
        if candidate:
            return Path(candidate)
    return INSTALLED if INSTALLED.is_dir() else SOURCE_TREE


def entries(folder: Path) -> dict[str, Entry]:
    """Every entry of the catalog, by name."""
    if not folder.is_dir():
        raise CatalogError(
            f"{folder}: no catalog there; pass --catalog DIR or set MCPTWIST_CATALOG"
        )
    return {entry.name: entry for entry in map(read, sorted(folder.glob("*.toml")))}


def read(path: Path) -> Entry:
    """One catalog file; a L{CatalogError} names the file, the key and the fix."""
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CatalogError(f"{path}: cannot be read as TOML: {e}") from None
    name = path.stem

    def fail(key: str, problem: str, fix: str) -> CatalogError:
        return CatalogError(f"{path}: {key}: {problem}; {fix}")

    def text(key: str, table: Mapping[str, Any] = doc, required: bool = True) -> str | None:
        value = table.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            raise fail(key, f"must be a non-empty string, not {value!r}", f'write {key} = "..."')
        return value

    if not _NAME.match(name):
        raise fail("(file name)", f"{name!r} is not a server name", "name the file like time.toml")
    known = {"description", "command", "args", "sharing", "registry", "package", "env", "params"}
    for key in doc:
        if key not in known | {"notes"}:
            raise fail(key, "unknown key", f"use only {', '.join(sorted(known))} and notes")
    args = doc.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise fail("args", "must be a list of strings", 'write args = ["..."]')
    sharing = text("sharing")
    if sharing not in SHARING_MODES:
        raise fail("sharing", f"{sharing!r} is not a sharing mode", f"use one of {SHARING_MODES}")
    registry = text("registry")
    if registry not in REGISTRIES:
        raise fail("registry", f"{registry!r} is not known", f"use one of {REGISTRIES}")
    values: dict[str, tuple[Value, ...]] = {}
    for kind in ("env", "params"):
        table = doc.get(kind, {})
        if not isinstance(table, dict):
            raise fail(kind, "must be a table", f"write [{kind}.NAME] tables")
        found = []
        for var, spec in table.items():
            key = f"{kind}.{var}"
            if not _VAR.match(var) or not isinstance(spec, dict):
                raise fail(
                    key, "is not a variable's table", f"write [{kind}.NAME] with description"
                )
            unknown = set(spec) - {"description", "secret", "required", "default", "example"}
            if unknown:
                raise fail(key, f"unknown keys {sorted(unknown)}", "see etc/catalog/README.md")
            found.append(
                Value(
                    name=var,
                    description=text("description", spec) or "",
                    secret=spec.get("secret") is True,
                    required=spec.get("required", True) is not False,
                    default=text("default", spec, required=False),
                    example=text("example", spec, required=False),
                )
            )
        values[kind] = tuple(found)
    params = {p.name for p in values["params"]}
    for arg in args:
        for used in _PLACEHOLDER.findall(arg):
            if used not in params:
                raise fail(
                    "args",
                    f"uses {{{used}}}, which no [params] table describes",
                    f"add [params.{used}] with a description",
                )
    return Entry(
        name=name,
        description=text("description") or "",
        command=text("command") or "",
        args=tuple(args),
        sharing=sharing,
        registry=registry,
        package=text("package") or "",
        env=values["env"],
        params=values["params"],
        notes=text("notes", required=False) or "",
    )


def table(entry: Entry, server: str, given: Mapping[str, str]) -> str:
    """The C{[servers.SERVER]} table of a configuration that runs C{entry}
    with the operator's values (by variable name). A secret becomes a
    C{${VAR}} reference; a value that is neither given nor defaulted is
    left out when optional, and refused when required."""
    unknown = set(given) - {v.name for v in entry.values}
    if unknown:
        raise CatalogError(
            f"{entry.name} takes no {', '.join(sorted(unknown))}; "
            f"it takes {', '.join(v.name for v in entry.values) or 'no values'}"
        )
    chosen: dict[str, str] = {}
    missing: list[str] = []
    for value in entry.values:
        if value.secret:
            if value.name in given and given[value.name] != f"${{{value.name}}}":
                raise CatalogError(
                    f"{value.name} is a secret: it is not written into the configuration. "
                    f"Export {value.name} in the bridge's environment instead; the "
                    f"configuration refers to it as ${{{value.name}}}"
                )
            chosen[value.name] = f"${{{value.name}}}"
        elif value.name in given:
            chosen[value.name] = given[value.name]
        elif value.default is not None:
            chosen[value.name] = value.default
        elif value.required:
            missing.append(value.name)
    if missing:
        raise CatalogError(
            f"{entry.name} needs {', '.join(missing)}: pass "
            + " ".join(f"--set {m}=VALUE" for m in missing)
        )
    args = [
        _PLACEHOLDER.sub(lambda m: chosen.get(m.group(1), ""), arg)
        for arg in entry.args
        if all(name in chosen for name in _PLACEHOLDER.findall(arg))
    ]
    lines = [
        f"# {entry.description}",
        f"# From the catalog: {entry.package} ({entry.registry}).",
        f"[servers.{server}]",
        f"command = {toml_string(entry.command)}",
        f"args = [{', '.join(toml_string(a) for a in args)}]",
        f"sharing = {toml_string(entry.sharing)}",
    ]
    env = {v.name: chosen[v.name] for v in entry.env if v.name in chosen}
    if env:
        pairs = ", ".join(f"{k} = {toml_string(v)}" for k, v in env.items())
        lines.append(f"env = {{ {pairs} }}")
    return "\n".join(lines) + "\n"


def references(text: str) -> set[str]:
    """The environment variables a configuration refers to as C{${VAR}}."""
    return set(_REFERENCE.findall(text))


def secrets_of(entry: Entry) -> list[str]:
    """The variables the bridge's environment must give this entry."""
    return [v.name for v in entry.values if v.secret]


def toml_string(value: str) -> str:
    """A TOML basic string holding exactly C{value}."""
    out = ['"']
    for char in value:
        code = ord(char)
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def add(path: Path, text: str, server: str, check: Callable[[Path], object]) -> None:
    """Append a server's table to a TOML configuration, whole or not at all:
    the result is C{check}ed (the bridge's own loader) before it replaces the file."""
    try:
        current = path.read_text()
    except FileNotFoundError:
        current = ""
    try:
        doc = tomllib.loads(current)
    except tomllib.TOMLDecodeError as e:
        raise CatalogError(f"{path}: is not TOML ({e}); add works on TOML configurations") from None
    if server in (doc.get("servers") or {}):
        raise CatalogError(f"{path}: servers.{server} exists already; choose another --name")
    joined = current + ("\n" if current and not current.endswith("\n") else "")
    joined += ("\n" if current else "") + text
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(joined)
    try:
        check(temporary)
        if path.exists():
            os.chmod(temporary, path.stat().st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
