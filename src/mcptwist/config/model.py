# -*- test-case-name: tests.test_config -*-
"""The bridge's configuration as frozen values: what every other room reads.

A leaf: it imports nothing of the bridge, and nothing of Twisted. The loader
(L{mcptwist.config.load}) builds these from a file; everything else only reads them.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Mapping
from typing import Any, Final

import attrs

DEFAULT_LISTEN: Final = "tcp:8080:interface=127.0.0.1"
# No web page may drive the bridge unless its origin is listed: any local page
# could otherwise reach an unauthenticated loopback bridge.
DEFAULT_ORIGINS: Final[tuple[str, ...]] = ()
# Host names a loopback-only bridge answers to (DNS-rebinding protection).
LOOPBACK_HOSTS: Final = ("localhost", "127.0.0.1", "::1")
MiB: Final = 1024 * 1024
SHARING_MODES: Final = ("shared", "session", "principal")
# What the bridge does when a child serves a tool whose definition differs from its pin.
TOOL_CHANGE_POLICIES: Final = ("warn", "hide", "block")
# What a child speaks: the session era only, both (mcp 2.x servers), or 2026-07-28 only.
CHILD_ERAS: Final = ("legacy", "dual", "modern")


# An endpoint is served, named and counted where servers are as
# "endpoints/NAME": no server's name holds a slash.
ENDPOINT_PREFIX: Final = "endpoints/"


def endpoint_key(name: str) -> str:
    """The name an endpoint goes by where servers are named (its URL's path too)."""
    return ENDPOINT_PREFIX + name


def url_path(name: str) -> str:
    """Where a server's (or an endpoint's) URLs are: /servers/NAME or /endpoints/NAME."""
    return f"/{name}" if name.startswith(ENDPOINT_PREFIX) else f"/servers/{name}"


# A value of a server's env that its child gets per principal, or from systemd:
# ${claim:NAME}, ${secret:NAME}, ${credential:NAME}.
CREDENTIAL_REFERENCE: Final = re.compile(r"\$\{(claim|secret|credential):([A-Za-z0-9_.:/-]+)\}")
# Sources whose values differ by principal.
PER_PRINCIPAL: Final = frozenset({"claim", "secret"})


class ConfigError(Exception):
    """A configuration problem, worded for the person who has to fix it."""

    def __init__(self, source: str, key: str, problem: str, fix: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(f"{source}: {key}: {problem}. Fix: {fix}")


@attrs.frozen
class RestartPolicy:
    """How a crashed child is restarted, and when the bridge gives up."""

    initial_delay: float = 1.0
    max_delay: float = 30.0
    crash_limit: int = 5
    crash_window: float = 60.0
    cooldown: float = 300.0


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen
class Bucket:
    """A token bucket: C{rate} requests per second on average, C{burst} at once."""

    rate: float
    burst: int


@attrs.frozen
class ServerLimits:
    """Rate limits of one server, on top of the bridge-wide ones (None: no limit)."""

    per_principal: Bucket | None = None
    per_ip: Bucket | None = None
    total: Bucket | None = None


@attrs.frozen
class LimitsConfig:
    """Bridge-wide rate limits and caps (a None bucket: no limit)."""

    per_principal: Bucket | None = Bucket(100.0, 1000)
    per_ip: Bucket | None = Bucket(100.0, 1000)
    max_streams_per_principal: int = 256
    max_sessions_per_principal: int = 1000
    # Messages in one JSON-RPC batch (each costs a token of every bucket); no
    # more than max_in_flight_per_session either (its requests are in flight together).
    max_batch: int = 64
    # Requests in flight (sent, not yet answered) per session, and per principal.
    max_in_flight_per_session: int = 64
    max_in_flight_per_principal: int = 256
    # Receiving requests: the body read before credentials are known good,
    # open connections per client address, and how long a request may take
    # to arrive (its head, then its body).
    preauth_body: int = 64 * 1024
    max_connections_per_ip: int = 64
    header_timeout: float = 20.0
    body_timeout: float = 60.0


@attrs.frozen
class TLSConfig:
    """Certificate and key of a TLS listener, re-read on SIGHUP."""

    certificate: str
    key: str
    chain: str | None = None
    min_version: str = "1.2"
    hsts_max_age: int = 31_536_000


@attrs.frozen
class ListenerConfig:
    """One listening endpoint and its connection-level policy."""

    endpoint: str
    tls: TLSConfig | None = None
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    trusted_proxies: tuple[Network, ...] = ()
    proxy_protocol: bool = False
    unix_peers: str = "allow"


@attrs.frozen
class TokenConfig:
    """A static bearer token, known to the bridge only by its SHA-256 digest."""

    name: str
    digest: bytes
    servers: frozenset[str] = frozenset({"*"})
    admin: bool = False


@attrs.frozen
class JWTConfig:
    """How JWT bearer tokens are verified and mapped to servers and scopes."""

    algorithms: tuple[str, ...]
    audience: tuple[str, ...]
    # Required, and matched exactly: one IdP's keys may sign for several tenants.
    issuer: str
    key_file: str | None = None
    jwks_url: str | None = None
    jwks_refresh: float = 300.0
    leeway: float = 30.0
    name_claim: str = "sub"
    servers_claim: str = "mcp_servers"
    scope_claim: str = "scope"
    server_scope_prefix: str = "mcp:server:"
    admin_scope: str = "mcp:admin"
    default_servers: frozenset[str] = frozenset()


@attrs.frozen
class AuthConfig:
    """Who may use the bridge; without tokens or JWT, nobody is asked."""

    tokens: tuple[TokenConfig, ...] = ()
    jwt: JWTConfig | None = None
    resource_url: str | None = None
    authorization_servers: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.tokens) or self.jwt is not None


@attrs.frozen
class AuditConfig:
    """The audit trail: JSON Lines in its own file, rotated by size."""

    path: str | None = None
    max_size: int = 100 * MiB
    keep: int = 10


@attrs.frozen
class CommandConfig:
    """A program the admin API may start as a new server: what runs comes from
    the configuration file only, never from a request."""

    name: str
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict)
    env_passthrough: tuple[str, ...] = ()
    cwd: str | None = None
    written: Mapping[str, Any] = attrs.field(factory=dict, eq=False)


