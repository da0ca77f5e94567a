"""Port clashes are configuration errors: `conceptlens serve` checks its gRPC and metrics ports before it loads
any model, and the server turns a bind that still fails (a port taken in between) into the same one-line error.

gRPC sets SO_REUSEPORT by default, so a second server on a used port would silently share it and split the
calls between two processes; the server turns that off (`grpc.so_reuseport` 0) unless `--reuse-port` asks for it.
"""

from __future__ import annotations

import errno
import socket

from conceptlens.handlers.errors import InvalidInput


def in_use(port: int, flag: str, host: str = "") -> InvalidInput:
    """The error for a port something else already listens on; it names the flag that changes it."""
    where = f" on {host}" if host else ""
    hint = " (or give --reuse-port to every server that shares it)" if flag == "--port" else ""
    return InvalidInput(flag, f"port {port} is already in use{where}; choose another {flag} or stop the process "
                        f"listening there{hint}")


def check_free(host: str, port: int, flag: str) -> None:
    """Raise `in_use` (InvalidInput) when `host:port` cannot be bound because something listens on it. Port 0
    (pick a free one) always passes; so do addresses this machine lacks, as long as one of `host`'s binds."""
    if port == 0:
        return
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # gRPC writes IPv6 as [::]
    try:
        infos = socket.getaddrinfo(name or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise InvalidInput("--host", f"cannot resolve {host!r}: {err.strerror}") from None
    failures = []
    for family, kind, proto, _, address in infos:  # one at a time: [::] and 0.0.0.0 overlap on dual-stack hosts
        with socket.socket(family, kind, proto) as sock:
            # as the real servers bind: SO_REUSEADDR (a port in TIME_WAIT is free), no SO_REUSEPORT (a listener
            # that allows sharing must still count as taken)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
                sock.listen(1)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise in_use(port, flag, host) from None
                failures.append(err)
    if len(failures) == len(infos):
        raise InvalidInput(flag, f"cannot listen on {host}:{port}: {failures[0].strerror}")
