# -*- test-case-name: tests.test_config -*-
"""Load and validate the bridge's configuration.

Two formats are read: TOML (the bridge's own, ``[servers.NAME]`` tables plus
bridge settings) and JSON in the ``mcpServers`` shape that Claude Desktop,
Cursor and most MCP tooling use. Both become the same frozen L{BridgeConfig}.
The whole file is validated before anything starts; every error names the
file, the key, what is wrong and how to fix it. Unknown keys are errors.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs

from mcptwist.config.endpoints import _check_tls_files, check_endpoint, listener_from_string
from mcptwist.config.files import private_file_problem
from mcptwist.config.model import (
    CHILD_ERAS,
    CREDENTIAL_REFERENCE,
    DEFAULT_LISTEN,
    DEFAULT_ORIGINS,
    LOOPBACK_HOSTS,
    MIN_CLUSTER_KEY,
    NODE_ID,
    PER_PRINCIPAL,
    SHARING_MODES,
    TOOL_CHANGE_POLICIES,
    AdminConfig,
    AuditConfig,
    AuthConfig,
    BridgeConfig,
    Bucket,
    ClusterConfig,
    CommandConfig,
    ConfigError,
    EndpointConfig,
    JWTConfig,
    LimitsConfig,
    ListenerConfig,
    MetricsConfig,
    MiB,
    Network,
    RestartPolicy,
    SecretsConfig,
    ServerConfig,
    ServerLimits,
    TasksConfig,
    TelemetryConfig,
    TLSConfig,
    TokenConfig,
)
from mcptwist.mcp.naming import SEPARATOR, clashing_prefixes

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VAR_RE: Final = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")
_SIZE_RE: Final = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$", re.IGNORECASE)
_SIZE_UNITS: Final = {
    "b": 1,
    "kib": 1024,
    "mib": MiB,
    "gib": 1024 * MiB,
    "kb": 1000,
    "mb": 1000_000,
    "gb": 1000_000_000,
}
# Keys that MCP clients put in an mcpServers entry and that mean nothing to a
# bridge: accepted so that a pasted client config works, and otherwise ignored.
CLIENT_ONLY_KEYS: Final = frozenset(
    {"autoApprove", "alwaysAllow", "description", "disabledTools", "timeout"}
)


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str]) -> BridgeConfig:
    """Read, expand and validate the configuration file at C{path}.

    @raise ConfigError: on any problem, naming the file and key.
    """
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(
            source,
            "(file)",
            f"cannot be read ({e.strerror})",
            "check the path given to --config",
        ) from None
    is_json = source.endswith(".json") or raw.lstrip().startswith(b"{")
    if is_json:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(
                source, "(file)", f"is not valid JSON ({e})", "correct the JSON syntax"
            ) from None
        if not isinstance(doc, dict):
            raise ConfigError(source, "(file)", "is not a JSON object", 'use {"mcpServers": {...}}')
        doc = _from_mcp_servers_json(source, doc)
    else:
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(
                source, "(file)", f"is not valid TOML ({e})", "correct the TOML syntax"
            ) from None
    return parse_config(doc, source, environ)


def _from_mcp_servers_json(source: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Turn the C{mcpServers} JSON shape into the TOML shape."""
    unknown = sorted(set(doc) - {"mcpServers", "mcptwist"})
    if unknown:
        raise ConfigError(
            source,
            unknown[0],
            "unknown top-level key",
            'a JSON config holds "mcpServers" and optionally "mcptwist" (bridge settings); '
            "remove the other keys",
        )
    if "mcpServers" not in doc:
        raise ConfigError(
            source,
            "mcpServers",
            "missing",
            'add {"mcpServers": {"NAME": {"command": ...}}}',
        )
    settings = doc.get("mcptwist", {})
    if not isinstance(settings, dict):
        raise ConfigError(
            source,
            "mcptwist",
            "must be an object",
            "give bridge settings as a JSON object",
        )
    if "servers" in settings:
        raise ConfigError(
            source,
            "mcptwist.servers",
            "not allowed here",
            "declare servers under mcpServers",
        )
    return {**settings, "servers": doc["mcpServers"]}


T = TypeVar("T")


# Long runs of letters and digits: what a parser's message keeps of a value.
_RUN_RE: Final = re.compile(r"[A-Za-z0-9]{8,}")
_ESCAPES: Final = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quoted(value: str, quote: str) -> str:
    """C{value} as C{repr} writes it between C{quote}s (without them)."""
    out = []
    for c in value:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c == quote:
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            out.append(repr(c)[1:-1])
    return "".join(out)


