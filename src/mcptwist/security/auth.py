# -*- test-case-name: tests.test_auth -*-
"""Who is calling: static bearer tokens and JWTs, checked through twisted.cred.

A request's C{Authorization: Bearer ...} header becomes a L{Principal}: a
name, and the servers it may use. Static tokens are known to the bridge only
by their SHA-256 digest. JWTs are verified by PyJWT against a key file or an
IdP's JWKS, which is fetched in the background and cached. No token ever
appears in an exception message or a log line: every refusal is one of a few
fixed phrases, safe to log and to send back in C{error_description}.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from mcptwist.config.model import AuthConfig, JWTConfig, TokenConfig

if TYPE_CHECKING:
    # PyJWT and the key types (cryptography) are imported by the JWT checker
    # when one is configured: a bridge with static tokens or none never loads them.
    import jwt

    from mcptwist.config.keys import PublicKey

log = Logger(namespace="mcptwist.auth")

TOKEN_PREFIX: Final = "mcpt_"
# An unknown kid refetches the JWKS at most this often, so that a flood of
# made-up kids cannot make the bridge hammer the IdP.
REFETCH_INTERVAL: Final = 30.0
FETCH_TIMEOUT: Final = 10.0
# Longer than any sane token; refusing early bounds the work per request.
MAX_TOKEN_LENGTH: Final = 16 * 1024
# RFC 7235 credentials: a scheme, spaces, one RFC 6750 b64token (token68).
_AUTHORIZATION_RE: Final = re.compile(rb"\A[ \t]*([!-~]+?) +([A-Za-z0-9\-._~+/]+=*)[ \t]*\Z")
# An RFC 6750 b64token: what may follow "Bearer ".
_TOKEN_RE: Final = re.compile(rb"\A[A-Za-z0-9\-._~+/]+=*\Z")
# Three base64url segments (the last is empty in an unsigned "alg: none" JWT).
_JWT_RE: Final = re.compile(r"\A[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\Z")

Fetch = Callable[[str], "Deferred[bytes]"]


# Identities


class IPrincipal(Interface):
    """The avatar interface: an authenticated caller and what it may use."""


def _principal_id(principal: Principal) -> str:
    if principal.kind == "anonymous":
        return "anonymous"
    return f"{principal.kind}:{principal.name}"


def tool_grants(servers: frozenset[str]) -> dict[str, tuple[str, ...] | None]:
    """Each granted server and the tools granted of it (None: all of them),
    from grants of whole servers (C{"NAME"}) and of some of their tools
    (C{"NAME/GLOB"}); C{"*"} is left to L{Principal.may_use}."""
    grants: dict[str, tuple[str, ...] | None] = {}
    for grant in sorted(servers):
        server, slash, tools = grant.partition("/")
        if not slash:
            grants[server] = None
        elif tools and grants.get(server, ()) is not None:
            grants[server] = (*(grants.get(server) or ()), tools)
    return grants


def _tool_grants(principal: Principal) -> dict[str, tuple[str, ...] | None]:
    return tool_grants(principal.servers)


@implementer(IPrincipal)
@attrs.frozen
class Principal:
    """An authenticated caller: its name, how it proved it, and its grants.

    C{id} is its key for sessions and limits, derived once: a token and a JWT
    subject of the same name are different clients.
    """

    name: str
    kind: str  # "token" | "jwt" | "anonymous"
    # "*": every server; "NAME": a server; "NAME/GLOB": the tools of a server
    # whose names match GLOB (other servers' grants do not narrow).
    servers: frozenset[str]
    admin: bool
    id: str = attrs.field(
        init=False, eq=False, repr=False, default=attrs.Factory(_principal_id, takes_self=True)
    )
    grants: dict[str, tuple[str, ...] | None] = attrs.field(
        init=False, eq=False, repr=False, default=attrs.Factory(_tool_grants, takes_self=True)
    )
    # The string claims of its JWT (what ${claim:NAME} reads for its child);
    # never shown (repr) and not part of who it is (eq).
    claims: Mapping[str, str] = attrs.field(factory=dict, eq=False, repr=False, kw_only=True)

    def may_use(self, server: str) -> bool:
        """Whether this caller may talk to the server named C{server} (to
        some of its tools at least)."""
        return "*" in self.servers or server in self.grants

    def holds(self, server: str) -> bool:
        """Whether this caller is granted the whole server (not some of its
        tools only): what operating it (the admin API) needs."""
        return "*" in self.servers or (server in self.grants and self.grants[server] is None)

    def tools(self, server: str) -> tuple[str, ...] | None:
        """The glob patterns of the tools of C{server} granted to this caller
        (None: every tool; only meaningful where L{may_use} is true)."""
        return None if "*" in self.servers else self.grants.get(server)


# Without authentication the bridge listens on loopback only: whoever can
# reach it there is on this host, and may do everything.
ANONYMOUS: Final = Principal("anonymous", "anonymous", frozenset({"*"}), admin=True)
# A client from elsewhere all the same (insecure = true, or forwarded by a
# proxy to a loopback listener) may use every server, and no operator route.
ANONYMOUS_REMOTE: Final = Principal("anonymous", "anonymous", frozenset({"*"}), admin=False)


class IBearerToken(ICredentials):
    """Credentials: an RFC 6750 bearer token."""

    token = Attribute("The token, as sent after C{Bearer }.")


class IJSONWebToken(IBearerToken):
    """Credentials: a bearer token in JWT form, for the JWT checker."""


@implementer(IBearerToken)
@attrs.frozen
class BearerToken:
    """A bearer token; its repr leaves the token out, so it never reaches a log."""

    token: str = attrs.field(repr=False)


@implementer(IJSONWebToken)
@attrs.frozen
class JSONWebToken:
    """A bearer token that looks like a JWT."""

    token: str = attrs.field(repr=False)


class KeysUnavailable(UnauthorizedLogin):
    """A JWT could not be checked: the IdP's keys have not been fetched."""

    def __init__(self) -> None:
        super().__init__("keys unavailable")


