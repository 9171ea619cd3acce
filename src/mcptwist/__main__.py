# -*- test-case-name: tests.test_auth -*-
"""Command-line tools: C{python -m mcptwist token --name NAME} makes a
bearer token; C{python -m mcptwist pin --config FILE} pins the tools the
configured servers serve (or checks them against their pins);
C{python -m mcptwist admin COMMAND} drives a running bridge through its
admin API (status, start, stop, restart, stderr, sessions, add, remove,
reload, pins, accept); C{python -m mcptwist catalog list|show|add} adds a
ready server from the catalog to a configuration.

The bridge itself runs under C{twistd -n mcpbridge}; this is for chores
around it. Nothing here imports the reactor, so it starts quickly: the admin
client speaks HTTP with the standard library.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import ssl
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

from . import __version__

DEFAULT_URL: Final = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT: Final = 120.0
TOKEN_HINT: Final = "pass an admin token with --token-file FILE or the MCPTWIST_TOKEN variable"


def token_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Print a new token once, and the configuration that accepts it."""
    from mcptwist.config.keys import digest_text
    from mcptwist.security.auth import generate_token, hash_token

    name = args.name.strip()
    if not name:
        err.write("mcptwist token: --name must not be empty\n")
        return 2
    servers = sorted({s.strip() for s in args.servers.split(",") if s.strip()})
    if not servers:
        err.write('mcptwist token: --servers names no server; give "*" for all\n')
        return 2
    token = generate_token()
    out.write(f"{token}\n\n")
    out.write("[[auth.tokens]]\n")
    # JSON strings are valid TOML basic strings.
    out.write(f"name = {json.dumps(name)}\n")
    out.write(f'hash = "{digest_text(hash_token(token))}"\n')
    out.write(f"servers = [{', '.join(json.dumps(s) for s in servers)}]\n")
    out.write(f"admin = {'true' if args.admin else 'false'}\n")
    err.write(
        "The token above is shown only once: give it to its user now. "
        "The bridge keeps only its hash; paste the [[auth.tokens]] table into the config.\n"
    )
    return 0


