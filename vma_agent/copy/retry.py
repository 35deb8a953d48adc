"""The copy's synchronous path: a request that failed in a pipeline is
copied again here, one call at a time, on reconnected handles; and a target
without zero support gets explicit zeros. `run` is the pipelines' CopyRun
(its retries, chunk size and whether the target reads as zeros); not
imported here, as the pipeline imports this module."""

from __future__ import annotations

import nbd

from vma_agent.copy.connection import Connections, CopyError
from vma_agent.copy.plan import Extent


class RequestFailed(Exception):
    """One NBD request failed; retried, then reported with what it was."""

    def __init__(self, operation: str, message: str):
        super().__init__(operation)
        self.operation = operation
        self.message = message

    @classmethod
    def from_nbd(cls, operation: str, error: nbd.Error) -> RequestFailed:
        return cls(operation, error.string)


def retrying(conns: Connections, item: Extent, run) -> str:
    """Copy one item synchronously, retrying on reconnected handles; a
    CopyError names the item after the last attempt."""
    # Imported here: tenacity pulls in asyncio, a tenth of a second that
    # only a copy with a failed request needs.
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

    attempts = Retrying(stop=stop_after_attempt(run.retries), wait=wait_exponential(0.2, max=5),
                        retry=retry_if_exception_type(RequestFailed), reraise=True,
                        before_sleep=lambda state: conns.repair())
    conns.repair()
    try:
        return attempts(run_sync, conns, item, run)
    except RequestFailed as exc:
        # A connection that could not be re-established says more than the
        # dead handle's own complaint.
        reason = f"connection lost and {conns.repair_error}" if conns.repair_error else exc.message
        raise CopyError(f"{exc.operation} failed at offset {item.offset} length {item.length}: {reason}") from exc


def run_sync(conns: Connections, item: Extent, run) -> str:
    """Copy one item with synchronous calls; returns "copied", "zeroed" or "skipped"."""
    if not item.zero:
        try:
            data = conns.src.pread(item.length, item.offset)
        except nbd.Error as exc:
            raise RequestFailed.from_nbd("read", exc) from exc
        if data.count(0) != len(data):
            try:
                conns.dst.pwrite(data, item.offset)
            except nbd.Error as exc:
                raise RequestFailed.from_nbd("write", exc) from exc
            return "copied"
    # Zero extents, and data that reads as zeros, are written as zeros.
    if run.target_is_zeroed:
        return "skipped"
    try:
        zero(conns.dst, item.offset, item.length, run.chunk_bytes)
    except nbd.Error as exc:
        raise RequestFailed.from_nbd("zero", exc) from exc
    return "zeroed"


def zero(dst: nbd.NBD, offset: int, length: int, chunk_bytes: int) -> None:
    if dst.can_zero():
        dst.zero(length, offset)
        return
    # A target without zero support gets explicit zero data, one chunk at a time.
    for pos in range(offset, offset + length, chunk_bytes):
        dst.pwrite(bytes(min(chunk_bytes, offset + length - pos)), pos)
