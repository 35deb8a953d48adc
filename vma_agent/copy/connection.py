"""Opening and closing NBD connections with libnbd."""

from __future__ import annotations

import nbd


class CopyError(RuntimeError):
    """A copy failed; the message names the offset, length and server error."""


def connect(uri: str, *, meta_context: str | None = None) -> nbd.NBD:
    handle = nbd.NBD()
    if meta_context:
        handle.add_meta_context(meta_context)
    if "tls-psk-file=" in uri:
        # A TLS-PSK export names its key file in the URI (the key itself is
        # never in a URI or on a command line); libnbd reads it only if allowed.
        handle.set_uri_allow_local_file(True)
    try:
        handle.connect_uri(uri)
    except nbd.Error as exc:
        raise CopyError(f"cannot connect to {uri}: {exc.string}") from exc
    return handle


def close(handle: nbd.NBD | None) -> None:
    if handle is None:
        return
    try:
        handle.shutdown()
    except nbd.Error:
        pass  # the connection is already gone; the copy's own error says why


def export_size(uri: str) -> int:
    handle = connect(uri)
    try:
        return handle.get_size()
    finally:
        close(handle)


