"""A small HTTP client of the coordinator for the CLI; errors become one clear line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["ApiClient", "ApiError"]


class ApiError(Exception):
    """The coordinator refused a request or could not be reached; `str()` is the line to show."""


@dataclass
class ApiClient:
    """Calls `/api/v1` on `url`, with the admin token on writes."""

    url: str
    token: str | None = None
    timeout: float = 60.0

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        target = f"{self.url.rstrip('/')}/api/v1{path}"
        try:
            response = httpx.request(method, target, headers=headers, timeout=self.timeout, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the coordinator at {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise ApiError(f"{_detail(response)} (HTTP {response.status_code})")
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        """GET a resource."""
        return self._request("GET", path, params=params or None)

    def post_json(self, path: str, body: dict[str, Any]) -> Any:
        """POST a JSON body."""
        return self._request("POST", path, json=body)

    def push_model(self, file: Path, *, name: str, version: str, fields: dict[str, str]) -> Any:
        """Upload a model file as `name:version`."""
        with file.open("rb") as fh:
            files = {"file": (file.name, fh, "application/octet-stream")}
            return self._request("POST", f"/models/{name}/versions", data={"version": version, **fields}, files=files)

    def add_variant(self, file: Path, *, name: str, version: str, fields: dict[str, str]) -> Any:
        """Upload a file as another variant of `name:version`."""
        with file.open("rb") as fh:
            files = {"file": (file.name, fh, "application/octet-stream")}
            return self._request("POST", f"/models/{name}/versions/{version}/variants", data=fields, files=files)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])
    return str(body)[:500]
