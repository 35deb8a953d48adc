"""The agent's broker link over TLS (amqps), verified.

When its broker URL is amqps://host:port/vhost, the worker's connection is
TLS with the broker's certificate checked: signed by the CA the OMA handed
over at approval (VMA_BROKER_CA_FILE, <state dir>/broker_ca.pem), or by the
system's CAs when no file is named, and issued for the host the URL names.
A plain amqp:// (or redis://) URL gets no TLS options at all: Celery's
default, as before. No Django here (settings.py calls it)."""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

TLS_SCHEMES = ("amqps",)


def is_tls(url: str) -> bool:
    return urlsplit(url).scheme in TLS_SCHEMES


def use_ssl(url: str, ca_file: str = "") -> dict | bool:
    """Celery's broker_use_ssl for `url`: False (no TLS) unless the URL is
    amqps; then the certificate is required, checked against `ca_file` (or
    the system's CAs), and its name must be the URL's host."""
    if not is_tls(url):
        return False
    options = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": urlsplit(url).hostname}
    if ca_file:
        options["ca_certs"] = ca_file
    return options