def pin_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run the configured servers, and pin their tools (or, with --check,
    compare them with their pins): exit 1 when a tool changed."""
    from mcptwist.child.probe import ProbeError, probe_tools
    from mcptwist.config.load import load_config
    from mcptwist.config.model import ConfigError
    from mcptwist.mcp.describe import tool_digest
    from mcptwist.routing.pins import Pin, PinFileError, definition, read_pin_file, write_pin_file

    try:
        config = load_config(args.config, os.environ)
    except (ConfigError, OSError) as e:
        err.write(f"mcptwist pin: {e}\n")
        return 2
    path = args.pin_file or config.pin_file
    if path is None:
        err.write(
            "mcptwist pin: the configuration sets no pin_file; add pin_file = PATH, "
            "or give --pin-file PATH\n"
        )
        return 2
    names = args.server or sorted(config.servers)
    unknown = [n for n in names if n not in config.servers]
    if unknown:
        err.write(f"mcptwist pin: no server is named {unknown[0]!r}\n")
        return 2
    try:
        pins = read_pin_file(path)
    except PinFileError as e:
        err.write(f"mcptwist pin: {e}\n")
        return 2
    changed = failed = 0
    rows: list[list[str]] = []
    for name in names:
        try:
            tools = probe_tools(config.servers[name], os.environ)
        except ProbeError as e:
            err.write(f"mcptwist pin: {name}: {e}\n")
            failed += 1
            continue
        known = pins.get(name, {})
        fresh = {t["name"]: Pin(tool_digest(t), definition(t)) for t in tools if "name" in t}
        for tool, pin in sorted(fresh.items()):
            old = known.get(tool)
            if old is None:
                state = "new"
            elif old.digest != pin.digest:
                state = "changed"
                changed += 1
            else:
                state = "same"
            rows.append([name, tool, state, pin.digest[:16]])
        for tool in sorted(set(known) - set(fresh)):
            rows.append([name, tool, "gone", known[tool].digest[:16]])
        if not args.check:
            pins[name] = fresh
    _table(out, ["SERVER", "TOOL", "STATE", "SHA256"], rows)
    if not args.check:
        try:
            write_pin_file(path, pins)
        except PinFileError as e:
            err.write(f"mcptwist pin: {e}\n")
            return 2
        out.write(f"pinned the tools of {len(names) - failed} servers in {path}\n")
    if failed:
        return 2
    return 1 if args.check and changed else 0


# The admin client


class AdminError(Exception):
    """What the admin command reports before it exits with C{status}:
    1 for a refusal by the bridge, 2 when it could not ask."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are errors: following one would send the token elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class AdminClient:
    """Calls the admin API of one bridge; every failure is an L{AdminError}."""

    def __init__(
        self, url: str, token: str | None, cafile: str | None, timeout: float, err: TextIO
    ) -> None:
        try:
            parts = urllib.parse.urlsplit(url)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
            _ = parts.port  # raises for a port that is not a number
        except ValueError:
            valid = False
        if not valid or parts.hostname is None:
            raise AdminError(f"--url {url!r} is not an http:// or https:// URL of the bridge", 2)
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if _is_loopback(parts.hostname):
            handlers.append(urllib.request.ProxyHandler({}))
        if parts.scheme == "https":
            try:
                context = ssl.create_default_context(cafile=cafile)
            except (OSError, ssl.SSLError) as e:
                raise AdminError(f"cannot use --cafile {cafile}: {_reason(e)}", 2) from None
            handlers.append(urllib.request.HTTPSHandler(context=context))
        elif token is not None and not _is_loopback(parts.hostname):
            err.write(
                f"mcptwist admin: warning: the token goes unencrypted to {parts.hostname}; "
                "use an https:// URL\n"
            )
        self.opener = urllib.request.build_opener(*handlers)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str | int] | None = None,
    ) -> Any:
        """The JSON answer of one call."""
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"accept": "application/json", "user-agent": f"mcptwist-admin/{__version__}"}
        data = None
        if method == "POST":
            headers["content-type"] = "application/json"
            data = json.dumps(body if body is not None else {}, default=str).encode()
        if self.token is not None:
            headers["authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            raise self._refused(e) from None
        except urllib.error.URLError as e:
            raise AdminError(self._unreachable(e.reason), 2) from None
        except (OSError, http.client.HTTPException) as e:
            raise AdminError(self._unreachable(e), 2) from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise AdminError(
                f"the answer from {self.url} is not JSON: is this the bridge?", 2
            ) from None

    def _unreachable(self, reason: object) -> str:
        where = f"the bridge at {self.url}"
        if isinstance(reason, ConnectionRefusedError):
            return (
                f"cannot connect to {where}: connection refused "
                "(is it running? give --url or set MCPTWIST_URL)"
            )
        if isinstance(reason, ssl.SSLCertVerificationError):
            return (
                f"cannot trust {where}: {reason.verify_message or reason}; "
                "give the CA that signed its certificate with --cafile"
            )
        if isinstance(reason, TimeoutError):
            return f"no answer from {where} within {self.timeout:g} seconds (--timeout)"
        if isinstance(reason, BaseException):
            return f"cannot reach {where}: {_reason(reason)}"
        return f"cannot reach {where}: {reason}"

    def _refused(self, error: urllib.error.HTTPError) -> AdminError:
        try:
            body = json.loads(error.read() or b"null")
            message = str(body["error"]["message"])
        except Exception:
            message = f"HTTP {error.code} {error.reason}"
        if error.code == 401:
            message += f" ({TOKEN_HINT})"
        elif error.code == 403:
            hint = "is this token an admin's? " if self.token is not None else ""
            message += f" ({hint}{TOKEN_HINT})"
        elif 300 <= error.code < 400:
            where = error.headers.get("location")
            message += f" (a redirect{f' to {where}' if where else ''}; give that URL with --url)"
        return AdminError(message, 1)


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_token(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """The bearer token, from --token-file or MCPTWIST_TOKEN; never printed."""
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise AdminError(
                f"cannot read the token file {args.token_file}: {_reason(e)}", 2
            ) from None
        if not token:
            raise AdminError(f"the token file {args.token_file} is empty", 2)
        where = f"the token file {args.token_file}"
    else:
        token = environ.get("MCPTWIST_TOKEN", "").strip()
        if not token:
            return None
        where = "MCPTWIST_TOKEN"
    if not all("!" <= c <= "~" for c in token):
        raise AdminError(f"{where} holds spaces or characters a token cannot have", 2)
    return token


def _server_table(path: str, name: str) -> dict[str, Any]:
    """A server's table from a TOML or JSON file: bare, under [servers.NAME],
    or under "mcpServers" (a file with one server may name it differently)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise AdminError(f"cannot read {path}: {_reason(e)}", 2) from None
    doc: Any
    if path.endswith(".json") or raw.lstrip().startswith(b"{"):
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise AdminError(f"{path} is not valid JSON ({e})", 2) from None
    else:
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise AdminError(f"{path} is not valid TOML ({e})", 2) from None
    if not isinstance(doc, dict):
        raise AdminError(f"{path} does not hold a table of server settings", 2)
    for wrapper in ("servers", "mcpServers"):
        tables = doc.get(wrapper)
        if "command" in doc or not isinstance(tables, dict):
            continue
        if name in tables:
            table = tables[name]
        elif len(tables) == 1:
            [table] = tables.values()
        else:
            names = ", ".join(sorted(tables)) or "none"
            raise AdminError(f"{path} holds no {wrapper} entry named {name!r} (it has: {names})", 2)
        if not isinstance(table, dict):
            raise AdminError(f"{path}: the {wrapper} entry for {name!r} is not a table", 2)
        return table
    return doc


# Human output


def _duration(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    if not 0 <= value < 1e12:
        return str(value)
    seconds = int(value)
    if seconds < 60:
        return f"{value:.0f}s" if value >= 1 or value == 0 else f"{value:.1f}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _table(out: TextIO, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _server_row(status: Mapping[str, Any]) -> list[str]:
    children = status.get("children")
    if isinstance(children, list) and "pid" not in status:
        # One child per session: the children's counts, added up.
        kids = [c for c in children if isinstance(c, dict)]
        pid = f"{status.get('running_children', len(kids))}/{status.get('max_children', '?')} children"
        restarts = sum(c.get("restarts") or 0 for c in kids)
        in_flight = sum(c.get("in_flight") or 0 for c in kids)
        uptime = "-"
    else:
        pid = _cell(status.get("pid"))
        restarts = status.get("restarts")
        in_flight = status.get("in_flight")
        uptime = _duration(status.get("uptime"))
    return [
        _cell(status.get("name")),
        _cell(status.get("state")),
        pid,
        uptime,
        _cell(restarts),
        _cell(status.get("sessions")),
        _cell(in_flight),
    ]


def _show_servers(doc: Any, out: TextIO) -> None:
    servers = doc.get("servers", []) if isinstance(doc, dict) else []
    if not servers:
        out.write("no servers\n")
        return
    headers = ["NAME", "STATE", "PID", "UPTIME", "RESTARTS", "SESSIONS", "IN_FLIGHT"]
    _table(out, headers, [_server_row(s) for s in servers])


def _show_sessions(doc: Any, out: TextIO) -> None:
    sessions = doc.get("sessions", []) if isinstance(doc, dict) else []
    if not sessions:
        out.write("no open sessions\n")
        return
    headers = ["ID", "SERVER", "TRANSPORT", "PRINCIPAL", "PEER", "CLIENT", "AGE", "IDLE", "STREAM"]
    rows = [
        [
            _cell(s.get("id")),
            _cell(s.get("server")),
            _cell(s.get("transport")),
            _cell(s.get("principal")),
            _cell(s.get("peer")),
            _cell(s.get("client")),
            _duration(s.get("age")),
            _duration(s.get("idle")),
            _cell(s.get("stream_open")),
        ]
        for s in sessions
    ]
    _table(out, headers, rows)


def _show_status(doc: Any, out: TextIO) -> None:
    if not isinstance(doc, dict):
        out.write(f"{_cell(doc)}\n")
        return
    stderr = doc.get("stderr")
    fields = {k: v for k, v in doc.items() if k != "stderr"}
    width = max((len(k) for k in fields), default=0) + 1
    for key, value in fields.items():
        text = _duration(value) if key in ("uptime", "next_attempt_in") else _cell(value)
        out.write(f"{key + ':':<{width}} {text}\n")
    if isinstance(stderr, list) and stderr:
        out.write(f"stderr (last {min(len(stderr), 10)} lines; more with: admin stderr NAME):\n")
        for line in stderr[-10:]:
            out.write(f"  {line}\n")


def _summary(verb: str, name: str, state: bool = True) -> Callable[[Any, TextIO], None]:
    def show(doc: Any, out: TextIO) -> None:
        if not state or not isinstance(doc, dict):
            out.write(f"{verb} {name}\n")
            return
        state_now = doc.get("state")
        pid = doc.get("pid")
        detail = f": {state_now}" if state_now else ""
        detail += f" (pid {pid})" if pid else ""
        out.write(f"{verb} {name}{detail}\n")

    return show


def _show_reload(doc: Any, out: TextIO) -> None:
    out.write("configuration reloaded\n")
    changes = doc.get("changes") if isinstance(doc, dict) else None
    if isinstance(changes, dict):
        for key, value in changes.items():
            if isinstance(value, list):
                text = ", ".join(str(v) for v in value) if value else "none"
            else:
                text = _cell(value)
            out.write(f"  {key}: {text}\n")


def _show_stderr(doc: Any, out: TextIO) -> None:
    for line in doc.get("lines", []) if isinstance(doc, dict) else []:
        out.write(f"{line}\n")


def _show_pins(doc: Any, out: TextIO) -> None:
    servers = doc.get("servers", {}) if isinstance(doc, dict) else {}
    rows = []
    for name, status in sorted(servers.items()):
        changed = status.get("changed") or {}
        rows.append(
            [
                name,
                _cell(status.get("pinned")),
                _cell(status.get("on_tool_change")),
                ", ".join(sorted(changed)) or "-",
                "yes" if status.get("blocked") else "no",
            ]
        )
    _table(out, ["SERVER", "PINNED", "ON_CHANGE", "CHANGED", "BLOCKED"], rows)
    for name, status in sorted(servers.items()):
        for tool, change in sorted((status.get("changed") or {}).items()):
            fields = ", ".join(change.get("changed") or []) or "definition"
            out.write(f"{name}/{tool}: {fields} changed\n")
            for field in change.get("changed") or []:
                out.write(f"  pinned {field}: {_cell(change['pinned'].get(field))}\n")
                out.write(f"  served {field}: {_cell(change['current'].get(field))}\n")


def _show_accepted(doc: Any, out: TextIO) -> None:
    accepted = doc.get("accepted") if isinstance(doc, dict) else None
    server = doc.get("server") if isinstance(doc, dict) else None
    if not accepted:
        out.write(f"{server}: no changed tool to accept\n")
    else:
        out.write(f"{server}: accepted {', '.join(accepted)}\n")


def _show_closed(doc: Any, out: TextIO) -> None:
    out.write("session closed\n")


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _admin_call(
    args: argparse.Namespace,
) -> tuple[str, str, Any, dict[str, str | int] | None, Callable[[Any, TextIO], None]]:
    """The method, path, body, query and human display of a command."""
    command = args.admin_command
    if command == "servers":
        return "GET", "/admin/servers", None, None, _show_servers
    if command == "sessions":
        query: dict[str, str | int] | None = {"server": args.server} if args.server else None
        return "GET", "/admin/sessions", None, query, _show_sessions
    if command == "reload":
        return "POST", "/admin/reload", None, None, _show_reload
    if command == "pins":
        return "GET", "/admin/pins", None, None, _show_pins
    if command == "close":
        path = f"/admin/sessions/{_quote(args.session_id)}"
        return "DELETE", path, None, None, _show_closed
    name = args.name
    server = f"/admin/servers/{_quote(name)}"
    if command == "status":
        return "GET", server, None, None, _show_status
    if command == "stderr":
        return "GET", f"{server}/stderr", None, {"lines": args.lines}, _show_stderr
    if command == "stop" and getattr(args, "principal", None):
        path = f"{server}/children/{_quote(args.principal)}/stop"
        return "POST", path, None, None, _summary(f"stopped {args.principal}'s child of", name)
    if command in ("start", "stop", "restart"):
        verb = {"start": "started", "stop": "stopped", "restart": "restarted"}[command]
        return "POST", f"{server}/{command}", None, None, _summary(verb, name)
    if command == "add":
        table = _server_table(args.config, name) if args.config is not None else {}
        if args.server_command is not None:
            table["command"] = args.server_command
        body = {"name": name, "config": table}
        return "POST", "/admin/servers", body, None, _summary("added", name)
    if command == "accept":
        body = {"tools": args.tools} if args.tools else {}
        path = f"/admin/pins/{_quote(name)}/accept"
        return "POST", path, body, None, _show_accepted
    assert command == "remove", command
    return "DELETE", server, None, None, _summary("removed", name, state=False)


def admin_command(
    args: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Make one admin API call and show its answer."""
    env = os.environ if environ is None else environ
    try:
        if args.lines is not None and not 1 <= args.lines <= 10_000:
            raise AdminError("-n must be from 1 to 10000", 2)
        method, path, body, query, show = _admin_call(args)
        url = args.url or env.get("MCPTWIST_URL") or DEFAULT_URL
        client = AdminClient(url, _read_token(args, env), args.cafile, args.timeout, err)
        doc = client.call(method, path, body, query)
    except AdminError as e:
        err.write(f"mcptwist admin: {e.message}\n")
        return e.status
    if args.json:
        out.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    else:
        show(doc, out)
    return 0


def _admin_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """The connection options, accepted before or after the command."""
    # Given after the command, an option must not reset what came before it.
    default: Any = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--url",
        default=default,
        help=f"the bridge's base URL (default: $MCPTWIST_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=default,
        help="a file holding an admin bearer token (default: $MCPTWIST_TOKEN)",
    )
    parser.add_argument(
        "--cafile", metavar="PEM", default=default, help="CA certificates to trust for https"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print the answer as JSON",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=DEFAULT_TIMEOUT if top else argparse.SUPPRESS,
        help=f"how long to wait for an answer (default {DEFAULT_TIMEOUT:g})",
    )


def _add_admin_parser(commands: Any) -> None:
    admin = commands.add_parser(
        "admin",
        help="manage a running bridge through its admin API",
        description="Manage a running bridge through its admin API (needs an admin token "
        "when the bridge authenticates). Exit status: 0 done, 1 refused by the bridge, "
        "2 could not ask (usage, connection, TLS).",
    )
    _admin_options(admin, top=True)
    admin.set_defaults(run=admin_command, lines=None)
    sub = admin.add_subparsers(dest="admin_command", metavar="COMMAND", required=True)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=summary, description=summary)
        _admin_options(parser, top=False)
        return parser

    command("servers", "list the servers and their state")
    for name, summary in (
        ("status", "show everything about one server"),
        ("start", "start a stopped server"),
        ("stop", "stop a server until it is started again"),
        ("restart", "restart a server's child processes"),
    ):
        parsed = command(name, summary)
        parsed.add_argument("name", metavar="NAME")
        if name == "stop":
            parsed.add_argument(
                "--principal",
                metavar="ID",
                help='only this client\'s child (sharing = "principal"), such as token:alice',
            )
    stderr = command("stderr", "print the last lines a server wrote to stderr")
    stderr.add_argument("name", metavar="NAME")
    stderr.add_argument(
        "-n", "--lines", type=int, default=100, help="how many lines (default 100, at most 10000)"
    )
    sessions = command("sessions", "list the open client sessions")
    sessions.add_argument("--server", metavar="NAME", help="only this server's")
    command("close", "close a client session").add_argument("session_id", metavar="SESSION_ID")
    add = command(
        "add",
        "add a server running one of the configuration's [admin.commands] until the next "
        "reload (write it to the config to keep it)",
    )
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--command",
        dest="server_command",
        metavar="COMMAND",
        help="which of the configuration's [admin.commands] it runs",
    )
    add.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML or JSON file holding the server's other settings (sharing, timeouts, ...)",
    )
    remove = command("remove", "stop and remove a server until the next reload")
    remove.add_argument("name", metavar="NAME")
    command("reload", "re-read the configuration file")
    command("pins", "show each server's pinned tools, and what changed since they were pinned")
    accept = command("accept", "pin the definitions a server serves now of its changed tools")
    accept.add_argument("name", metavar="NAME")
    accept.add_argument("tools", metavar="TOOL", nargs="*", help="only these (default: every one)")