# Static tokens


def hash_token(token: str) -> bytes:
    """The SHA-256 digest of a token: all the bridge stores of it."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def generate_token() -> str:
    """A new random token: 32 random bytes, base64url, with a recognisable prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@implementer(ICredentialsChecker)
class StaticTokenChecker:
    """Checks bearer tokens against the configured digests, in constant time.

    The presented token is hashed and compared with every digest, even after
    a match, so the time taken says nothing about which digest came close.
    """

    credentialInterfaces = (IBearerToken,)

    def __init__(self, tokens: Sequence[TokenConfig]) -> None:
        self._tokens = tuple(
            (t.digest, Principal(t.name, "token", t.servers, t.admin)) for t in tokens
        )

    # The avatar ID is a Principal, not the bytes the interface names: see Realm.
    def requestAvatarId(self, credentials: IBearerToken) -> Deferred[Principal]:  # type: ignore[override]
        """The L{Principal} of a known token (the identity carries its grants)."""
        digest = hash_token(credentials.token)
        found: Principal | None = None
        for candidate, principal in self._tokens:
            if hmac.compare_digest(digest, candidate) and found is None:
                found = principal
        if found is None:
            return defer.fail(UnauthorizedLogin("unknown token"))
        return defer.succeed(found)


# JWTs


def _treq_fetch(clock: IReactorTime) -> Fetch:
    """GET a URL with treq: the body of a 200 answer, given up after 10 seconds."""

    def fetch(url: str) -> Deferred[bytes]:
        import treq
        from twisted.web.http_headers import Headers

        accept = Headers({b"accept": [b"application/json"]})
        d: Deferred[Any] = treq.get(url, headers=accept)

        def body(response: Any) -> Deferred[bytes]:
            content: Deferred[bytes] = treq.content(response)
            return content.addCallback(_status_200, response.code)

        d.addCallback(body)
        d.addTimeout(FETCH_TIMEOUT, clock, onTimeoutCancel=_timed_out)
        return d

    return fetch


def _timed_out(result: object, timeout: float) -> bytes:
    raise defer.TimeoutError(f"no answer within {timeout:g} seconds")


def _status_200(body: bytes, code: int) -> bytes:
    if code != 200:
        raise ValueError(f"HTTP status {code}")
    return body