class _Environment(Mapping[str, str]):
    """The bridge's environment as the loader reads it. It remembers each
    value it gives out, so that no error message repeats one: a value put in
    the configuration as C{${VAR}} may be a secret."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self.given: dict[str, str] = {}

    def __getitem__(self, key: str) -> str:
        value = self._environ[key]
        self.given[key] = value
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._environ

    def __iter__(self) -> Iterator[str]:
        return iter(self._environ)

    def __len__(self) -> int:
        return len(self._environ)

    def redact(self, error: ConfigError) -> ConfigError:
        """C{error} with every value taken from the environment written back as
        C{${VAR}}: as it is, and as C{repr} quotes it (escaped), as errors do."""
        if not self.given:
            return error
        forms = {
            form: f"${{{var}}}"
            for var, value in self.given.items()
            if value
            for form in (value, quoted(value, "'"), quoted(value, '"'))
        }
        # Longest first: a value that holds another is replaced whole.
        order = sorted(forms, key=len, reverse=True)

        def clean(text: str) -> str:
            for form in order:
                text = text.replace(form, forms[form])
            return text

        problem = clean(error.problem)
        # A parser's own message (an endpoint's, an address's) may quote a
        # value cut up or escaped its own way: if a run of it still shows,
        # the problem is not repeated at all.
        runs = {run for value in self.given.values() for run in _RUN_RE.findall(value)}
        if any(run in problem for run in runs):
            problem = "is not valid (it holds a value from the environment, not repeated here)"

        return ConfigError(error.source, clean(error.key), problem, clean(error.fix))


class _Reader:
    """Reads one table of the document, tracking which keys were used."""

    def __init__(
        self,
        source: str,
        prefix: str,
        table: Mapping[str, Any],
        environ: Mapping[str, str] | None,
    ):
        self.source = source
        self.prefix = prefix
        self.table = table
        self.environ = environ
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def error(self, name: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem, fix)

    def get(self, name: str, kind: str, convert: Callable[[Any], T], default: T, fix: str) -> T:
        self.used.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        try:
            return convert(value)
        except (TypeError, ValueError) as e:
            detail = f" ({e})" if str(e) else ""
            raise self.error(name, f"must be {kind}, not {value!r}{detail}", fix) from None

    def string(self, name: str, default: str | None = None, required: bool = False) -> str | None:
        self.used.add(name)
        if name not in self.table:
            if required:
                raise self.error(name, "missing", f'add {name} = "..."')
            return default
        value = self.table[name]
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, not {value!r}", f'write {name} = "..."')
        return self.expand(name, value)

    def strings(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        self.used.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(
                name,
                f"must be a list of strings, not {value!r}",
                f'write {name} = ["...", "..."]',
            )
        return tuple(self.expand(f"{name}[{i}]", v) for i, v in enumerate(value))

    def boolean(self, name: str, default: bool) -> bool:
        return self.get(
            name,
            "true or false",
            _bool,
            default,
            f"write {name} = true or {name} = false",
        )

    def number(self, name: str, default: float) -> float:
        return self.get(
            name,
            "a positive number of seconds",
            _seconds,
            default,
            f"write {name} = a number such as {default:g}",
        )

    def integer(self, name: str, default: int, minimum: int = 1) -> int:
        return self.get(
            name,
            f"a whole number of at least {minimum}",
            lambda v: _whole(v, minimum),
            default,
            f"write {name} = a whole number such as {default}",
        )

    def size(self, name: str, default: int) -> int:
        return self.get(
            name,
            'a size in bytes (a number, or a string such as "16MiB")',
            _size,
            default,
            f'write {name} = "{_size_text(default)}" or a number of bytes',
        )

    def table_at(self, name: str) -> Mapping[str, Any]:
        self.used.add(name)
        value = self.table.get(name, {})
        if not isinstance(value, dict):
            raise self.error(
                name,
                f"must be a table, not {value!r}",
                f"write [{self.key(name)}] as a table",
            )
        return value

    def expand(self, name: str, value: str) -> str:
        """C{value} with C{${VAR}} taken from the environment; as it is when
        there is none to take them from (what arrives over HTTP)."""
        environ = self.environ
        if environ is None:
            return value

        def replace(match: re.Match[str]) -> str:
            if match.group(1) == "$":
                return "$"
            var, default = match.group(2), match.group(3)
            if var in environ:
                return environ[var]
            if default is not None:
                return default
            raise self.error(
                name,
                f"refers to ${{{var}}}, which is not set in the bridge's environment",
                f"export {var} before starting the bridge, or write ${{{var}:-default}}",
            )

        return _VAR_RE.sub(replace, value)

    def finish(self, ignored: frozenset[str] = frozenset()) -> None:
        for name in self.table:
            if name not in self.used and name not in ignored:
                raise self.error(
                    name,
                    "unknown key",
                    f"remove it or check its spelling ({_suggest(name, self.used)})",
                )


def _suggest(name: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"did you mean {close[0]}?" if close else "see docs/configuration.md for every key"


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError()
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError()
    if not 0 < value < float("inf"):
        raise ValueError()
    return float(value)


def _whole(value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError()
    if value < minimum:
        raise ValueError()
    return value


def _size_text(size: int) -> str:
    """A size as the configuration writes it: C{"16MiB"}, C{"64KiB"}."""
    return f"{size // MiB}MiB" if size % MiB == 0 else f"{size // 1024}KiB"


def _size(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError()
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        number = int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]
    else:
        raise TypeError()
    if number < 1024:
        raise ValueError("at least 1KiB")
    return number


def parse_config(doc: Mapping[str, Any], source: str, environ: Mapping[str, str]) -> BridgeConfig:
    """Validate a parsed document (TOML shape) into a L{BridgeConfig}.

    @raise ConfigError: naming the key; no value taken from C{environ} is in it.
    """
    reading = _Environment(environ)
    try:
        return _parse_config(doc, source, reading)
    except ConfigError as e:
        raise reading.redact(e) from None


def _parse_config(doc: Mapping[str, Any], source: str, environ: Mapping[str, str]) -> BridgeConfig:
    top = _Reader(source, "", doc, environ)
    listen = top.strings("listen", () if "listeners" in doc else (DEFAULT_LISTEN,))
    listeners = [listener_from_string(source, f"listen[{i}]", d) for i, d in enumerate(listen)]
    listeners += _parse_listeners(top)
    if not listeners:
        raise top.error(
            "listen",
            "is empty",
            f'give at least one endpoint, such as "{DEFAULT_LISTEN}"',
        )
    auth = _parse_auth(top)
    origins = top.strings("allowed_origins", DEFAULT_ORIGINS)
    for i, origin in enumerate(origins):
        if not re.match(r"^https?://[^/\s]+$", origin):
            raise top.error(
                f"allowed_origins[{i}]",
                f"{origin!r} is not an origin",
                'write scheme://host[:port] with no path, such as "https://app.example.com" '
                'or "http://localhost:*"',
            )
    defaults = BridgeConfig(servers={})
    insecure = top.boolean("insecure", defaults.insecure)
    # With authentication, DNS rebinding gains an attacker nothing: a browser
    # does not send bearer tokens on its own. Without it, only the names of
    # loopback are answered, even where insecure opens the listeners: the
    # names the bridge is reached by elsewhere are listed in allowed_hosts.
    hosts = _hosts(top, ("*",) if auth.enabled else LOOPBACK_HOSTS)
    settings = {
        "insecure": insecure,
        "allowed_hosts": hosts,
        "heartbeat_interval": top.number("heartbeat_interval", defaults.heartbeat_interval),
        "stream_buffer": top.size("stream_buffer", defaults.stream_buffer),
        "replay_events": top.integer("replay_events", defaults.replay_events, minimum=0),
        "max_sessions": top.integer("max_sessions", defaults.max_sessions),
        "access_log": top.boolean("access_log", defaults.access_log),
        "limits": _parse_limits(top),
        "audit": _parse_audit(top),
        # A metrics listener asks for no credentials: authentication does not
        # make DNS rebinding harmless there.
        "metrics": _parse_metrics(top, hosts if "allowed_hosts" in doc else LOOPBACK_HOSTS),
        "admin": _parse_admin(top),
        "drain_timeout": top.number("drain_timeout", defaults.drain_timeout),
    }
    servers_table = top.table_at("servers")
    endpoints_table = top.table_at("endpoints")
    pin_file = top.string("pin_file")
    secrets = _parse_secrets(top)
    cluster = _parse_cluster(top)
    telemetry = _parse_telemetry(top)
    tasks = _parse_tasks(top)
    top.finish()
    if not servers_table:
        raise ConfigError(
            source,
            "servers",
            "no MCP server is configured",
            'add a [servers.NAME] table with command = "..." (TOML) or an mcpServers entry (JSON)',
        )
    servers: dict[str, ServerConfig] = {}
    for name, table in servers_table.items():
        server = _checked_server(source, name, table, environ, auth.enabled)
        if server is not None:
            servers[name] = server
    if not servers:
        raise ConfigError(
            source, "servers", "every server is disabled", "enable at least one server"
        )
    for server in servers.values():
        _check_credentials(source, server, secrets)
    if auth.jwt is not None:
        _check_server_names(
            source, "auth.jwt.default_servers", auth.jwt.default_servers, servers_table
        )
    for token in auth.tokens:
        _check_server_names(
            source, f"auth.tokens[{token.name}].servers", token.servers, servers_table
        )
    return BridgeConfig(
        servers=servers,
        endpoints=_parse_endpoints(top, endpoints_table, servers),
        pin_file=pin_file,
        secrets=secrets,
        cluster=cluster,
        telemetry=telemetry,
        tasks=tasks,
        listeners=tuple(listeners),
        auth=auth,
        allowed_origins=origins,
        source=source,
        **settings,  # type: ignore[arg-type]
    )


def _parse_cluster(top: _Reader) -> ClusterConfig | None:
    """[cluster]: this node's id, the cluster's keys, its Redis and its address."""
    if "cluster" not in top.table:
        top.used.add("cluster")
        return None
    r = _Reader(top.source, "cluster.", top.table_at("cluster"), top.environ)
    node = r.string("node_id")
    if node is None:
        node = socket.gethostname().split(".")[0]
        if not NODE_ID.match(node):
            raise r.error(
                "node_id",
                f"is not given, and this host's name {node!r} cannot be one",
                'write node_id = "n1": letters, digits, "-" and "_" (at most 63)',
            )
    elif not NODE_ID.match(node):
        raise r.error(
            "node_id",
            f"{node!r} is not a node id",
            'write node_id = "n1": letters, digits, "-" and "_" (at most 63), no dot',
        )
    keys = r.strings("keys")
    if not keys:
        raise r.error(
            "keys",
            "is missing: the nodes sign session ids with a key they share",
            'add keys = ["${MCPTWIST_CLUSTER_KEY}"], the same on every node; make one with '
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'",
        )
    for i, key in enumerate(keys):
        if len(key) < MIN_CLUSTER_KEY:
            raise r.error(
                f"keys[{i}]",
                f"is {len(key)} characters long, fewer than {MIN_CLUSTER_KEY}",
                "use a random key: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'",
            )
    redis = r.string("redis")
    if redis is not None:
        problem = redis_url_problem(redis)
        if problem is not None:
            raise r.error(
                "redis",
                problem,
                'write redis = "redis://HOST:6379/0" (a password as redis://:PASSWORD@HOST)',
            )
    advertise = r.string("advertise")
    if advertise is not None:
        parsed = urllib.parse.urlsplit(advertise)
        if (
            parsed.scheme not in ("http", "https")
            or not parsed.hostname
            or parsed.path not in ("", "/")
        ):
            raise r.error(
                "advertise",
                f"{advertise!r} is not the base URL of this node",
                'write advertise = "http://10.0.0.1:8080" (scheme, host and port, no path)',
            )
        advertise = advertise.rstrip("/")
    elif redis is not None:
        raise r.error(
            "advertise",
            "is missing: with redis, the other nodes forward requests to this node at this URL",
            'add advertise = "http://THIS-HOST:PORT" (a listener of this node the others can reach)',
        )
    defaults = ClusterConfig(node_id="n", keys=(b"",))
    heartbeat = r.number("heartbeat", defaults.heartbeat)
    node_ttl = r.number("node_ttl", defaults.node_ttl)
    if node_ttl <= heartbeat * 2:
        raise r.error(
            "node_ttl",
            f"{node_ttl:g}s is not more than two heartbeats ({heartbeat:g}s each)",
            f"write node_ttl = {heartbeat * 5:g} or more",
        )
    timeout = r.number("redis_timeout", defaults.redis_timeout)
    r.finish()
    return ClusterConfig(
        node_id=node,
        keys=tuple(k.encode() for k in keys),
        redis=redis,
        advertise=advertise,
        heartbeat=heartbeat,
        node_ttl=node_ttl,
        redis_timeout=timeout,
    )


def _parse_telemetry(top: _Reader) -> TelemetryConfig | None:
    """[telemetry]: where traces go, how many, and what they say of the bridge."""
    if "telemetry" not in top.table:
        top.used.add("telemetry")
        return None
    r = _Reader(top.source, "telemetry.", top.table_at("telemetry"), top.environ)
    defaults = TelemetryConfig()
    if not r.boolean("enabled", True):
        r.finish(frozenset(r.table))
        return None
    endpoint = r.string("endpoint")
    if endpoint is not None:
        parsed = urllib.parse.urlsplit(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise r.error(
                "endpoint",
                f"{endpoint!r} is not an OTLP/HTTP URL",
                'write endpoint = "http://collector:4318" (OTLP over HTTP; '
                "/v1/traces and /v1/metrics are added)",
            )
        endpoint = endpoint.rstrip("/")
    sampling: float | None = None
    if "sampling" in r.table:
        sampling = r.get(
            "sampling",
            "a ratio from 0 to 1",
            _ratio,
            1.0,
            "write sampling = 0.1 to record one trace in ten, or 1 for all of them",
        )
    telemetry = TelemetryConfig(
        endpoint=endpoint,
        headers=_strings_table(r, "headers"),
        sampling=sampling,
        service_name=r.string("service_name"),
        resource=_strings_table(r, "resource"),
        timeout=r.number("timeout", defaults.timeout),
        metrics_interval=r.number("metrics_interval", defaults.metrics_interval),
    )
    r.finish()
    return telemetry


def _parse_tasks(top: _Reader) -> TasksConfig:
    """[tasks]: durable tasks for 2026-07-28 clients, and their bounds."""
    r = _Reader(top.source, "tasks.", top.table_at("tasks"), top.environ)
    d = TasksConfig()
    tasks = TasksConfig(
        enabled=r.boolean("enabled", d.enabled),
        ttl=r.number("ttl", d.ttl),
        max_tasks=r.integer("max_tasks", d.max_tasks),
        max_tasks_per_principal=r.integer("max_tasks_per_principal", d.max_tasks_per_principal),
        max_result_size=r.size("max_result_size", d.max_result_size),
        poll_interval=r.number("poll_interval", d.poll_interval),
    )
    r.finish()
    if tasks.ttl < tasks.poll_interval:
        raise r.error(
            "ttl",
            f"({tasks.ttl:g}) is shorter than poll_interval ({tasks.poll_interval:g})",
            "keep tasks longer than a client waits between two looks at them",
        )
    if tasks.max_tasks_per_principal > tasks.max_tasks:
        raise r.error(
            "max_tasks_per_principal",
            f"({tasks.max_tasks_per_principal}) is more than max_tasks ({tasks.max_tasks})",
            "lower max_tasks_per_principal, or raise max_tasks",
        )
    return tasks


def _strings_table(r: _Reader, name: str) -> dict[str, str]:
    """A table of strings (C{${VAR}} expanded), such as headers or attributes."""
    found: dict[str, str] = {}
    for key, value in r.table_at(name).items():
        if not isinstance(value, str):
            raise r.error(
                f"{name}.{key}",
                f"must be a string, not {value!r}",
                f'write {key} = "{value}"',
            )
        found[key] = r.expand(f"{name}.{key}", value)
    return found


def _ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError
    if not 0.0 <= value <= 1.0:
        raise ValueError("outside 0 to 1")
    return float(value)


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a redis:// URL, if anything (never repeating it: it may hold a password)."""
    try:
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port
    except ValueError:
        return "is not a URL"
    if parsed.scheme != "redis":
        return "must start with redis://"
    if not parsed.hostname:
        return "names no host"
    if port is not None and not 0 < port < 65536:
        return "has no valid port"
    db = parsed.path.lstrip("/")
    if db and not db.isdigit():
        return "names a database that is not a number"
    if parsed.query or parsed.fragment:
        return "has a query or fragment, which are not taken"
    return None