def catalog_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """List the catalog, show one entry, or add one to a configuration."""
    from mcptwist.config import catalog
    from mcptwist.config.load import load_config
    from mcptwist.config.model import ConfigError

    try:
        found = catalog.entries(catalog.directory(os.environ, args.catalog))
        if args.catalog_command == "list":
            _table(
                out,
                ["NAME", "SHARING", "DESCRIPTION"],
                [[e.name, e.sharing, e.description] for e in found.values()],
            )
            return 0
        entry = found.get(args.name)
        if entry is None:
            err.write(f"no catalog entry {args.name!r}; see: python -m mcptwist catalog list\n")
            return 1
        if args.catalog_command == "show":
            _show_entry(entry, out)
            return 0
        server = args.server_name or entry.name
        given = dict(_assignment(a) for a in args.set or ())
        missing = [
            v
            for v in entry.values
            if v.required and not v.secret and v.default is None and v.name not in given
        ]
        if missing and args.config and sys.stdin.isatty():
            for value in missing:
                given[value.name] = input(f"{value.name} ({value.description}): ").strip()
        text = catalog.table(entry, server, given)
        if not args.config:
            out.write(text)
            return 0
        path = Path(args.config)
        secrets = catalog.secrets_of(entry)

        def check(candidate: Path) -> None:
            # The loader expands ${VAR}: one not exported here yet (a secret
            # the bridge will have) is checked as if it were.
            named = catalog.references(candidate.read_text())
            environ = {**os.environ, **{n: "set" for n in named if n not in os.environ}}
            try:
                load_config(candidate, environ)
            except ConfigError as e:
                raise catalog.CatalogError(str(e).replace(str(candidate), str(path))) from None

        catalog.add(path, text, server, check)
    except catalog.CatalogError as e:
        err.write(f"{e}\n")
        return 1
    out.write(f"added [servers.{server}] to {path}\n")
    if secrets:
        out.write(
            "export before starting the bridge (the configuration refers to them as ${VAR}): "
            + ", ".join(secrets)
            + "\n"
        )
    out.write("reload the bridge (SIGHUP, or python -m mcptwist admin reload) to start it\n")
    return 0


