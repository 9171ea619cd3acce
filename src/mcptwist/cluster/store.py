# -*- test-case-name: tests.test_store -*-
"""The state the nodes of a cluster share in Redis: token buckets and the
node registry.

Every command is bounded by C{redis_timeout}. The store is C{up} or C{down}:
the first command that fails or times out logs once and marks it down;
while it is down no command is sent (each answers "unavailable" at once, so
nothing queues behind a dead Redis and each caller goes on without it: the
rate limits fall back to each node's own buckets), and a probe (C{PING},
sent only over a live connection) marks it up again, logged once, when
Redis answers.

The token buckets live on Redis's clock, one clock for every node, in a Lua
script that takes from several buckets at once, all or nothing, as the
local L{RateLimiter<mcptwist.security.ratelimit.RateLimiter>} does. The
node registry is a set of node ids plus one key per node whose TTL makes a
dead node disappear (no C{KEYS} scan on any path).

txredisapi is imported only when a L{RedisStore} connects: a bridge without
a cluster Redis never loads it.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcptwist.config.model import ClusterConfig

if TYPE_CHECKING:
    from txredisapi import RedisFactory

log = Logger(namespace="mcptwist.cluster")

PREFIX: Final = "mcptwist:"
NODES: Final = PREFIX + "nodes"
NODE: Final = PREFIX + "node:"
LIMIT: Final = PREFIX + "limit:"
# Two connections: Redis answers one command at a time, and each connection
# pipelines; a second one keeps a slow reply from holding up the rest.
POOL_SIZE: Final = 2
# Seconds between probes (a PING), up or down.
PROBE_INTERVAL: Final = 1.0
# Longest wait between two attempts to reconnect (txredisapi backs off from
# 1 s by a factor of e; its default cap is 10 s).
RECONNECT_MAX_DELAY: Final = 2.0
# Why a take was answered "unavailable" (the bounded label of its metric).
FALLBACK_REASONS: Final = ("down", "timeout", "error")

# KEYS: the buckets. ARGV: cost, paid, spend (1 or 0), then each bucket's
# rate (tokens per second) and burst. Each bucket is refilled to Redis's
# time; if every one holds C{cost} tokens (and C{spend} is 1), C{cost} is
# taken from each. Returns each bucket's wait in seconds as a string ("0"
# where it allows; a bare Lua number would be truncated to an integer): the
# time until it holds C{cost + paid}, what a retry will have to pay.
TAKE: Final = """
local cost, paid, spend = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tokens, waits, allowed = {}, {}, true
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local have, ts = tonumber(b[1]) or burst, tonumber(b[2]) or now
  have = math.min(burst, have + math.max(0, now - ts) * rate / 1000)
  tokens[i] = have
  waits[i] = '0'
  if cost - have > 1e-9 then
    allowed = false
    waits[i] = tostring((cost + paid - have) / rate)
  end
end
if allowed and spend then
  for i, key in ipairs(KEYS) do
    local rate, burst = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
    redis.call('HSET', key, 'tokens', tostring(math.max(0, tokens[i] - cost)), 'ts', now)
    redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
  end
end
return waits
"""

# KEYS: the set of node ids, the node's key. ARGV: node id, record, TTL in ms.
ANNOUNCE: Final = """
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""

# KEYS: the set of node ids, the node's key. ARGV: node id.
WITHDRAW: Final = """
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[1], ARGV[1])
return 1
"""

# KEYS: the set of node ids. ARGV: the prefix of a node's key. Returns id,
# record, id, record...; the ids whose key expired leave the set. (A node's
# key is derived from its id: fine on one Redis, not on a Redis Cluster.)
NODES_SCRIPT: Final = """
local found = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local record = redis.call('GET', ARGV[1] .. id)
  if record then
    found[#found + 1] = id
    found[#found + 1] = record
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return found
"""