def _parse_secrets(top: _Reader) -> SecretsConfig:
    """[secrets]: one file keyed by principal id, or a directory of one file each."""
    r = _Reader(top.source, "secrets.", top.table_at("secrets"), top.environ)
    file, directory = r.string("file"), r.string("directory")
    r.finish()
    if file is not None and directory is not None:
        raise r.error(
            "directory", "is given with file", "keep one: file (keyed by principal) or directory"
        )
    problem = private_file_problem(file) if file is not None else None
    if problem is not None:
        raise r.error("file", f"{file!r} {problem[0]}", problem[1])
    if directory is not None and not os.path.isdir(directory):
        raise r.error(
            "directory", f"{directory!r} is not a directory", "give an existing directory"
        )
    return SecretsConfig(file, directory)


def _check_credentials(source: str, server: ServerConfig, secrets: SecretsConfig) -> None:
    """A value that differs by principal needs a child per principal, and a
    secret needs somewhere to come from."""
    for var, value in server.env.items():
        for match in CREDENTIAL_REFERENCE.finditer(value):
            kind, name = match.group(1), match.group(2)
            key = f"servers.{server.name}.env.{var}"
            if kind in PER_PRINCIPAL and server.sharing != "principal":
                raise ConfigError(
                    source,
                    key,
                    f"refers to ${{{kind}:{name}}}, which differs from one client to another, "
                    f"but the server's children are {server.sharing!r}",
                    'set sharing = "principal" (a child per client)',
                )
            if kind == "secret" and secrets.file is None and secrets.directory is None:
                raise ConfigError(
                    source,
                    key,
                    f"refers to ${{secret:{name}}}, but no secrets are configured",
                    "add [secrets] file = PATH (a table per principal) or directory = PATH",
                )