def _assignment(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise SystemExit(f"--set {text!r}: write --set NAME=VALUE")
    return name, value


def _show_entry(entry: Any, out: TextIO) -> None:
    out.write(f"{entry.name}: {entry.description}\n")
    out.write(f"package: {entry.package} ({entry.registry})\n")
    out.write(f"runs: {' '.join([entry.command, *entry.args])}\n")
    out.write(f"sharing: {entry.sharing}\n")
    for kind, values in (("argument", entry.params), ("environment", entry.env)):
        for value in values:
            traits = [kind]
            if value.secret:
                traits.append(f"secret: read from ${{{value.name}}}")
            elif value.default is not None:
                traits.append(f"default {value.default!r}")
            else:
                traits.append("required" if value.required else "optional")
            if value.example:
                traits.append(f"e.g. {value.example}")
            out.write(f"  {value.name} ({'; '.join(traits)}): {value.description}\n")
    if entry.notes:
        out.write(f"{entry.notes}\n")


def _add_catalog_parser(commands: Any) -> None:
    summary = "ready servers: list them, show one, add one to a configuration"
    top = commands.add_parser("catalog", help=summary, description=summary)
    top.add_argument(
        "--catalog",
        metavar="DIR",
        help="the catalog's folder "
        "(default: MCPTWIST_CATALOG, else the one installed with mcptwist)",
    )
    sub = top.add_subparsers(dest="catalog_command", metavar="COMMAND", required=True)
    sub.add_parser("list", help="every server of the catalog")
    show = sub.add_parser("show", help="what one server runs and needs")
    show.add_argument("name")
    add = sub.add_parser(
        "add",
        help="add a server to a configuration (or print its table)",
        description="Add a catalog server's [servers.NAME] table to a TOML configuration "
        "(without --config: print it). Values come from --set, else their defaults, else "
        "are asked for on a terminal. Secrets are never written: the table refers to "
        "${VAR}, which the bridge reads from its environment.",
    )
    add.add_argument("name")
    add.add_argument("--config", metavar="FILE", help="the TOML configuration to add it to")
    add.add_argument(
        "--name",
        dest="server_name",
        metavar="SERVER",
        help="the server's name in the configuration (default: the entry's)",
    )
    add.add_argument(
        "--set", action="append", metavar="NAME=VALUE", help="a value the server needs (repeatable)"
    )
    top.set_defaults(run=catalog_command)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m mcptwist",
        description="Tools for mcptwist (the bridge itself runs as: twistd -n mcpbridge).",
    )
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    token = commands.add_parser(
        "token",
        help="generate a bearer token and its [[auth.tokens]] configuration",
        description="Generate a bearer token. It is printed once; the bridge stores only its hash.",
    )
    token.add_argument("--name", required=True, help="who the token is for (shown in logs)")
    token.add_argument(
        "--servers",
        default="*",
        help='comma-separated server names the token may use (default "*": all)',
    )
    token.add_argument("--admin", action="store_true", help="also allow the admin endpoints")
    token.set_defaults(run=token_command)
    pin = commands.add_parser(
        "pin",
        help="pin the tools the configured servers serve (run each server once)",
        description="Run each configured server once, read its tools, and write their "
        "digests to the pin file (pin_file, or --pin-file). With --check, only compare: "
        "exit 1 when a tool changed since it was pinned.",
    )
    pin.add_argument("--config", required=True, metavar="FILE", help="the bridge's configuration")
    pin.add_argument("--pin-file", metavar="FILE", help="the pin file (default: pin_file)")
    pin.add_argument(
        "--server", action="append", metavar="NAME", help="only this server (repeatable)"
    )
    pin.add_argument("--check", action="store_true", help="compare only; write nothing")
    pin.set_defaults(run=pin_command)
    _add_admin_parser(commands)
    _add_catalog_parser(commands)
    return top


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run one command; the exit status."""
    top = parser()
    args = top.parse_args(argv)
    if args.command is None:
        top.print_help(err or sys.stderr)
        return 2
    status: int = args.run(args, out or sys.stdout, err or sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