@attrs.frozen
class Bucket:
    """One token bucket: its key (without the store's prefix), C{rate}
    tokens a second, C{burst} at most."""

    key: str
    rate: float
    burst: float


# Each bucket's wait, in seconds (0.0: it allows); None: Redis is unavailable.
Waits = tuple[float, ...] | None


class Store(Protocol):
    """What a node shares with the others: L{RedisStore}, or a fake in tests."""

    @property
    def up(self) -> bool:
        """Whether Redis answers (False until it first has, and while it does not)."""

    @property
    def fallbacks(self) -> Mapping[str, int]:
        """How many takes were answered "unavailable", by reason (L{FALLBACK_REASONS})."""

    def watch(self, watcher: Callable[[bool], None]) -> None:
        """Call C{watcher(up)} on each change of availability."""

    def take(
        self, buckets: Sequence[Bucket], cost: int = 1, paid: int = 0, spend: bool = True
    ) -> Deferred[Waits]:
        """Take C{cost} tokens from every bucket if each holds them (and C{spend}),
        else none; each bucket's wait, or None when Redis is unavailable (the
        caller falls back to its local buckets)."""

    def announce(self, node_id: str, record: Mapping[str, Any], ttl: float) -> Deferred[bool]:
        """Write this node's record, kept C{ttl} seconds; whether it was written."""

    def withdraw(self, node_id: str) -> Deferred[bool]:
        """Remove a node's record; whether it was removed."""

    def nodes(self) -> Deferred[dict[str, dict[str, Any]] | None]:
        """Every live node's record by node id; None when Redis is unavailable."""

    def start(self) -> None:
        """Connect, and probe Redis until L{stop}."""

    def stop(self) -> Deferred[None]:
        """Stop probing and close the connections."""

    def reconfigure(self, config: ClusterConfig) -> None:
        """A reload's settings (the Redis itself cannot change while it runs)."""


