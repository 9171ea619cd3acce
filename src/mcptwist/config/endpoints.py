# -*- test-case-name: tests.test_config,tests.test_tls -*-
"""Endpoint strings as the configuration writes them: split, joined, checked.

An C{ssl:} string becomes a TCP endpoint plus a L{TLSConfig}, so that the
certificate can be re-read on reload; every other string is parsed by
Twisted without listening, so that a typo fails when the file is read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Final

from .model import DEFAULT_LISTEN, ConfigError, ListenerConfig, TLSConfig

# What the endpoint objects built while checking a string are given as their
# reactor: they only store it, and are thrown away without listening.
_PARSING_ONLY: Final[Any] = object()


def listener_from_string(source: str, key: str, description: str) -> ListenerConfig:
    """A listener from an endpoint string; C{ssl:} becomes TCP plus a reloadable TLS setup."""
    try:
        parsed = parse_ssl_endpoint(description)
    except ValueError as e:
        raise ConfigError(
            source,
            key,
            f"{description!r} is not a usable TLS endpoint ({e})",
            'write "ssl:8443:privateKey=key.pem:certKey=cert.pem[:extraCertChain=chain.pem]", '
            "or use a [[listeners]] table with tls = {...}",
        ) from None
    if parsed is None:
        check_endpoint(source, key, description)
        return ListenerConfig(description)
    endpoint, tls = parsed
    check_endpoint(source, key, endpoint)
    _check_tls_files(source, key, tls)
    return ListenerConfig(endpoint, tls=tls)


def _check_tls_files(source: str, key: str, tls: TLSConfig) -> None:
    for what, path in (("certificate", tls.certificate), ("key", tls.key), ("chain", tls.chain)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(
                source,
                key,
                f"the TLS {what} file {path!r} does not exist",
                "give the path of a PEM file readable by the bridge",
            )


def check_endpoint(source: str, key: str, description: str) -> None:
    """Parse an endpoint string without listening, so typos fail at load time."""
    from twisted.internet.endpoints import serverFromString

    kind = description.split(":", 1)[0]
    if kind == "haproxy":
        raise ConfigError(
            source,
            key,
            "haproxy: endpoints would let any peer claim any client address",
            "use a [[listeners]] table with proxy_protocol = true and trusted_proxies",
        )
    if kind == "systemd":
        # Resolved against the inherited sockets only at start.
        return
    try:
        # Parsing only builds the endpoint object: nothing listens yet.
        serverFromString(_PARSING_ONLY, description)
    except Exception as e:
        raise ConfigError(
            source,
            key,
            f"{description!r} is not a valid endpoint ({e})",
            f'use a Twisted endpoint string such as "{DEFAULT_LISTEN}" or '
            '"ssl:8443:privateKey=key.pem:certKey=cert.pem"',
        ) from None


def quote_argument(value: str) -> str:
    """Escape C{value} for one field of a Twisted endpoint string.

    Unlike Twisted's C{quoteStringArgument}, C{=} is escaped too, so that
    positional values containing it survive.
    """
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """Split an endpoint string into positional and keyword fields.

    Same rules as Twisted's parser: C{:} separates fields, the first C{=} of
    a field separates key and value, a backslash makes the next character
    literal. Later keywords override earlier ones.

    @raise ValueError: for a lone backslash at the end or a non-ASCII name.
    """
    args: list[str] = []
    kw: dict[str, str] = {}
    field: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for c in chars:
        if c == ":":
            field.append("".join(current))
            _add_field(field, args, kw)
            field, current = [], []
        elif c == "=" and not field:
            field.append("".join(current))
            current = []
        elif c == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError("ends with a lone backslash; write \\\\ for a backslash")
            current.append(escaped)
        else:
            current.append(c)
    field.append("".join(current))
    _add_field(field, args, kw)
    return args, kw


def _add_field(field: list[str], args: list[str], kw: dict[str, str]) -> None:
    if len(field) == 1:
        args.append(field[0])
    elif not field[0].isascii():
        raise ValueError(f"parameter name {field[0]!r} is not ASCII")
    else:
        kw[field[0]] = field[1]


def join_description(args: Iterable[str], kw: Iterable[tuple[str, str]] = ()) -> str:
    """The endpoint string for these fields (inverse of L{split_description})."""
    fields = [quote_argument(a) for a in args]
    fields += [f"{quote_argument(k)}={quote_argument(v)}" for k, v in kw]
    return ":".join(fields)


def parse_ssl_endpoint(description: str) -> tuple[str, TLSConfig] | None:
    """Split an C{ssl:} endpoint string into a C{tcp:} one and a L{TLSConfig}.

    Twisted's defaults apply: C{privateKey} is C{server.pem}, C{certKey} is
    the C{privateKey} file, C{extraCertChain} becomes the chain. Port,
    interface and backlog are kept. Returns None if C{description} is not
    an C{ssl:} endpoint.

    @raise ValueError: for C{dhParameters} or C{sslmethod} (replaced by
        ECDHE-only ciphers and C{min_version}), or a malformed string.
    """
    args, kw = split_description(description)
    if args[:1] != ["ssl"]:
        return None
    positional = args[1:]
    if len(positional) > len(_SSL_PARAMETERS):
        raise ValueError(f"ssl: takes at most {len(_SSL_PARAMETERS)} parameters")
    params = dict(zip(_SSL_PARAMETERS, positional, strict=False))
    for name, value in kw.items():
        if name not in _SSL_PARAMETERS:
            raise ValueError(f"ssl: has no parameter {name!r}")
        if name in params:
            raise ValueError(f"ssl: parameter {name!r} is given twice")
        params[name] = value
    if "sslmethod" in params:
        raise ValueError(
            "sslmethod is not supported: the TLS version is chosen by min_version "
            '("1.2" or "1.3") of the listener\'s tls settings'
        )
    if "dhParameters" in params:
        raise ValueError(
            "dhParameters is not needed: only ECDHE key exchange is offered, "
            "which uses no DH parameters; remove it"
        )
    if "port" not in params:
        raise ValueError("ssl: needs a port, such as ssl:8443")
    for name in ("port", "backlog"):
        if name in params:
            try:
                int(params[name])
            except ValueError:
                raise ValueError(f"ssl: {name} {params[name]!r} is not a number") from None
    tcp_kw = [(name, params[name]) for name in ("interface", "backlog") if name in params]
    tcp = join_description(["tcp", params["port"]], tcp_kw)
    key = params.get("privateKey", "server.pem")
    config = TLSConfig(
        certificate=params.get("certKey", key), key=key, chain=params.get("extraCertChain")
    )
    return tcp, config


# Parameters of Twisted's ssl: endpoint, in positional order (_parseSSL).
_SSL_PARAMETERS: Final = (
    "port",
    "privateKey",
    "certKey",
    "sslmethod",
    "interface",
    "backlog",
    "extraCertChain",
    "dhParameters",
)
