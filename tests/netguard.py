"""A guard that makes every outbound network connection of the test process fail loudly.

Installed for the whole suite by ``tests/conftest.py`` (issue 5 item 9): ``socket.connect`` and
``connect_ex`` (and so ``socket.create_connection``, urllib, aiohttp and asyncio, which all
connect through them) refuse any address that is not loopback, raising
:class:`OutboundConnectionBlocked`. Every refused attempt is also recorded in :data:`BLOCKED`,
so an attempt that some library catches and swallows still fails the test that made it.
Loopback (the host tests' server), Unix sockets and ``localhost`` stay allowed.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

log = logging.getLogger(__name__)

#: ``"host:port"`` of every refused attempt since :func:`install`.
BLOCKED: list[str] = []
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})

_originals: dict[str, object] = {}


class OutboundConnectionBlocked(ConnectionRefusedError):
    """A test (or the code it runs) tried to open a connection to a non-loopback address."""


def is_local(address: object) -> bool:
    """Whether a ``connect`` address stays on this machine (loopback, unspecified or Unix)."""
    if not isinstance(address, tuple):
        return True  # AF_UNIX path or abstract name
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).split("%")[0]
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name other than localhost: refused before any lookup
    mapped = getattr(ip, "ipv4_mapped", None)
    ip = mapped or ip
    return ip.is_loopback or ip.is_unspecified


def _refuse(address: object) -> None:
    target = ":".join(map(str, address[:2])) if isinstance(address, tuple) else str(address)
    BLOCKED.append(target)
    log.error("blocked an outbound connection to %s", target)
    raise OutboundConnectionBlocked(
        f"outbound network connection to {target} attempted during the tests; the pack and "
        f"its tests must never reach the network (tests/netguard.py)")


def _guarded(name: str):
    original = _originals[name]

    def method(self: socket.socket, address: object):
        if not is_local(address):
            _refuse(address)
        return original(self, address)

    method.__name__ = name
    return method


def install() -> None:
    """Patch ``socket.socket.connect``/``connect_ex`` (idempotent)."""
    for name in ("connect", "connect_ex"):
        if name not in _originals:
            _originals[name] = getattr(socket.socket, name)
            setattr(socket.socket, name, _guarded(name))


def uninstall() -> None:
    """Restore the original methods."""
    for name, original in _originals.items():
        setattr(socket.socket, name, original)
    _originals.clear()


def installed() -> bool:
    return socket.socket.connect.__module__ == __name__
