"""Secrets by reference: a file or an environment variable on this host
holds the secret; records and orders only name where it is."""

from __future__ import annotations

import os
import socket
from pathlib import Path


class SecretError(ValueError):
    """The secret cannot be read where its reference points; str() says why."""


def read_secret(what: str, file: str = "", env: str = "") -> str:
    """The secret `what` (e.g. "the password of vCenter vc1") from the file,
    else the environment variable; trailing line breaks dropped."""
    if file:
        try:
            return Path(file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise SecretError(f"cannot read {what} from {file} on {socket.gethostname()}: {exc.strerror}") from None
    if env:
        value = os.environ.get(env)
        if value is None:
            raise SecretError(f"{what} is expected in the environment variable {env}, which is not set on "
                              f"{socket.gethostname()}")
        return value
    raise SecretError(f"{what} has neither a file nor an environment variable to come from")