@attrs.frozen
class RedisAddress:
    """Where Redis is, from a C{redis://[[user]:password@]host[:port][/db]} URL."""

    host: str
    port: int = 6379
    db: int | None = None
    username: str | None = attrs.field(default=None, repr=False)
    password: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """The URL's parts (the loader has checked it: see C{redis_url_problem})."""
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "redis" or not parsed.hostname:
            raise ValueError("not a redis:// URL")
        db = parsed.path.lstrip("/")
        return cls(
            host=parsed.hostname,
            port=parsed.port or 6379,
            db=int(db) if db else None,
            username=urllib.parse.unquote(parsed.username) if parsed.username else None,
            password=urllib.parse.unquote(parsed.password) if parsed.password is not None else None,
        )

    def __str__(self) -> str:
        """Host, port and database: never the credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}/{self.db or 0}"


class RedisClient(Protocol):
    """The few commands the store sends (a txredisapi pool, or a fake)."""

    def connected(self) -> bool:
        """Whether a connection is up now (nothing is sent otherwise while down)."""

    def eval(self, script: str, keys: list[str], args: list[str]) -> Deferred[Any]: ...

    def ping(self) -> Deferred[Any]: ...

    def disconnect(self) -> Deferred[None]: ...


class TxRedisClient:
    """A txredisapi connection pool: reconnects by itself, caches scripts' SHA1s
    (C{EVALSHA}, then C{EVAL} on C{NOSCRIPT}), numbers left as strings."""

    def __init__(self, address: RedisAddress, reactor: Any, reply_timeout: float) -> None:
        import txredisapi
        from twisted.internet.endpoints import HostnameEndpoint

        factory: RedisFactory = txredisapi.RedisFactory(
            str(address),
            address.db,
            POOL_SIZE,
            isLazy=True,
            password=address.password,
            username=address.username,
            # Past this a connection whose server stopped answering is dropped
            # (and made again); each command has its own, shorter, deadline.
            replyTimeout=reply_timeout,
            convertNumbers=False,
        )
        factory.reconnect = True
        factory.maxDelay = RECONNECT_MAX_DELAY
        # Fails if Redis refuses the password (and txredisapi stops trying):
        # said once, here, rather than left to an unhandled Deferred.
        factory.deferred.addErrback(self._refused)
        self._factory = factory
        self._pool = factory.handler
        factory.startConnecting(
            HostnameEndpoint(reactor, address.host, address.port, timeout=reply_timeout)
        )

    @staticmethod
    def _refused(reason: Failure) -> None:
        log.error(
            "Redis refused this node ({error}): check the password of [cluster] redis; the "
            "node limits requests itself until it is restarted with one Redis takes",
            error=reason.getErrorMessage(),
        )

    def connected(self) -> bool:
        return bool(self._factory.size > 0)

    def eval(self, script: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        d: Deferred[Any] = self._pool.eval(script, keys, args)
        return d

    def ping(self) -> Deferred[Any]:
        d: Deferred[Any] = self._pool.ping()
        return d

    def disconnect(self) -> Deferred[None]:
        d: Deferred[None] = self._factory.disconnect()
        return d


class RedisStore:
    """The cluster's Redis, as the L{Store} of this node."""

    def __init__(
        self,
        config: ClusterConfig,
        clock: IReactorTime,
        client: Callable[[], RedisClient] | None = None,
        probe_interval: float = PROBE_INTERVAL,
    ) -> None:
        if config.redis is None:
            raise ValueError("a RedisStore needs [cluster] redis")
        self.address = RedisAddress.parse(config.redis)
        self.timeout = config.redis_timeout
        self._clock = clock
        self._connect = client or self._txredisapi
        self._client: RedisClient | None = None
        self._up = False
        # Whether this outage (or the wait for Redis's first answer) was logged.
        self._told = False
        self._fallbacks = dict.fromkeys(FALLBACK_REASONS, 0)
        self._watchers: list[Callable[[bool], None]] = []
        self._probing = False
        self._probe = LoopingCall(self._send_probe)
        self._probe.clock = clock
        self._probe_interval = probe_interval

    @property
    def _connect_timeout(self) -> float:
        # Beyond a few deadlines a connection attempt, or a connection that
        # stays silent, is given up (and made again).
        return max(1.0, self.timeout * 4)

    def _txredisapi(self) -> RedisClient:
        return TxRedisClient(self.address, self._clock, self._connect_timeout)

    @property
    def up(self) -> bool:
        return self._up

    @property
    def fallbacks(self) -> Mapping[str, int]:
        return self._fallbacks

    def watch(self, watcher: Callable[[bool], None]) -> None:
        self._watchers.append(watcher)

    def reconfigure(self, config: ClusterConfig) -> None:
        self.timeout = config.redis_timeout

    def start(self) -> None:
        if self._client is None:
            self._client = self._connect()
        if not self._probe.running:
            self._probe.start(self._probe_interval, now=False)
            # The first probe waits for the first connection (one PING queued).
            self._send_probe(first=True)

    def stop(self) -> Deferred[None]:
        if self._probe.running:
            self._probe.stop()
        client, self._client = self._client, None
        self._up = False
        if client is None:
            return succeed(None)
        d = client.disconnect()
        d.addErrback(lambda f: log.debug("closing Redis: {error}", error=f.getErrorMessage()))
        return d

    # Commands

    def take(
        self, buckets: Sequence[Bucket], cost: int = 1, paid: int = 0, spend: bool = True
    ) -> Deferred[Waits]:
        args = [str(cost), str(paid), "1" if spend else "0"]
        for bucket in buckets:
            args += [repr(float(bucket.rate)), repr(float(bucket.burst))]
        keys = [LIMIT + b.key for b in buckets]
        d = self._send("take", lambda c: c.eval(TAKE, keys, args))
        return d.addCallback(self._waits)

    def _waits(self, reply: Any) -> Waits:
        if isinstance(reply, _Unavailable):
            self._fallbacks[reply.reason] += 1
            return None
        return tuple(float(w) for w in reply)

    def announce(self, node_id: str, record: Mapping[str, Any], ttl: float) -> Deferred[bool]:
        body = json.dumps(record, separators=(",", ":"))
        millis = str(max(1, round(ttl * 1000)))
        d = self._send(
            "announce", lambda c: c.eval(ANNOUNCE, [NODES, NODE + node_id], [node_id, body, millis])
        )
        return d.addCallback(lambda reply: not isinstance(reply, _Unavailable))

    def withdraw(self, node_id: str) -> Deferred[bool]:
        d = self._send("withdraw", lambda c: c.eval(WITHDRAW, [NODES, NODE + node_id], [node_id]))
        return d.addCallback(lambda reply: not isinstance(reply, _Unavailable))

    def nodes(self) -> Deferred[dict[str, dict[str, Any]] | None]:
        d = self._send("nodes", lambda c: c.eval(NODES_SCRIPT, [NODES], [NODE]))
        return d.addCallback(_records)

    def _send(self, what: str, command: Callable[[RedisClient], Deferred[Any]]) -> Deferred[Any]:
        """Run a command within the timeout; an L{_Unavailable} instead of
        its reply when Redis is down, or when it fails (marking it down)."""
        client = self._client
        if client is None or not self._up:
            return succeed(_Unavailable("down"))
        d = maybeDeferred(command, client)
        d.addTimeout(self.timeout, self._clock)
        return d.addErrback(self._failed, what)

    def _failed(self, failure: Failure, what: str) -> _Unavailable:
        timed_out = failure.check(defer.TimeoutError) is not None
        reason = (
            f"no answer within {self.timeout:g}s (redis_timeout)"
            if timed_out
            else failure.getErrorMessage() or repr(failure.value)
        )
        self._down(f"{what}: {reason}")
        return _Unavailable("timeout" if timed_out else "error")

    # Availability

    def _send_probe(self, first: bool = False) -> None:
        client = self._client
        if self._probing or client is None:
            return
        if not first and not client.connected():
            # Not sent: txredisapi would queue it until a connection is made.
            self._down("not connected")
            return
        self._probing = True
        d = client.ping()
        d.addTimeout(self._connect_timeout if first else self.timeout, self._clock)
        d.addCallbacks(lambda _: self._set_up(), lambda f: self._failed(f, "ping"))
        d.addBoth(self._probed)

    def _probed(self, _: object) -> None:
        self._probing = False

    def _set_up(self) -> None:
        if self._up:
            return
        self._up = True
        self._told = False
        log.info(
            "Redis at {address} answers: rate limits are shared by the cluster again, "
            "and this node is announced in its registry",
            address=str(self.address),
        )
        self._tell(True)

    def _down(self, reason: str) -> None:
        """Mark Redis down; said once an outage (or once before it first answered)."""
        was_up, self._up = self._up, False
        if self._told:
            return
        self._told = True
        log.warn(
            "Redis at {address} is unavailable ({reason}): each node limits requests with "
            "its own buckets, and /health says degraded, until it answers again",
            address=str(self.address),
            reason=reason,
        )
        if was_up:
            self._tell(False)

    def _tell(self, up: bool) -> None:
        for watcher in list(self._watchers):
            try:
                watcher(up)
            except Exception:
                log.failure("while telling of Redis's availability")


@attrs.frozen
class _Unavailable:
    """What a command gave instead of its reply: why Redis was not used."""

    reason: str


def _records(reply: Any) -> dict[str, dict[str, Any]] | None:
    if isinstance(reply, _Unavailable):
        return None
    found: dict[str, dict[str, Any]] = {}
    for node_id, body in zip(reply[::2], reply[1::2], strict=True):
        try:
            record = json.loads(body)
        except ValueError:
            log.warn("node {node} has a record that is not JSON: left out", node=node_id)
            continue
        if isinstance(record, dict):
            found[str(node_id)] = record
    return found