def _check_server_names(
    source: str, key: str, names: frozenset[str], servers: Mapping[str, Any]
) -> None:
    """Every name in C{names} (a list of servers, C{"*"} for all, or
    C{"SERVER/TOOL"} for some tools of one) is a server of the file, disabled
    ones included."""
    unknown = sorted({n.partition("/")[0] for n in names} - {"*"} - set(servers))
    if unknown:
        last = key.rpartition(".")[2]
        raise ConfigError(
            source,
            key,
            f"names {unknown[0]!r}, which is not a configured server",
            f'name configured servers, or write {last} = ["*"] for all',
        )


def parse_server(
    source: str,
    name: str,
    table: Mapping[str, Any],
    environ: Mapping[str, str] | None,
    *,
    authenticated: bool = True,
) -> ServerConfig | None:
    """One C{[servers.NAME]} table (None when disabled).

    C{${VAR}} is expanded from C{environ}; with None (a table that came over
    HTTP) nothing is expanded. C{authenticated}: whether the bridge asks for
    credentials, which turns C{stderr_in_errors} off unless the table sets it.
    """
    if environ is None:
        return _checked_server(source, name, table, None, authenticated)
    reading = _Environment(environ)
    try:
        return _checked_server(source, name, table, reading, authenticated)
    except ConfigError as e:
        raise reading.redact(e) from None


def _checked_server(
    source: str,
    name: str,
    table: Mapping[str, Any],
    environ: Mapping[str, str] | None,
    authenticated: bool,
) -> ServerConfig | None:
    if not _NAME_RE.match(name):
        raise ConfigError(
            source,
            f"servers.{name}",
            "is not a usable server name (it becomes part of the URL)",
            "use letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64",
        )
    if not isinstance(table, dict):
        raise ConfigError(
            source,
            f"servers.{name}",
            "must be a table",
            f'write [servers.{name}] with command = "..."',
        )
    return _parse_server(source, name, table, environ, authenticated)


