"""The CloudStack API through `cs` (the maintained client: it signs every
request, and polls async jobs with queryAsyncJobResult under a timeout).
Every failure becomes a CloudError whose text an operator can act on:
CloudStack's own error text, its code by name, the command it answered."""

from __future__ import annotations

import requests
from cs import CloudStack, CloudStackApiException, CloudStackException
from django.conf import settings

from replication.models import CloudError, CloudStackConfig

# CloudStack's error codes (ApiErrorCode), as an operator reads them.
ERROR_CODES = {
    401: "unauthorized (API key or secret refused)",
    405: "method not allowed",
    431: "parameter error",
    432: "unsupported action",
    433: "API limit exceeded",
    530: "internal error",
    531: "account error",
    532: "account resource limit",
    533: "insufficient capacity",
    534: "resource unavailable",
    535: "resource allocation error",
    536: "resource in use",
    537: "network rule conflict",
}


def describe(error) -> str:
    if isinstance(error, dict) and "errorcode" in error:
        code = int(error["errorcode"])
        return f"{code} {ERROR_CODES.get(code, 'error')}: {error.get('errortext', '').strip()}"
    return str(error)


class CloudClient:
    def __init__(self, config: CloudStackConfig, *, timeout_s: float | None = None, job_timeout_s: float = 300.0,
                 poll_interval_s: float = 0.5):
        self.config = config
        self.job_timeout_s = job_timeout_s
        # Each HTTP request (cs retries a failed one twice); an async job's
        # wait is job_timeout_s.
        self.timeout_s = settings.PROBE_TIMEOUT_S if timeout_s is None else timeout_s
        timeout_s = self.timeout_s
        self._cs = CloudStack(endpoint=config.api_url, key=config.api_key, secret=config.secret(),
                              timeout=timeout_s, job_timeout=int(job_timeout_s), poll_interval=poll_interval_s,
                              fetch_result=True, retry=2)

    def call(self, command: str, **params) -> dict:
        """One API call; an async one returns its job's result once it is done."""
        try:
            return getattr(self._cs, command)(**params)
        except CloudStackApiException as exc:
            raise CloudError(f"CloudStack {command}: {describe(exc.error)}") from None
        except CloudStackException as exc:
            if "Timeout waiting for async job result" in str(exc.args[0] if exc.args else ""):
                job = exc.args[1] if len(exc.args) > 1 else "?"
                raise CloudError(f"CloudStack {command}: its job {job} did not finish within "
                                 f"{self.job_timeout_s:.0f} s (CLOUDSTACK_JOB_TIMEOUT_S)") from None
            raise CloudError(f"CloudStack {command}: {' '.join(str(a) for a in exc.args)}") from None
        except requests.Timeout:
            raise CloudError(f"CloudStack at {self.config.api_url} did not answer {command} within "
                             f"{self.timeout_s:g} s (PROBE_TIMEOUT_S)") from None
        except requests.RequestException as exc:
            raise CloudError(f"cannot reach CloudStack at {self.config.api_url}: {exc}") from None

    def one(self, command: str, item: str, **params) -> dict | None:
        """The first item of a list call, or None."""
        rows = self.call(command, **params).get(item) or []
        return rows[0] if rows else None

    def check(self) -> list[str]:
        """Read calls that prove the config: the credentials and every id it
        names. Returns what was found; raises CloudError with the first
        missing thing or CloudStack's own error text."""
        c = self.config
        found = []
        checks = [("zone", "listZones", "zone", c.zone_id), ("disk offering", "listDiskOfferings", "diskoffering",
                                                               c.disk_offering_id),
                  ("service offering", "listServiceOfferings", "serviceoffering", c.service_offering_id),
                  ("network", "listNetworks", "network", c.network_id),
                  ("template", "listTemplates", "template", c.template_id),
                  ("OMA VM", "listVirtualMachines", "virtualmachine", c.oma_vm_id)]
        for what, command, item, ident in checks:
            if not ident:
                continue
            extra = {"templatefilter": "executable"} if command == "listTemplates" else {}
            row = self.one(command, item, id=ident, **extra)
            if row is None:
                raise CloudError(f"CloudStack has no {what} with id {ident}")
            found.append(f"{what} {row.get('name', ident)}")
        return found
