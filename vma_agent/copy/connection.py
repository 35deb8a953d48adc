"""Opening and closing NBD connections with libnbd, and the set of them one
pipeline drives."""

from __future__ import annotations

import os
import time

import nbd


class CopyError(RuntimeError):
    """A copy failed; the message names the offset, length and server error."""


class ConnectTimeout(CopyError):
    """The NBD server did not complete the connection and handshake in time."""


def connect(uri: str, *, meta_context: str | None = None, timeout_s: float | None = None) -> nbd.NBD:
    """A connected handle; with timeout_s, the connection and the NBD
    handshake must be done within it (a server that accepts and never
    speaks would otherwise hold the caller for ever)."""
    handle = nbd.NBD()
    if meta_context:
        handle.add_meta_context(meta_context)
    if "tls-psk-file=" in uri:
        # A TLS-PSK export names its key file in the URI (the key itself is
        # never in a URI or on a command line); libnbd reads it only if allowed.
        handle.set_uri_allow_local_file(True)
    try:
        if timeout_s is None:
            handle.connect_uri(uri)
        else:
            _connect_within(handle, uri, timeout_s)
    except nbd.Error as exc:
        raise CopyError(f"cannot connect to {uri}: {exc.string}") from exc
    return handle


def _connect_within(handle: nbd.NBD, uri: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    handle.aio_connect_uri(uri)
    while not handle.aio_is_ready():
        if handle.aio_is_dead() or handle.aio_is_closed():
            raise CopyError(f"cannot connect to {uri}: {nbd.get_error() or 'the connection ended in the handshake'}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConnectTimeout(f"{uri} did not complete the NBD handshake within {timeout_s:g} s")
        handle.poll(max(1, int(remaining * 1000)))


def close(handle: nbd.NBD | None) -> None:
    if handle is None:
        return
    try:
        if handle.aio_in_flight():
            _cut(handle)  # requests were abandoned (a stopped copy's reads): do not wait for their answers
        handle.shutdown()
    except nbd.Error:
        pass  # the connection is already gone; the copy's own error says why


def _cut(handle: nbd.NBD) -> None:
    """Cut the handle's connection. nbd_shutdown alone is polite: it waits
    for the server to answer every request already sent, however slowly it
    does. libnbd 1.14's Python binding has no abrupt close, so the socket
    is shut down under it; libnbd then finds the connection dead and fails
    the abandoned requests at once."""
    import socket  # only a stopped copy needs it

    with socket.socket(fileno=os.dup(handle.aio_get_fd())) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def export_size(uri: str, *, timeout_s: float | None = None) -> int:
    handle = connect(uri, timeout_s=timeout_s)
    try:
        return handle.get_size()
    finally:
        close(handle)


class Connections:
    """One pipeline's source and target connections (one or more of each),
    reconnected after a broken connection so a retry has something to retry
    on. The synchronous path (retries) uses the first of each."""

    def __init__(self, src_uri: str, dst_uri: str, sources: int = 1, targets: int = 1):
        self.src_uri, self.dst_uri = src_uri, dst_uri
        self.srcs: list[nbd.NBD] = []
        self.dsts: list[nbd.NBD] = []
        try:
            self.srcs.extend(_open(src_uri) for _ in range(sources))
            self.dsts.extend(_open(dst_uri) for _ in range(targets))
        except CopyError:
            self.close()
            raise
        self.generation = 0  # moves on each reconnect: late callbacks of old handles are ignored
        self.repair_error: CopyError | None = None

    @property
    def src(self) -> nbd.NBD:
        return self.srcs[0]

    @property
    def dst(self) -> nbd.NBD:
        return self.dsts[0]

    def repair(self) -> None:
        """Reconnect dead connections; remembers why that failed, if it did."""
        self.repair_error = None
        for handles, uri in ((self.srcs, self.src_uri), (self.dsts, self.dst_uri)):
            for position, handle in enumerate(handles):
                if handle.aio_is_dead() or handle.aio_is_closed():
                    close(handle)
                    self.generation += 1
                    try:
                        handles[position] = _open(uri)
                    except CopyError as exc:
                        self.repair_error = exc
                        return

    def close(self) -> None:
        for handle in self.srcs + self.dsts:
            close(handle)


def _open(uri: str) -> nbd.NBD:
    handle = connect(uri)
    handle.set_pread_initialize(False)  # every buffer is read whole or the read fails: no need to clear it first
    return handle
