# -*- test-case-name: tests.test_principal -*-
"""Credentials for a principal's child: the values of its environment that
differ from one client to another.

A server's C{env} may take values from three sources, written with the
C{${...}} syntax of the configuration:

  - C{${claim:NAME}}: a claim of the principal's JWT (an identity provider
    can issue per-user upstream tokens);
  - C{${secret:NAME}}: the principal's entry of the secrets file (C{[secrets]
    file}, a table per principal id) or its own file (C{[secrets] directory},
    C{PRINCIPAL.toml} or C{.json});
  - C{${credential:NAME}}: a systemd credential (C{LoadCredential=}), read
    from C{$CREDENTIALS_DIRECTORY}.

The first two need C{sharing = "principal"}: a child serves one principal
only. A missing value refuses that principal's child (L{MissingCredential}
names the key, never a value); no child starts without it. The client's own
C{Authorization} header is never among them.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any

import attrs

from mcptwist.config.files import private_file_problem
from mcptwist.config.model import CREDENTIAL_REFERENCE


class MissingCredential(Exception):
    """A value a principal's child needs is missing (the message names the
    source and key, never a value)."""


class SecretsError(Exception):
    """A secrets file that cannot be used (unreadable, malformed, or readable
    by others than the bridge's user)."""


def _load(path: str) -> Any:
    problem = private_file_problem(path)
    if problem is not None:
        raise SecretsError(f"{path} {problem[0]}; {problem[1]}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SecretsError(f"{path}: cannot read it: {e.strerror}") from None
    try:
        return json.loads(data) if path.endswith(".json") else tomllib.loads(data.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise SecretsError(
            f"{path}: not valid {'JSON' if path.endswith('.json') else 'TOML'}: {e}"
        ) from None


@attrs.define
class Secrets:
    """The per-principal secrets: one file keyed by principal id, or a
    directory of one file per principal. Files are read again when they change."""

    file: str | None = None
    directory: str | None = None
    _cache: dict[str, tuple[float, Any]] = attrs.field(factory=dict)

    def of(self, principal: str) -> Mapping[str, str]:
        """A principal's secrets ({} when it has none)."""
        if self.file is not None:
            table = self._read(self.file)
            entry = table.get(principal) if isinstance(table, dict) else None
        elif self.directory is not None:
            entry = None
            for suffix in (".toml", ".json"):
                path = os.path.join(self.directory, principal + suffix)
                if os.path.exists(path):
                    entry = self._read(path)
                    break
        else:
            entry = None
        if not isinstance(entry, dict):
            return {}
        return {k: v for k, v in entry.items() if isinstance(v, str)}

    def _read(self, path: str) -> Any:
        try:
            mtime = os.stat(path).st_mtime
        except OSError as e:
            raise SecretsError(f"{path}: cannot read it: {e.strerror}") from None
        kept = self._cache.get(path)
        if kept is None or kept[0] != mtime:
            kept = self._cache[path] = (mtime, _load(path))
        return kept[1]


def resolve(
    env: Mapping[str, str],
    principal: str,
    claims: Mapping[str, str],
    secrets: Secrets | None,
    environ: Mapping[str, str],
) -> dict[str, str]:
    """The environment with every reference replaced by its value for this
    principal; L{MissingCredential} names the first one that has none."""
    if not any("${" in value for value in env.values()):
        return dict(env)
    mine: Mapping[str, str] | None = None

    def value(match: re.Match[str]) -> str:
        nonlocal mine
        source, name = match.group(1), match.group(2)
        found: str | None
        if source == "claim":
            found = claims.get(name)
        elif source == "secret":
            if mine is None:
                try:
                    mine = secrets.of(principal) if secrets is not None else {}
                except SecretsError as e:
                    raise MissingCredential(f"the secrets file cannot be used ({e})") from None
            found = mine.get(name)
        else:
            found = _credential(name, environ)
        if found is None:
            what = {"claim": "claim", "secret": "secret", "credential": "systemd credential"}
            raise MissingCredential(f"no {what[source]} {name!r} for {principal}")
        return found

    return {key: CREDENTIAL_REFERENCE.sub(value, text) for key, text in env.items()}


def _credential(name: str, environ: Mapping[str, str]) -> str | None:
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory or "/" in name:
        return None
    try:
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None