def _parse_server(
    source: str,
    name: str,
    table: Mapping[str, Any],
    environ: Mapping[str, str] | None,
    authenticated: bool,
) -> ServerConfig | None:
    r = _Reader(source, f"servers.{name}.", table, environ)
    if r.boolean("disabled", False):
        return None
    kind = r.string("type", "stdio")
    if kind != "stdio":
        raise r.error(
            "type",
            f"{kind!r} servers cannot be bridged (mcptwist runs stdio servers as child processes)",
            'remove this server, or give it a command to run (type = "stdio")',
        )
    if "url" in table:
        raise r.error(
            "url",
            "remote servers are not bridged",
            "give a command to run instead of a url",
        )
    command = _command(r)
    env = _env(r)
    sharing = r.string("sharing", "shared")
    if sharing not in SHARING_MODES:
        raise r.error(
            "sharing",
            f"{sharing!r} is not a sharing mode",
            'write sharing = "shared" (one child for all), "session" (a child per session) '
            'or "principal" (a child per authenticated client)',
        )
    era = r.string("era", "legacy")
    if era not in CHILD_ERAS:
        raise r.error(
            "era",
            f"{era!r} is not what a server can speak",
            'write era = "legacy" (the session era only; the bridge translates for '
            '2026-07-28 clients), "dual" (the server speaks both) or "modern" '
            "(only 2026-07-28; the bridge translates for session-era clients)",
        )
    defaults = ServerConfig(name=name, command=command)
    restart_table = r.table_at("restart")
    rr = _Reader(source, f"servers.{name}.restart.", restart_table, environ)
    rd = RestartPolicy()
    restart = RestartPolicy(
        initial_delay=rr.number("initial_delay", rd.initial_delay),
        max_delay=rr.number("max_delay", rd.max_delay),
        crash_limit=rr.integer("crash_limit", rd.crash_limit),
        crash_window=rr.number("crash_window", rd.crash_window),
        cooldown=rr.number("cooldown", rd.cooldown),
    )
    rr.finish()
    server = ServerConfig(
        name=name,
        command=command,
        args=r.strings("args"),
        env=env,
        env_passthrough=r.strings("env_passthrough"),
        cwd=r.string("cwd"),
        written=_written(table),
        sharing=sharing or "shared",
        max_message_size=r.size("max_message_size", defaults.max_message_size),
        request_timeout=r.number("request_timeout", defaults.request_timeout),
        max_request_timeout=r.number("max_request_timeout", defaults.max_request_timeout),
        term_after=r.number("term_after", defaults.term_after),
        kill_after=r.number("kill_after", defaults.kill_after),
        stderr_lines=r.integer("stderr_lines", defaults.stderr_lines, minimum=0),
        # Its clients may be strangers to each other once they authenticate.
        stderr_in_errors=r.boolean("stderr_in_errors", not authenticated),
        max_children=r.integer("max_children", defaults.max_children),
        max_children_per_principal=(
            r.integer("max_children_per_principal", max(1, defaults.max_children // 4))
            if "max_children_per_principal" in r.table
            else None
        ),
        session_idle_timeout=r.number("session_idle_timeout", defaults.session_idle_timeout),
        child_idle_timeout=r.number("child_idle_timeout", defaults.child_idle_timeout),
        startup_timeout=r.number("startup_timeout", defaults.startup_timeout),
        unresponsive_after=r.integer("unresponsive_after", defaults.unresponsive_after, minimum=0),
        restart_unresponsive=r.boolean("restart_unresponsive", defaults.restart_unresponsive),
        json_response=r.boolean("json_response", defaults.json_response),
        input_timeout=r.number("input_timeout", defaults.input_timeout),
        era=era or "legacy",
        restart=restart,
        allow=_networks(r, "allow"),
        deny=_networks(r, "deny"),
        limits=_parse_server_limits(r),
        audit_arguments=r.boolean("audit_arguments", defaults.audit_arguments),
        trace_arguments=r.boolean("trace_arguments", defaults.trace_arguments),
        include=r.strings("include"),
        exclude=r.strings("exclude"),
        on_tool_change=_tool_change(r),
        task_tools=r.strings("task_tools"),
        task_after_input=r.strings("task_after_input"),
    )
    r.finish(ignored=CLIENT_ONLY_KEYS)
    if server.max_request_timeout < server.request_timeout:
        raise r.error(
            "max_request_timeout",
            f"({server.max_request_timeout:g}) is shorter than request_timeout ({server.request_timeout:g})",
            "make max_request_timeout at least as long as request_timeout",
        )
    if server.restart_unresponsive and server.unresponsive_after == 0:
        raise r.error(
            "restart_unresponsive",
            "is true, but unresponsive_after = 0 never finds a child unresponsive",
            "set unresponsive_after to the number of timed-out requests in a row "
            "that justify a restart (such as 3), or remove restart_unresponsive",
        )
    per_principal = server.max_children_per_principal
    if per_principal is not None and per_principal > server.max_children:
        raise r.error(
            "max_children_per_principal",
            f"({per_principal}) is more than max_children ({server.max_children})",
            "lower max_children_per_principal, or raise max_children",
        )
    _check_cwd(r, server.cwd)
    return server


def _tool_change(r: _Reader) -> str:
    policy = r.string("on_tool_change", "warn")
    if policy not in TOOL_CHANGE_POLICIES:
        raise r.error(
            "on_tool_change",
            f"{policy!r} is not a policy",
            'write on_tool_change = "warn" (log, audit and count it), "hide" (the tool '
            'is hidden until it is pinned again) or "block" (the server is marked unhealthy)',
        )
    return policy or "warn"


# What a separator may be made of: characters a tool name may hold.
_SEPARATOR_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,8}$")


def _parse_endpoints(
    top: _Reader, tables: Mapping[str, Any], servers: Mapping[str, ServerConfig]
) -> dict[str, EndpointConfig]:
    """The C{[endpoints.NAME]} tables: several servers served at one URL."""
    endpoints: dict[str, EndpointConfig] = {}
    for name, table in tables.items():
        key = f"endpoints.{name}"
        if not _NAME_RE.match(name):
            raise top.error(
                key,
                "is not a usable endpoint name (it becomes part of the URL)",
                "use letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64",
            )
        if not isinstance(table, dict):
            raise top.error(key, "must be a table", f'write [{key}] with servers = ["..."]')
        endpoint = _parse_endpoint(top, name, table, servers)
        if endpoint is not None:
            endpoints[name] = endpoint
    return endpoints


def _parse_endpoint(
    top: _Reader, name: str, table: Mapping[str, Any], servers: Mapping[str, ServerConfig]
) -> EndpointConfig | None:
    r = _Reader(top.source, f"endpoints.{name}.", table, top.environ)
    if r.boolean("disabled", False):
        return None
    members = r.strings("servers")
    if not members:
        raise r.error(
            "servers", "names no server", 'list the servers it serves, such as ["github", "time"]'
        )
    for i, member in enumerate(members):
        if member not in top.table_at("servers"):
            known = ", ".join(sorted(servers)) or "none"
            raise r.error(
                f"servers[{i}]",
                f"{member!r} is not a server of this file",
                f"name a [servers.NAME] table (servers: {known})",
            )
        if members.index(member) != i:
            raise r.error(f"servers[{i}]", f"names {member!r} twice", "list each server once")
    # A disabled member is left out, as it is everywhere else.
    enabled = tuple(m for m in members if m in servers)
    if not enabled:
        return None
    separator = r.string("separator", SEPARATOR) or SEPARATOR
    if not _SEPARATOR_RE.match(separator):
        raise r.error(
            "separator",
            f"{separator!r} cannot join a prefix and a tool name",
            'use one to eight letters, digits, "_", "." or "-", such as "__" (the default) or "."',
        )
    prefixes = _prefixes(r, enabled, separator)
    rename = _rename(r, enabled, prefixes, separator)
    defaults = EndpointConfig(name=name, servers=enabled, prefixes=prefixes)
    endpoint = EndpointConfig(
        name=name,
        servers=enabled,
        prefixes=prefixes,
        separator=separator,
        include=r.strings("include"),
        exclude=r.strings("exclude"),
        rename=rename,
        page_size=r.integer("page_size", defaults.page_size),
        json_response=r.boolean("json_response", defaults.json_response),
        session_idle_timeout=r.number("session_idle_timeout", defaults.session_idle_timeout),
        list_timeout=r.number("list_timeout", defaults.list_timeout),
    )
    r.finish()
    return endpoint


def _prefixes(r: _Reader, members: tuple[str, ...], separator: str) -> dict[str, str]:
    """Each member's prefix: its name, unless C{prefix} says otherwise."""
    given = r.table.get("prefix")
    r.used.add("prefix")
    if given is None:
        prefixes = {m: m for m in members}
    elif given == "none":
        if len(members) != 1:
            raise r.error(
                "prefix",
                f'"none" shows names as they are, and the names of {len(members)} servers '
                "could clash",
                'keep prefix = "none" for endpoints of one server, or give each server a '
                'prefix (prefix.SERVER = "...")',
            )
        return {members[0]: ""}
    elif isinstance(given, dict):
        prefixes = {m: m for m in members}
        for server, prefix in given.items():
            if server not in members:
                raise r.error(
                    f"prefix.{server}",
                    f"{server!r} is not one of this endpoint's servers",
                    f"name one of {', '.join(members)}",
                )
            if not isinstance(prefix, str) or not _NAME_RE.match(prefix):
                raise r.error(
                    f"prefix.{server}",
                    f"{prefix!r} is not a usable prefix",
                    "use letters, digits, '.', '_' and '-', starting with a letter or digit",
                )
            prefixes[server] = prefix
    else:
        raise r.error(
            "prefix",
            f'must be "none" or a table of prefixes, not {given!r}',
            'write prefix = "none" (one server), or prefix.SERVER = "short" for each '
            "server whose prefix is not its name",
        )
    clash = clashing_prefixes(prefixes, separator)
    if clash is not None:
        first, second = clash
        raise r.error(
            "prefix",
            f"the names of {first!r} (prefix {prefixes[first]!r}) and {second!r} (prefix "
            f"{prefixes[second]!r}) could be confused",
            "give each server a prefix that does not begin another's",
        )
    return prefixes


def _rename(
    r: _Reader, members: tuple[str, ...], prefixes: Mapping[str, str], separator: str
) -> dict[tuple[str, str], str]:
    """C{rename."SERVER/NAME" = "shown"}: explicit names, each unique and
    outside every prefix's names (so no other name can take it)."""
    rename: dict[tuple[str, str], str] = {}
    shown_by: dict[str, str] = {}
    for source, shown in r.table_at("rename").items():
        key = f"rename.{source}"
        server, slash, tool = source.partition("/")
        if not slash or server not in members or not tool:
            raise r.error(
                key,
                "does not name a tool of this endpoint's servers",
                'write rename."SERVER/TOOL" = "new_name", with SERVER one of ' + ", ".join(members),
            )
        if not isinstance(shown, str) or not re.match(r"^[A-Za-z0-9_.-]{1,128}$", shown):
            raise r.error(
                key,
                f"{shown!r} is not a usable name",
                "use 1 to 128 letters, digits, '_', '.' and '-'",
            )
        if shown in shown_by:
            raise r.error(
                key,
                f"gives {shown!r}, which rename.{shown_by[shown]} gives already",
                "give each tool a name of its own",
            )
        taken = next((p for p in prefixes.values() if p and shown.startswith(p + separator)), None)
        if taken is not None:
            raise r.error(
                key,
                f"{shown!r} begins with {taken + separator!r}, the prefix of another server's names",
                "choose a name outside every server's prefix",
            )
        shown_by[shown] = source
        rename[(server, tool)] = shown
    return rename


def _command(r: _Reader) -> str:
    command = r.string("command", required=True)
    assert command is not None
    if not command.strip():
        raise r.error("command", "is empty", 'name the program to run, such as "npx" or "uvx"')
    return command


def _env(r: _Reader) -> dict[str, str]:
    return _strings_table(r, "env")


def _check_cwd(r: _Reader, cwd: str | None) -> None:
    if cwd is not None and not os.path.isdir(cwd):
        raise r.error(
            "cwd", f"{cwd!r} is not a directory", "give an existing directory, or remove cwd"
        )


# The keys that say what a server runs: only a configuration file may set them.
RUN_KEYS: Final = ("command", "args", "env", "env_passthrough", "cwd")
ADMIN_SOURCE: Final = "admin API"


def _parse_admin(top: _Reader) -> AdminConfig:
    r = _Reader(top.source, "admin.", top.table_at("admin"), top.environ)
    enabled = r.boolean("enabled", True)
    tables = r.table_at("commands")
    r.finish()
    commands: dict[str, CommandConfig] = {}
    for name, table in tables.items():
        key = f"admin.commands.{name}"
        if not _NAME_RE.match(name):
            raise top.error(
                key,
                "is not a usable command name",
                "use letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64",
            )
        if not isinstance(table, dict):
            raise top.error(key, "must be a table", f'write [{key}] with command = "..."')
        c = _Reader(top.source, key + ".", table, top.environ)
        command = CommandConfig(
            name=name,
            command=_command(c),
            args=c.strings("args"),
            env=_env(c),
            env_passthrough=c.strings("env_passthrough"),
            cwd=c.string("cwd"),
            written=_written(table),
        )
        c.finish()
        _check_cwd(c, command.cwd)
        commands[name] = command
    return AdminConfig(enabled=enabled, commands=commands)


def requested_server(
    name: str,
    table: Mapping[str, Any],
    commands: Mapping[str, CommandConfig],
    *,
    authenticated: bool = True,
) -> ServerConfig | None:
    """A server asked for over HTTP (the admin API), None if disabled.

    Its C{command} names one of the configuration's C{[admin.commands]}, which
    decides what runs; the request may set how it is run (sharing, timeouts,
    limits...), nothing else. Nothing in it is expanded.
    """
    source = ADMIN_SOURCE
    if not isinstance(table, dict):
        return parse_server(source, name, table, None)  # refuses it, naming the key
    for key in RUN_KEYS[1:]:
        if key in table:
            raise ConfigError(
                source,
                f"servers.{name}.{key}",
                "cannot be given over HTTP: what a server runs comes from the configuration file",
                "write it in an [admin.commands.NAME] table of the configuration file, "
                'and send "command": "NAME"',
            )
    choice = table.get("command")
    allowed = ", ".join(sorted(commands))
    if not isinstance(choice, str) or choice not in commands:
        raise ConfigError(
            source,
            f"servers.{name}.command",
            "does not name a command of the configuration's [admin.commands]"
            if "command" in table
            else "missing",
            f'send "command": one of {allowed}',
        )
    chosen = commands[choice]
    server = parse_server(
        source, name, {**table, "command": chosen.command}, None, authenticated=authenticated
    )
    if server is None:
        return None
    return attrs.evolve(
        server,
        args=chosen.args,
        env=chosen.env,
        env_passthrough=chosen.env_passthrough,
        cwd=chosen.cwd,
        written=chosen.written,
    )


def _written(table: Mapping[str, Any]) -> dict[str, Any]:
    """What a table says runs (command, args, cwd), as written: unexpanded."""
    written: dict[str, Any] = {}
    for key in ("command", "cwd"):
        if isinstance(table.get(key), str):
            written[key] = table[key]
    args = table.get("args")
    if isinstance(args, list) and all(isinstance(a, str) for a in args):
        written["args"] = list(args)
    return written


def _networks(r: _Reader, name: str) -> tuple[Network, ...]:
    from mcptwist.config.networks import parse_networks

    values = r.strings(name)
    try:
        return parse_networks(values)
    except ValueError as e:
        raise r.error(
            name,
            f"is not a list of addresses or networks ({e})",
            f'write {name} = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]',
        ) from None


def _parse_listeners(top: _Reader) -> list[ListenerConfig]:
    top.used.add("listeners")
    tables = top.table.get("listeners", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise top.error(
            "listeners",
            "must be a list of tables",
            'write [[listeners]] tables, each with endpoint = "..."',
        )
    listeners = []
    for i, table in enumerate(tables):
        r = _Reader(top.source, f"listeners[{i}].", table, top.environ)
        endpoint = r.string("endpoint", required=True)
        assert endpoint is not None
        if endpoint.startswith("ssl:"):
            raise r.error(
                "endpoint",
                "an ssl: endpoint inside [[listeners]]",
                "give a plain endpoint (tcp:, tcp6:, unix:, systemd:) and tls = {...}",
            )
        check_endpoint(top.source, r.key("endpoint"), endpoint)
        tls = None
        tls_table = r.table_at("tls")
        if "tls" in table:
            t = _Reader(top.source, f"listeners[{i}].tls.", tls_table, top.environ)
            certificate = t.string("certificate", required=True)
            assert certificate is not None
            min_version = t.string("min_version", "1.2")
            if min_version not in ("1.2", "1.3"):
                raise t.error(
                    "min_version", f"{min_version!r} is not offered", 'write "1.2" or "1.3"'
                )
            tls = TLSConfig(
                certificate=certificate,
                key=t.string("key", certificate) or certificate,
                chain=t.string("chain"),
                min_version=min_version or "1.2",
                hsts_max_age=t.integer("hsts_max_age", 31_536_000, minimum=0),
            )
            t.finish()
            _check_tls_files(top.source, r.key("tls"), tls)
        unix_peers = r.string("unix_peers", "allow")
        if unix_peers not in ("allow", "deny"):
            raise r.error(
                "unix_peers",
                f"{unix_peers!r} is not a policy",
                'write unix_peers = "allow" (file permissions decide) or "deny"',
            )
        listener = ListenerConfig(
            endpoint=endpoint,
            tls=tls,
            allow=_networks(r, "allow"),
            deny=_networks(r, "deny"),
            trusted_proxies=_networks(r, "trusted_proxies"),
            proxy_protocol=r.boolean("proxy_protocol", False),
            unix_peers=unix_peers or "allow",
        )
        r.finish()
        if listener.proxy_protocol and not listener.trusted_proxies:
            raise r.error(
                "proxy_protocol",
                "is on, but no trusted_proxies are given (anyone could claim any address)",
                'list the proxies\' addresses in trusted_proxies = ["10.0.0.2"]',
            )
        listeners.append(listener)
    return listeners


def _parse_auth(top: _Reader) -> AuthConfig:
    from mcptwist.config.keys import parse_digest

    table = top.table_at("auth")
    r = _Reader(top.source, "auth.", table, top.environ)
    r.used.add("tokens")
    token_tables = table.get("tokens", [])
    if not isinstance(token_tables, list) or not all(isinstance(t, dict) for t in token_tables):
        raise r.error(
            "tokens",
            "must be a list of tables",
            "write [[auth.tokens]] tables; generate each with python -m mcptwist token",
        )
    tokens: list[TokenConfig] = []
    for i, t in enumerate(token_tables):
        tr = _Reader(top.source, f"auth.tokens[{i}].", t, top.environ)
        name = tr.string("name", required=True)
        assert name is not None
        if any(token.name == name for token in tokens):
            raise tr.error("name", f"{name!r} is used twice", "give every token its own name")
        digest_text = tr.string("hash", required=True)
        assert digest_text is not None
        try:
            digest = parse_digest(digest_text)
        except ValueError as e:
            raise tr.error(
                "hash", str(e), "generate a token with: python -m mcptwist token"
            ) from None
        if any(token.digest == digest for token in tokens):
            raise tr.error("hash", "is the same as another token's", "generate a new token")
        token_servers = tr.strings("servers", ("*",))
        tokens.append(
            TokenConfig(
                name=name,
                digest=digest,
                servers=frozenset(token_servers),
                admin=tr.boolean("admin", False),
            )
        )
        tr.finish()
    jwt = None
    jwt_table = r.table_at("jwt")
    if jwt_table:
        jwt = _parse_jwt(_Reader(top.source, "auth.jwt.", jwt_table, top.environ))
    resource_url = r.string("resource_url")
    if resource_url is not None and not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", resource_url):
        raise r.error(
            "resource_url",
            f"{resource_url!r} is not an http(s) URL without query or fragment",
            'write the URL clients use to reach the bridge, such as "https://mcp.example.com"',
        )
    authorization_servers = r.strings("authorization_servers")
    for i, server in enumerate(authorization_servers):
        if not _safe_jwks_url(server) or not server.startswith("https://"):
            raise r.error(
                f"authorization_servers[{i}]",
                f"{server!r} is not an https URL",
                'write the issuer URL of your identity provider, such as "https://auth.example.com"',
            )
    auth = AuthConfig(
        tokens=tuple(tokens),
        jwt=jwt,
        resource_url=resource_url.rstrip("/") if resource_url else None,
        authorization_servers=authorization_servers,
    )
    r.finish()
    if auth.authorization_servers and auth.resource_url is None:
        raise r.error(
            "resource_url",
            "is missing: OAuth metadata must name the bridge's public URL "
            "(it is not taken from the request's Host header)",
            'write resource_url = "https://mcp.example.com" (the URL clients use)',
        )
    if auth.jwt is not None and not auth.authorization_servers:
        raise r.error(
            "authorization_servers",
            "is missing: OAuth clients must learn where to get tokens for this bridge",
            'write authorization_servers = ["https://auth.example.com"] (the JWT issuer)',
        )
    return auth


JWT_ALGORITHMS: Final = (
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512",
    "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip


def _parse_jwt(r: _Reader) -> JWTConfig:
    from mcptwist.config.keys import check_key_file, key_file_algorithms

    key_path = r.table.get("key_file")
    default: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    if isinstance(key_path, str) and "algorithms" not in r.table:
        # One public key verifies one family: take the one its type signs with.
        default = key_file_algorithms(r.expand("key_file", key_path))
    algorithms = r.strings("algorithms", default)
    for i, algorithm in enumerate(algorithms):
        if algorithm not in JWT_ALGORITHMS:
            raise r.error(
                f"algorithms[{i}]",
                f"{algorithm!r} is not a supported JWT algorithm",
                "use some of " + ", ".join(JWT_ALGORITHMS),
            )
    audience = r.strings("audience")
    if not audience:
        raise r.error(
            "audience",
            "is missing: tokens issued for other services would be accepted",
            'write audience = ["https://mcp.example.com"] (what your IdP puts in aud)',
        )
    issuer = r.string("issuer")
    if not issuer:
        raise r.error(
            "issuer",
            "is missing: tokens from any issuer the keys sign for would be accepted "
            "(one identity provider's keys often serve several tenants)",
            'write issuer = "https://auth.example.com" (exactly what your IdP puts in iss)',
        )
    key_file = r.string("key_file")
    jwks_url = r.string("jwks_url")
    if (key_file is None) == (jwks_url is None):
        raise r.error(
            "key_file",
            "give exactly one of key_file and jwks_url",
            'write key_file = "/etc/mcptwist/jwt-public.pem" or jwks_url = "https://idp/.well-known/jwks.json"',
        )
    if key_file is not None and not os.path.isfile(key_file):
        raise r.error(
            "key_file", f"{key_file!r} does not exist", "give a PEM file (or the HS* secret file)"
        )
    if key_file is not None:
        try:
            check_key_file(key_file, algorithms)
        except (OSError, ValueError) as e:
            raise r.error(
                "key_file",
                f"cannot verify {', '.join(algorithms)} ({e})",
                "give the identity provider's public key (PEM) and the algorithms it signs "
                "with, or leave algorithms out to use the key's own",
            ) from None
    if jwks_url is not None and not _safe_jwks_url(jwks_url):
        raise r.error(
            "jwks_url",
            f"{jwks_url!r} is not an https URL",
            "fetch keys over https (plain http is accepted only from loopback)",
        )
    d = JWTConfig(algorithms=algorithms, audience=audience, issuer=issuer)
    config = JWTConfig(
        algorithms=algorithms,
        audience=audience,
        issuer=issuer,
        key_file=key_file,
        jwks_url=jwks_url,
        jwks_refresh=r.get(
            "jwks_refresh",
            "a number of seconds, at least 10",
            lambda v: _at_least(v, 10.0),
            d.jwks_refresh,
            "write jwks_refresh = 300",
        ),
        leeway=r.get("leeway", "a number of seconds", _non_negative, d.leeway, "write leeway = 30"),
        name_claim=r.string("name_claim", d.name_claim) or d.name_claim,
        servers_claim=r.string("servers_claim", d.servers_claim) or d.servers_claim,
        scope_claim=r.string("scope_claim", d.scope_claim) or d.scope_claim,
        server_scope_prefix=r.string("server_scope_prefix", d.server_scope_prefix)
        or d.server_scope_prefix,
        admin_scope=r.string("admin_scope", d.admin_scope) or d.admin_scope,
        default_servers=frozenset(r.strings("default_servers")),
    )
    r.finish()
    return config


def _safe_jwks_url(url: str) -> bool:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme == "https":
        return bool(host)
    return parts.scheme == "http" and host in LOOPBACK_HOSTS


def _at_least(value: Any, minimum: float) -> float:
    seconds = _seconds(value)
    if seconds < minimum:
        raise ValueError()
    return seconds


def _non_negative(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError()
    if not 0 <= value < float("inf"):
        raise ValueError()
    return float(value)


def _bucket(r: _Reader, name: str, default: Bucket | None) -> Bucket | None:
    r.used.add(name)
    if name not in r.table:
        return default
    value = r.table[name]
    fix = f"write {name} = {{ rate = 100, burst = 1000 }} (requests per second, at once), or {name} = false"
    if value is False:
        return None
    if not isinstance(value, dict):
        raise r.error(name, f"must be a table or false, not {value!r}", fix)
    b = _Reader(r.source, r.key(name) + ".", value, r.environ)
    rate = b.number("rate", default.rate if default else 100.0)
    burst = b.integer("burst", default.burst if default else max(1, int(rate * 10)))
    b.finish()
    return Bucket(rate, burst)


def _parse_limits(top: _Reader) -> LimitsConfig:
    r = _Reader(top.source, "limits.", top.table_at("limits"), top.environ)
    d = LimitsConfig()
    limits = LimitsConfig(
        per_principal=_bucket(r, "per_principal", d.per_principal),
        per_ip=_bucket(r, "per_ip", d.per_ip),
        max_streams_per_principal=r.integer(
            "max_streams_per_principal", d.max_streams_per_principal
        ),
        max_sessions_per_principal=r.integer(
            "max_sessions_per_principal", d.max_sessions_per_principal
        ),
        max_batch=r.integer("max_batch", d.max_batch),
        max_in_flight_per_session=r.integer(
            "max_in_flight_per_session", d.max_in_flight_per_session
        ),
        max_in_flight_per_principal=r.integer(
            "max_in_flight_per_principal", d.max_in_flight_per_principal
        ),
        preauth_body=r.size("preauth_body", d.preauth_body),
        max_connections_per_ip=r.integer("max_connections_per_ip", d.max_connections_per_ip),
        header_timeout=r.number("header_timeout", d.header_timeout),
        body_timeout=r.number("body_timeout", d.body_timeout),
    )
    r.finish()
    return limits


def _parse_server_limits(server: _Reader) -> ServerLimits:
    r = _Reader(server.source, server.key("limits."), server.table_at("limits"), server.environ)
    limits = ServerLimits(
        per_principal=_bucket(r, "per_principal", None),
        per_ip=_bucket(r, "per_ip", None),
        total=_bucket(r, "total", None),
    )
    r.finish()
    return limits


def _hosts(r: _Reader, default: tuple[str, ...]) -> tuple[str, ...]:
    """An C{allowed_hosts} list: host names, or C{"*"} for any."""
    hosts = r.strings("allowed_hosts", default)
    for i, host in enumerate(hosts):
        if host != "*" and not re.match(
            r"^(\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*|[A-Za-z0-9.-]+)$", host
        ):
            raise r.error(
                f"allowed_hosts[{i}]",
                f"{host!r} is not a host name",
                'write a host name or address without scheme or port, such as "mcp.example.com", or "*" for any',
            )
    return tuple(h.strip("[]").lower() for h in hosts)


def _parse_metrics(top: _Reader, hosts: tuple[str, ...]) -> MetricsConfig:
    r = _Reader(top.source, "metrics.", top.table_at("metrics"), top.environ)
    listen = r.strings("listen")
    metrics = MetricsConfig(
        enabled=r.boolean("enabled", True),
        listeners=tuple(
            listener_from_string(top.source, r.key(f"listen[{i}]"), d) for i, d in enumerate(listen)
        ),
        allowed_hosts=_hosts(r, hosts),
    )
    r.finish()
    return metrics


def _parse_audit(top: _Reader) -> AuditConfig:
    r = _Reader(top.source, "audit.", top.table_at("audit"), top.environ)
    d = AuditConfig()
    path = r.string("path")
    audit = AuditConfig(
        path=path,
        max_size=r.size("max_size", d.max_size),
        keep=r.integer("keep", d.keep, minimum=0),
    )
    r.finish()
    if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise r.error(
            "path",
            f"the directory of {path!r} does not exist",
            "create it (writable by the bridge's user), or give another path",
        )
    return audit