def _reason(error: Exception) -> str:
    """A fixed, loggable phrase for why PyJWT refused a token."""
    import jwt

    if isinstance(error, jwt.MissingRequiredClaimError):
        return (
            f"missing claim {error.claim}"
            if error.claim in ("exp", "iss", "aud")
            else "missing claim"
        )
    # Most specific first.
    reasons: tuple[tuple[type[Exception], str], ...] = (
        (jwt.ExpiredSignatureError, "expired"),
        (jwt.ImmatureSignatureError, "not yet valid"),
        (jwt.InvalidAudienceError, "wrong audience"),
        (jwt.InvalidIssuerError, "wrong issuer"),
        (jwt.InvalidSignatureError, "bad signature"),
        (jwt.InvalidAlgorithmError, "algorithm not allowed"),
        (jwt.InvalidKeyError, "unusable key"),
    )
    return next((phrase for kind, phrase in reasons if isinstance(error, kind)), "malformed")


@implementer(ICredentialsChecker)
class JWTChecker:
    """Verifies JWTs with PyJWT and maps their claims to a L{Principal}.

    Keys come from C{key_file}, or from C{jwks_url}: fetched by L{start},
    refreshed every C{jwks_refresh} seconds, and refetched when a token
    names an unknown C{kid} (at most once every L{REFETCH_INTERVAL}). A
    check made before the first fetch has finished waits for it. A failed
    fetch is logged and the keys already known stay in use.

    PyJWT checks expiry against the wall clock; C{clock} only schedules
    fetches.
    """

    credentialInterfaces = (IJSONWebToken,)

    def __init__(self, config: JWTConfig, clock: IReactorTime, fetch: Fetch | None = None) -> None:
        if not config.algorithms or "none" in (a.lower() for a in config.algorithms):
            raise ValueError('JWT algorithms must be given, and "none" is never allowed')
        if not config.audience:
            raise ValueError("a JWT audience is required: without it any IdP token is accepted")
        if not config.issuer:
            raise ValueError("a JWT issuer is required: without it any tenant's token is accepted")
        if (config.key_file is None) == (config.jwks_url is None):
            raise ValueError("give exactly one of key_file and jwks_url")
        self.config = config
        self._clock = clock
        self._fetch = fetch if fetch is not None else _treq_fetch(clock)
        self._key: bytes | PublicKey | None = None
        if config.key_file is not None:
            from mcptwist.config.keys import load_key_file

            self._key = load_key_file(config.key_file, config.algorithms)
        self._keys: jwt.PyJWKSet | None = None
        # From the JWKS, by _install: its signing keys by kid, and the one key a
        # token without a kid may use (None when that would be ambiguous).
        self._by_kid: dict[str, jwt.PyJWK] = {}
        self._no_kid: jwt.PyJWK | None = None
        self._fetching: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []
        self._last_refetch: float | None = None
        self._loop: LoopingCall | None = None
        self._stopped = False
        self._options: jwt.types.Options = {"require": ["exp", "aud", "iss"]}
        # What every jwt.decode is given, built once.
        self._algorithms = list(config.algorithms)
        self._audience = list(config.audience)

    # The refresh loop

    def start(self) -> None:
        """Fetch the JWKS now and every C{jwks_refresh} seconds (no-op with a key file)."""
        if self.config.jwks_url is None or self._loop is not None:
            return
        self._stopped = False
        self._loop = LoopingCall(self._fetch_keys)
        self._loop.clock = self._clock
        self._loop.start(self.config.jwks_refresh, now=True).addErrback(
            lambda f: log.failure("JWKS refresh loop stopped", f)
        )

    def stop(self) -> None:
        """Stop refreshing, and abandon a fetch under way."""
        self._stopped = True
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        if self._fetching is not None:
            self._fetching.cancel()

    def _fetch_keys(self) -> Deferred[None]:
        """Fetch the JWKS (or join the fetch under way); never fails."""
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        if self._fetching is not None:
            return waiter
        url = self.config.jwks_url
        assert url is not None
        d: Deferred[Any] = defer.maybeDeferred(self._fetch, url)
        self._fetching = d
        d.addCallback(self._install, url)
        d.addErrback(self._fetch_failed, url)
        d.addBoth(self._fetched)
        return waiter

    def _install(self, body: bytes, url: str) -> None:
        import jwt

        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        keys = jwt.PyJWKSet.from_dict(document)
        usable = [k for k in keys.keys if k.public_key_use in (None, "sig")]
        by_kid: dict[str, jwt.PyJWK] = {}
        for key in usable:
            # A token's kid is a string (PyJWT refuses others); the first key wins.
            if isinstance(key.key_id, str):
                by_kid.setdefault(key.key_id, key)
        # Without a kid, only an unambiguous key will do.
        fitting = [k for k in usable if k.algorithm_name in self.config.algorithms]
        self._keys = keys
        self._by_kid = by_kid
        self._no_kid = fitting[0] if len(fitting) == 1 else None
        log.debug("Loaded {count} JWT keys from {url}", count=len(keys.keys), url=url)

    def _fetch_failed(self, failure: Failure, url: str) -> None:
        if self._stopped:
            return  # stop() abandoned it
        kept = "keeping the keys already known" if self._keys is not None else "no keys yet"
        log.warn(
            "Fetching JWT keys from {url} failed ({error}); {kept}",
            url=url,
            error=str(failure.value) or type(failure.value).__name__,
            kept=kept,
        )

    def _fetched(self, ignored: object) -> None:
        self._fetching = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _refetch(self) -> Deferred[None] | None:
        """Fetch again for an unknown kid, unless one was fetched for that lately."""
        if self._fetching is not None:
            return self._fetch_keys()
        now = self._clock.seconds()
        if self._last_refetch is not None and now - self._last_refetch < REFETCH_INTERVAL:
            return None
        self._last_refetch = now
        return self._fetch_keys()

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return self._no_kid
        return self._by_kid.get(kid)

    def _missing_key(self) -> UnauthorizedLogin:
        return KeysUnavailable() if self._keys is None else UnauthorizedLogin("unknown key")

    # Checking

    # The avatar ID is a Principal, not the bytes the interface names: see Realm.
    def requestAvatarId(self, credentials: IBearerToken) -> Deferred[Principal]:  # type: ignore[override]
        """The L{Principal} a valid JWT describes (the identity carries its grants)."""
        token = credentials.token
        if self._key is not None:
            # jwt.decode parses the header itself, and refuses what
            # get_unverified_header would (as "malformed" too).
            return self._settle(token, self._key)
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            return defer.fail(UnauthorizedLogin("malformed"))
        kid = header.get("kid")
        key = self._lookup(kid)
        if key is not None:
            return self._settle(token, key)
        waiting = self._refetch()
        if waiting is None:
            return defer.fail(self._missing_key())

        def retry(ignored: None) -> Principal:
            key = self._lookup(kid)
            if key is None:
                raise self._missing_key()
            return self._verify(token, key)

        return waiting.addCallback(retry)

    def _settle(self, token: str, key: bytes | PublicKey | jwt.PyJWK) -> Deferred[Principal]:
        try:
            return defer.succeed(self._verify(token, key))
        except UnauthorizedLogin as e:
            return defer.fail(e)

    def _verify(self, token: str, key: bytes | PublicKey | jwt.PyJWK) -> Principal:
        import jwt

        c = self.config
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=c.issuer,
                leeway=c.leeway,
                options=self._options,
            )
        except jwt.PyJWTError as e:
            raise UnauthorizedLogin(_reason(e)) from None
        except (ValueError, TypeError, OverflowError):
            raise UnauthorizedLogin("malformed") from None
        if claims.get("iss") != c.issuer:
            # Exactly, whatever PyJWT does: 2.10.0 took a part of the issuer (CVE-2024-53861).
            raise UnauthorizedLogin("wrong issuer")
        return self.principal(claims)

    def principal(self, claims: dict[str, Any]) -> Principal:
        """Map verified claims to a L{Principal}: name, servers and admin."""
        c = self.config
        name = claims.get(c.name_claim)
        if name is None or name == "":
            raise UnauthorizedLogin(f"missing claim {c.name_claim}")
        if not isinstance(name, str):
            raise UnauthorizedLogin(f"bad claim {c.name_claim}")
        servers = set(c.default_servers)
        listed = claims.get(c.servers_claim)
        if listed == "*":
            servers.add("*")
        elif isinstance(listed, list) and all(isinstance(s, str) for s in listed):
            servers.update(listed)
        elif listed is not None:
            raise UnauthorizedLogin(f"bad claim {c.servers_claim}")
        scope = claims.get(c.scope_claim)
        scopes: list[str]
        if scope is None:
            scopes = []
        elif isinstance(scope, str):
            scopes = scope.split()
        elif isinstance(scope, list) and all(isinstance(s, str) for s in scope):
            scopes = scope
        else:
            raise UnauthorizedLogin(f"bad claim {c.scope_claim}")
        prefix = c.server_scope_prefix
        servers.update(s[len(prefix) :] for s in scopes if s.startswith(prefix) and s != prefix)
        strings = {k: v for k, v in claims.items() if isinstance(v, str)}
        return Principal(
            name, "jwt", frozenset(servers), admin=c.admin_scope in scopes, claims=strings
        )


