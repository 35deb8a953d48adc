"""This agent's own identity at the OMA's NBD export server (TLS-PSK).

An enrolled agent is given its own key at approval (the OMA's
services.export_keys adds its line, vma-<name>:<hex>, to the export
server's PSK file, and removes it at revocation); enrolment writes it to
<state dir>/export.psk (VMA_EXPORT_PSK_FILE, VMA_EXPORT_TLS_USERNAME). Work
orders name the export as the OMA sees it (its shared identity and key
file); the agent's copies present their own instead. No Django here."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

TLS_SCHEMES = ("nbds", "nbds+unix")


def own_uri(uri: str, psk_file: str, username: str) -> str:
    """`uri` with this agent's TLS-PSK identity (`username`, its key in
    `psk_file`) in place of the one the OMA wrote; unchanged for an export
    without TLS or an agent without a key of its own."""
    parts = urlsplit(uri)
    if not psk_file or not username or parts.scheme not in TLS_SCHEMES:
        return uri
    host = parts.netloc.rsplit("@", 1)[-1]
    query = [(key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True)
             if key not in ("tls-psk-file", "tls-username")]
    query.append(("tls-psk-file", psk_file))
    return urlunsplit(parts._replace(netloc=f"{quote(username, safe='')}@{host}",
                                     query=urlencode(query, safe="/")))
