# -*- test-case-name: tests.test_startup -*-
"""Twisted's reactor and endpoints without pyOpenSSL until TLS is used.

Twisted imports pyOpenSSL, and with it cryptography, whenever they are
installed: C{twisted.internet.tcp} and C{twisted.internet.posixbase} (so
the reactor) and C{twisted.internet.endpoints} all try it at import. That is
about 15 MiB of resident memory in a bridge that serves no TLS and makes no
HTTPS request. L{import_twisted_without_tls} imports those modules while
C{OpenSSL} cannot be found, as Twisted would on a host without it, and then
points their TLS entry points at a stand-in that imports Twisted's TLS on
first use. So the bridge's TLS listeners (L{mcptwist.security.tls}, which
imports pyOpenSSL itself), C{reactor.listenSSL}/C{connectSSL},
C{wrapClientTLS} and HTTPS through C{twisted.web.client} work as usual,
loading pyOpenSSL when they are first used.

Not restored: C{startTLS} on a plain TCP connection (the bridge never
upgrades a connection in place), and the names C{twisted.internet.endpoints}
imports from C{twisted.internet.ssl} for its C{tls:} client strings and
C{wrapServerTLS} (the bridge builds its TLS stacks itself).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

HIDDEN = "OpenSSL"


class _Hide(importlib.abc.MetaPathFinder):
    """Makes C{OpenSSL} look absent while Twisted's modules are imported."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == HIDDEN or fullname.startswith(HIDDEN + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


class _TLSOnFirstUse:
    """Stands for C{twisted.protocols.tls} where Twisted found it missing."""

    @staticmethod
    def TLSMemoryBIOFactory(*args: Any, **kwargs: Any) -> Any:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        return TLSMemoryBIOFactory(*args, **kwargs)


def import_twisted_without_tls() -> bool:
    """Import the reactor and C{twisted.internet.endpoints} without pyOpenSSL
    (see the module's docstring). Does nothing when pyOpenSSL is not
    installed, or is imported already, or the reactor is.

    @return: whether the modules were imported without pyOpenSSL.
    """
    if HIDDEN in sys.modules or "twisted.internet.tcp" in sys.modules:
        return False
    if importlib.util.find_spec(HIDDEN) is None:
        return False
    hide = _Hide()
    sys.meta_path.insert(0, hide)
    try:
        from twisted.internet import endpoints, posixbase
        from twisted.internet import reactor as _reactor  # noqa: F401 (installs the default)
    finally:
        sys.meta_path.remove(hide)
    from twisted.internet.interfaces import IReactorSSL
    from zope.interface import classImplements

    if endpoints.TLSMemoryBIOFactory is None:
        endpoints.TLSMemoryBIOFactory = _TLSOnFirstUse.TLSMemoryBIOFactory  # type: ignore[assignment]
    if posixbase.tls is None and posixbase.ssl is None:
        posixbase.tls = _TLSOnFirstUse  # type: ignore[assignment]
        classImplements(posixbase.PosixReactorBase, IReactorSSL)
    return True