# What a reload takes away


def revoked(old: AuthConfig, new: AuthConfig, principal: str, server: str) -> str | None:
    """Why a session that C{principal} (a L{Principal.id}) opened on C{server}
    under C{old} may not go on under C{new}; None when it may.

    Every request is authenticated again, but a session's streams are not:
    whatever a reload takes away must end them. A static token is known by
    name and digest, so its session ends when the token is gone or replaced,
    or no longer grants the server. A JWT cannot be checked again without
    the token, which the bridge does not keep: its sessions end when
    C{[auth.jwt]} changes in anything but C{jwks_refresh} and C{leeway} (the
    trust, or how claims become grants), and otherwise last as long as their
    session does.
    """
    kind, _, name = principal.partition(":")
    if kind == "anonymous":
        return "revoked: authentication turned on by reload" if new.enabled else None
    if kind == "token":
        before = next((t for t in old.tokens if t.name == name), None)
        after = next((t for t in new.tokens if t.name == name), None)
        if after is None:
            return "revoked: token removed by reload"
        if before is None or before.digest != after.digest:
            return "revoked: token replaced by reload"
        if "*" not in after.servers and server not in tool_grants(after.servers):
            return "revoked: server no longer granted by reload"
        return None
    if kind == "jwt":
        if new.jwt is None:
            return "revoked: JWT authentication removed by reload"
        if old.jwt is None or _jwt_trust(old.jwt) != _jwt_trust(new.jwt):
            return "revoked: [auth.jwt] changed by reload"
        return None
    return "revoked: unknown principal"