@attrs.frozen
class AdminConfig:
    """The admin API: whether it is served, and which commands it may start.

    Without commands, servers cannot be added at run time.
    """

    enabled: bool = True
    commands: Mapping[str, CommandConfig] = attrs.field(factory=dict)


@attrs.frozen
class MetricsConfig:
    """Prometheus metrics: at /metrics on every listener (admin scope when
    authentication is on), and on listeners of their own that serve nothing else."""

    enabled: bool = True
    listeners: tuple[ListenerConfig, ...] = ()
    # What its own listeners answer to; they ask for no credentials.
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS


@attrs.frozen
class TasksConfig:
    """Durable tasks (the C{io.modelcontextprotocol/tasks} extension) for
    2026-07-28 clients: how long a task is kept, and how many and how big."""

    enabled: bool = True
    # Seconds a task, and its result, are kept from its creation.
    ttl: float = 3600.0
    # Tasks kept bridge-wide and per principal, running or finished.
    max_tasks: int = 10_000
    max_tasks_per_principal: int = 100
    # The largest result kept; a larger one fails its task.
    max_result_size: int = 4 * MiB
    # How often a client is told to poll (seconds).
    poll_interval: float = 1.0


@attrs.frozen
class ServerConfig:
    """One stdio MCP server and how the bridge runs and shares it."""

    name: str
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict)
    env_passthrough: tuple[str, ...] = ()
    cwd: str | None = None
    # command, args and cwd as the file wrote them, before ${VAR} expansion:
    # what status shows (an expanded value may be a secret).
    written: Mapping[str, Any] = attrs.field(factory=dict, eq=False)
    sharing: str = "shared"
    max_message_size: int = 32 * MiB
    request_timeout: float = 300.0
    max_request_timeout: float = 3600.0
    term_after: float = 2.0
    kill_after: float = 2.0
    stderr_lines: int = 100
    # A file that leaves it unset gets it off once authentication is on (a
    # shared child's stderr may hold another client's data): see parse_server.
    stderr_in_errors: bool = True
    max_children: int = 16
    # Of those, what one authenticated principal may hold (None: a quarter).
    max_children_per_principal: int | None = None
    session_idle_timeout: float = 1800.0
    # With sharing = "principal": how long a principal's child runs once its
    # last session (or stateless hub) has ended.
    child_idle_timeout: float = 600.0
    startup_timeout: float = 60.0
    # Requests that time out one after another, with no message from the child
    # meanwhile, before it is reported unresponsive (0: never); and whether it
    # is then restarted.
    unresponsive_after: int = 3
    restart_unresponsive: bool = False
    json_response: bool = False
    # How long a stateless call waits for its client to answer the child's questions.
    input_timeout: float = 300.0
    # "dual" or "modern": the child speaks 2026-07-28 (too), and gets those requests as they are.
    era: str = "legacy"
    restart: RestartPolicy = RestartPolicy()
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    limits: ServerLimits = ServerLimits()
    audit_arguments: bool = False
    # Whether its spans record tool arguments and results (off: never recorded).
    trace_arguments: bool = False
    # Which of its tools clients see and may call (glob lists of the tools' own names).
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    # A tool whose definition changed since it was pinned: "warn", "hide" or "block".
    on_tool_change: str = "warn"
    # Tools the bridge runs as tasks for a client that asks, besides those whose
    # definition declares execution.taskSupport (glob list of the tools' own names).
    task_tools: tuple[str, ...] = ()
    # Tools that ask their client first (input_required rounds) and run as a task
    # from the retry that answers them on (glob list of the tools' own names).
    task_after_input: tuple[str, ...] = ()

    @property
    def children_per_principal(self) -> int:
        """The children one principal may hold: C{max_children_per_principal},
        by default a quarter of C{max_children} (at least one), never more
        than C{max_children}."""
        if self.max_children_per_principal is not None:
            return min(self.max_children_per_principal, self.max_children)
        return max(1, self.max_children // 4)


@attrs.frozen
class EndpointConfig:
    """An endpoint that serves several servers at one URL (C{/endpoints/NAME/}).

    C{prefixes} maps each member to the prefix of its names (C{""} for the
    one member of an endpoint with C{prefix = "none"}); C{rename} maps a
    member's own tool or prompt name, as C{(server, name)}, to the one shown.
    C{include} and C{exclude} filter the names shown.
    """

    name: str
    servers: tuple[str, ...]
    prefixes: Mapping[str, str]
    separator: str = "__"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    rename: Mapping[tuple[str, str], str] = attrs.field(factory=dict)
    # Items in one page of a merged list.
    page_size: int = 1000
    json_response: bool = False
    session_idle_timeout: float = 1800.0
    # How long a list waits for members that are starting.
    list_timeout: float = 10.0


@attrs.frozen
class SecretsConfig:
    """Where each principal's secrets are: one file keyed by principal id, or
    a directory of one file per principal (C{PRINCIPAL.toml} or C{.json})."""

    file: str | None = None
    directory: str | None = None


# A node id: the first field of its session ids, so neither a dot nor anything
# a balancer's header map would have to escape.
NODE_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
# The shortest cluster key taken: 32 characters (of a random token, 192 bits or more).
MIN_CLUSTER_KEY: Final = 32


@attrs.frozen
class ClusterConfig:
    """[cluster]: this node's identity among several behind one balancer, and
    what they share (keys, a Redis)."""

    node_id: str
    # The cluster's keys: the first signs, every one verifies (rotation).
    keys: tuple[bytes, ...] = attrs.field(repr=False)
    # redis://[:password@]host[:port][/db] (None: nothing shared, limits per node).
    redis: str | None = attrs.field(default=None, repr=False)
    # The URL other nodes reach this one at (what the registry advertises).
    advertise: str | None = None
    # Seconds between this node's heartbeats, and how long its record outlives one.
    heartbeat: float = 2.0
    node_ttl: float = 10.0
    # How long one Redis command may take before the node goes on without it.
    redis_timeout: float = 0.25


@attrs.frozen
class TelemetryConfig:
    """[telemetry]: OpenTelemetry traces and metrics, sent over OTLP/HTTP.

    What a key leaves out, the standard C{OTEL_*} environment variables give
    (the SDK reads them), then the SDK's defaults."""

    # The collector's base URL (/v1/traces and /v1/metrics are added), or None.
    endpoint: str | None = None
    # Sent with every export (an API key, often): kept out of reprs and logs.
    headers: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    # The ratio of traces recorded (of those a client did not decide itself).
    sampling: float | None = None
    service_name: str | None = None
    resource: Mapping[str, str] = attrs.field(factory=dict)
    # Seconds an export may take: spans are sent in the background, and a
    # collector that does not answer delays only the bridge's exit.
    timeout: float = 5.0
    # Seconds between metric exports.
    metrics_interval: float = 60.0


@attrs.frozen
class BridgeConfig:
    """Everything the bridge needs to start; built once, never mutated."""

    servers: Mapping[str, ServerConfig]
    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(DEFAULT_LISTEN),)
    insecure: bool = False
    allowed_origins: tuple[str, ...] = DEFAULT_ORIGINS
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    heartbeat_interval: float = 15.0
    stream_buffer: int = 8 * MiB
    replay_events: int = 256
    max_sessions: int = 10_000
    access_log: bool = False
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    audit: AuditConfig = AuditConfig()
    metrics: MetricsConfig = MetricsConfig()
    admin: AdminConfig = AdminConfig()
    drain_timeout: float = 60.0
    endpoints: Mapping[str, EndpointConfig] = attrs.field(factory=dict)
    # Where the digests of tools that were accepted are kept (None: in memory only).
    pin_file: str | None = None
    secrets: SecretsConfig = SecretsConfig()
    cluster: ClusterConfig | None = None
    # None: no traces, and nothing of OpenTelemetry is loaded.
    telemetry: TelemetryConfig | None = None
    tasks: TasksConfig = TasksConfig()
    source: str = "<built-in>"


def default_config() -> BridgeConfig:
    """The configuration used without C{--config}: the built-in example server."""
    example = ServerConfig(name="example", command=sys.executable, args=("-m", "mcptwist.example"))
    return BridgeConfig(servers={"example": example})
