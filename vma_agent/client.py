"""The HTTP client of an agent's API (vma_agent.api): progress updates and
the change feed, stop and bandwidth limit. The agent's reporters post
through it; the OMA reads progress and sends stops and limits through it.
Free of Django: both sides build it with from_settings."""

from __future__ import annotations

import requests


def from_settings(settings) -> ProgressClient:
    """The client of the agent API that `settings` names (VMA_URL, VMA_TOKEN,
    VMA_REQUEST_TIMEOUT_S, VMA_HTTP_KEEPALIVE): Django's, or any object with
    those attributes."""
    return ProgressClient(settings.VMA_URL, settings.VMA_TOKEN, timeout_s=settings.VMA_REQUEST_TIMEOUT_S,
                          keep_alive=settings.VMA_HTTP_KEEPALIVE)


class ProgressUnavailable(Exception):
    """The progress API could not be asked (network error, 5xx, bad answer)."""


class ProgressClient:
    """HTTP client of the VMA progress API."""

    def __init__(self, base_url: str, token: str | None, timeout_s: float = 5.0, keep_alive: bool = True):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.keep_alive = keep_alive
        self.session = requests.Session()
        if token:  # none: only an agent on this host's loopback that trusts it answers
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _request(self, method: str, url: str, **kwargs) -> requests.Response:
        try:
            return self.session.request(method, url, timeout=self.timeout_s, **kwargs)
        finally:
            if not self.keep_alive:
                # A fresh connection per request: a server that writes headers
                # and body separately (Django's runserver) otherwise costs a
                # 40 ms Nagle/delayed-ACK stall on every reused connection.
                self.session.close()

    def post_update(self, record_id: str, body: dict) -> dict:
        """Post one update; raises ProgressUnavailable on anything worth a
        retry and ValueError on a refusal (4xx), which a retry cannot fix."""
        try:
            response = self._request("POST", f"{self.base_url}/api/v1/progress/{record_id}/update", json=body)
        except requests.RequestException as exc:
            raise ProgressUnavailable(str(exc)) from exc
        if response.status_code >= 500 or response.status_code in (401, 408, 429):
            # 401 too: the token may be fixed on the agent while the copy runs.
            raise ProgressUnavailable(f"HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            raise ValueError(f"HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def stop(self, job_id: str, reason: str) -> None:
        """Ask the agent to stop a job's copies; raises on any failure."""
        response = self._request("POST", f"{self.base_url}/api/v1/jobs/{job_id}/stop", json={"reason": reason})
        if response.status_code != 200:
            raise ProgressUnavailable(f"HTTP {response.status_code}: {response.text[:200]}")

    def set_limit(self, job_id: str, bytes_per_s: int | None) -> dict:
        """Change a job's bandwidth limit on the agent; returns the agent's
        view of it (see the agent API's /jobs/{id}/limit); raises on any failure."""
        return self._limit("POST", job_id, json={"bytes_per_s": bytes_per_s})

    def job_limit(self, job_id: str) -> dict:
        return self._limit("GET", job_id)

    def _limit(self, method: str, job_id: str, **kwargs) -> dict:
        try:
            response = self._request(method, f"{self.base_url}/api/v1/jobs/{job_id}/limit", **kwargs)
        except requests.RequestException as exc:
            raise ProgressUnavailable(str(exc)) from exc
        if response.status_code != 200:
            raise ProgressUnavailable(f"HTTP {response.status_code}: {response.text[:200]}")
        return response.json()

    def get(self, record_id: str) -> dict | None:
        """The record for a job id or export name; None when there is none (404)."""
        try:
            response = self._request("GET", f"{self.base_url}/api/v1/progress/{record_id}")
        except requests.RequestException as exc:
            raise ProgressUnavailable(str(exc)) from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ProgressUnavailable(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            return response.json()
        except ValueError as exc:
            raise ProgressUnavailable(f"answer is not JSON: {exc}") from exc

    def changes_page(self, since: int, limit: int | None = None) -> dict:
        """One page of the change feed, as the API answers it: epoch, cursor,
        more, records (changed after `since`), expired."""
        params = {"since": since} | ({"limit": limit} if limit else {})
        try:
            response = self._request("GET", f"{self.base_url}/api/v1/progress", params=params)
        except requests.RequestException as exc:
            raise ProgressUnavailable(str(exc)) from exc
        if response.status_code != 200:
            raise ProgressUnavailable(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            page = response.json()
            page["cursor"] = int(page["cursor"])
            if not isinstance(page["records"], list):
                raise TypeError("records is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise ProgressUnavailable(f"not a change feed answer: {exc!r}") from exc
        return page

    def changes(self, since: int) -> tuple[list[dict], int]:
        """Every record changed after cursor `since` (0: every live record)
        and the cursor to ask from next time; follows the pages. Does not
        notice a store emptied meanwhile: for that, read changes_page's epoch."""
        records: dict[str, dict] = {}
        while True:
            page = self.changes_page(since)
            for record in page["records"]:
                records.pop(record["id"], None)  # changed again while paging: its latest, in change order
                records[record["id"]] = record
            since = page["cursor"]
            if not page.get("more"):
                return list(records.values()), since