def _jwt_trust(config: JWTConfig) -> JWTConfig:
    """What decides which JWTs are accepted, and what they grant."""
    return attrs.evolve(config, jwks_refresh=0.0, leeway=0.0)


# The realm and the front door


@implementer(IRealm)
class Realm:
    """Passes the checker's L{Principal} through as the avatar.

    The checkers return a L{Principal} as the avatar ID, not a bare name, on
    purpose: the identity carries its grants (servers, admin), which differ
    between a static token and a JWT and cannot be looked up by name.
    """

    def requestAvatar(
        self, avatarId: object, mind: object, *interfaces: type[Interface]
    ) -> tuple[type[Interface], Principal, Callable[[], None]]:
        if IPrincipal in interfaces and isinstance(avatarId, Principal):
            return IPrincipal, avatarId, lambda: None
        raise NotImplementedError("only IPrincipal avatars are provided")


class AuthFailure(Exception):
    """A refused request: the HTTP status, a loggable reason, the RFC 6750 error code."""

    def __init__(self, status: int, reason: str, error: str | None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.error = error

    def __repr__(self) -> str:
        return f"AuthFailure({self.status}, {self.reason!r}, {self.error!r})"


def bearer_token(authorization: bytes | None, basic: bool = False) -> str:
    """The token of a C{Bearer} Authorization header; with C{basic}, also
    the password of a C{Basic} one (RFC 7617: any user name, and the token
    as password), which is what a browser can send to a page.

    @raise AuthFailure: 401 without C{error} when there is no header (RFC
        6750 §3.1: no error code without credentials); 401 C{invalid_request}
        when it is not one Bearer token (or Basic credentials, with C{basic}).
    """
    if authorization is None or not authorization.strip():
        raise AuthFailure(401, "no credentials", None)
    match = _AUTHORIZATION_RE.match(authorization)
    if match is None:
        raise AuthFailure(401, "malformed Authorization header", "invalid_request")
    scheme = match.group(1).lower()
    token = match.group(2)
    if scheme == b"basic" and basic:
        token = _basic_password(token)
    elif scheme != b"bearer":
        raise AuthFailure(401, "Authorization is not Bearer", "invalid_request")
    if len(token) > MAX_TOKEN_LENGTH:
        raise AuthFailure(401, "token too long", "invalid_request")
    return token.decode("ascii")


def _basic_password(credentials: bytes) -> bytes:
    """The password of Basic credentials (base64 of C{USER:PASSWORD}), which
    must have the form of a bearer token."""
    if len(credentials) > 2 * MAX_TOKEN_LENGTH:
        raise AuthFailure(401, "token too long", "invalid_request")
    try:
        decoded = base64.b64decode(credentials, validate=True)
    except ValueError:
        raise AuthFailure(401, "malformed Basic credentials", "invalid_request") from None
    _user, colon, password = decoded.partition(b":")
    if not colon or not _TOKEN_RE.match(password):
        raise AuthFailure(401, "malformed Basic credentials", "invalid_request")
    return password


class Authenticator:
    """Turns an Authorization header into a L{Principal}, through a cred Portal."""

    def __init__(self, config: AuthConfig, clock: IReactorTime, fetch: Fetch | None = None) -> None:
        self.config = config
        self.portal = Portal(Realm())
        self.jwt: JWTChecker | None = None
        self._static = bool(config.tokens)
        # The JWT checker is registered first: a JSONWebToken is also an
        # IBearerToken, and the Portal hands credentials to the first checker
        # registered for an interface they provide.
        if config.jwt is not None:
            self.jwt = JWTChecker(config.jwt, clock, fetch)
            self.portal.registerChecker(self.jwt)
        if config.tokens:
            self.portal.registerChecker(StaticTokenChecker(config.tokens))

    def start(self) -> None:
        """Start fetching the JWKS, if one is configured."""
        if self.jwt is not None:
            self.jwt.start()

    def stop(self) -> None:
        if self.jwt is not None:
            self.jwt.stop()

    def credentials(self, token: str) -> BearerToken | JSONWebToken:
        """A JWT-shaped token goes to the JWT checker if there is one; others to the static one."""
        if self.jwt is not None and (_JWT_RE.match(token) or not self._static):
            return JSONWebToken(token)
        return BearerToken(token)

    def authenticate(
        self, authorization: bytes | None, query_has_token: bool, basic: bool = False
    ) -> Deferred[Principal]:
        """Who sent this request; fails with L{AuthFailure}.

        @param authorization: the Authorization header, if any.
        @param query_has_token: whether the URL has C{access_token}, which is
            refused (tokens must not travel in URLs, where logs keep them).
        @param basic: whether the token may come as the password of Basic
            credentials (under C{/admin/} only, for the dashboard).
        """
        if not self.config.enabled:
            return defer.succeed(ANONYMOUS)
        if query_has_token:
            return defer.fail(AuthFailure(401, "token in query string", "invalid_request"))
        try:
            token = bearer_token(authorization, basic)
        except AuthFailure as e:
            return defer.fail(e)
        d = self.portal.login(self.credentials(token), None, IPrincipal)
        return d.addCallbacks(_avatar, _refused)

    def www_authenticate(
        self,
        resource_metadata_url: str | None,
        failure: AuthFailure | None,
        scope: str | None = None,
    ) -> bytes:
        """The C{WWW-Authenticate} challenge of a refusal (RFC 6750, RFC 9728)."""
        params: list[tuple[str, str]] = []
        if resource_metadata_url:
            params.append(("resource_metadata", resource_metadata_url))
        if scope:
            params.append(("scope", scope))
        if failure is not None and failure.error is not None:
            params.append(("error", failure.error))
            params.append(("error_description", failure.reason))
        if not params:
            return b"Bearer"
        return b"Bearer " + b", ".join(b'%s="%s"' % (k.encode(), _quote(v)) for k, v in params)


def _avatar(result: tuple[object, object, object]) -> Principal:
    avatar = result[1]
    assert isinstance(avatar, Principal)
    return avatar


def _refused(failure: Failure) -> Failure:
    if failure.check(KeysUnavailable):
        # The token may be fine: the bridge cannot check it yet.
        raise AuthFailure(503, "keys unavailable", None)
    if failure.check(UnauthorizedLogin):
        raise AuthFailure(401, str(failure.value) or "invalid token", "invalid_token")
    if failure.check(UnhandledCredentials):
        raise AuthFailure(401, "invalid token", "invalid_token")
    return failure


def _quote(value: str) -> bytes:
    """An RFC 9110 quoted-string body: C{"} and C{\\} escaped, nothing but printable ASCII."""
    printable = "".join(c if " " <= c <= "~" else "?" for c in value)
    return printable.replace("\\", "\\\\").replace('"', '\\"').encode("ascii")
