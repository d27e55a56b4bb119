"""Where a run's proxies live: in this process, or on a Toxiproxy server.

Both backends offer the same few operations the fault timeline needs, so a scenario can
move from the built-in proxy to an existing Toxiproxy (``faults.backend: toxiproxy``)
without other changes. Each backend removes, at the end, the proxies it created.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from typing import Any

from fleetprobe.core.errors import FleetprobeError
from fleetprobe.faults.proxy import ProxySet
from fleetprobe.faults.toxics import ToxicSpec
from fleetprobe.transport.http import HttpClient, HttpError

log = logging.getLogger("fleetprobe.faults")


class BackendError(FleetprobeError):
    """The proxy backend refused or could not carry out an operation."""


class ProxyBackend(ABC):
    """Creates proxies and changes their toxics; an async context manager."""

    async def __aenter__(self) -> ProxyBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @abstractmethod
    async def create(self, name: str, listen: str, upstream: str) -> str:
        """Create and start a proxy; return the address it listens on (HOST:PORT)."""

    @abstractmethod
    async def add_toxic(self, proxy: str, spec: ToxicSpec) -> None:
        """Add a toxic to a proxy."""

    @abstractmethod
    async def remove_toxic(self, proxy: str, name: str) -> None:
        """Remove a toxic from a proxy."""

    @abstractmethod
    async def set_enabled(self, proxy: str, enabled: bool) -> None:
        """Take a proxy down (listener closed, connections cut) or bring it back."""

    @abstractmethod
    async def close(self) -> None:
        """Remove every proxy this backend created."""


class BuiltinBackend(ProxyBackend):
    """Proxies in this process (:mod:`faults.proxy`)."""

    def __init__(self, seed: int | None = None) -> None:
        self._proxies = ProxySet(seed)

    async def create(self, name: str, listen: str, upstream: str) -> str:
        proxy = await self._proxies.create(name, listen, upstream)
        return proxy.listen

    async def add_toxic(self, proxy: str, spec: ToxicSpec) -> None:
        self._proxies.get(proxy).add_toxic(spec)

    async def remove_toxic(self, proxy: str, name: str) -> None:
        self._proxies.get(proxy).remove_toxic(name)

    async def set_enabled(self, proxy: str, enabled: bool) -> None:
        await self._proxies.update(proxy, listen=None, upstream=None, enabled=enabled)

    async def close(self) -> None:
        await self._proxies.close()


class ToxiproxyBackend(ProxyBackend):
    """Proxies on a Toxiproxy server (or ``fleetprobe proxy``), through its HTTP API.

    Args:
        url: the API, like ``http://127.0.0.1:8474``.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._client = HttpClient(concurrency=2, timeout_s=5.0)
        self._created: list[str] = []

    async def __aenter__(self) -> ToxiproxyBackend:
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.close()
        finally:
            await self._client.__aexit__(None, None, None)

    async def create(self, name: str, listen: str, upstream: str) -> str:
        body = {"name": name, "listen": listen, "upstream": upstream, "enabled": True}
        status, answer = await self._call("POST", "/proxies", body, ok=(201, 409))
        if status == 409:
            # Left over from a run that could not clean up: replace it.
            log.warning("toxiproxy: replacing the existing proxy %r", name)
            await self._call("DELETE", f"/proxies/{name}", ok=(204,))
            status, answer = await self._call("POST", "/proxies", body, ok=(201,))
        self._created.append(name)
        return str(answer["listen"])

    async def add_toxic(self, proxy: str, spec: ToxicSpec) -> None:
        await self._call("POST", f"/proxies/{proxy}/toxics", spec.model_dump(), ok=(200,))

    async def remove_toxic(self, proxy: str, name: str) -> None:
        await self._call("DELETE", f"/proxies/{proxy}/toxics/{name}", ok=(204, 404))

    async def set_enabled(self, proxy: str, enabled: bool) -> None:
        await self._call("POST", f"/proxies/{proxy}", {"enabled": enabled}, ok=(200,))

    async def close(self) -> None:
        while self._created:
            name = self._created.pop()
            try:
                await self._call("DELETE", f"/proxies/{name}", ok=(204, 404))
            except BackendError as error:
                log.warning("toxiproxy: could not remove proxy %r: %s", name, error)

    async def _call(
        self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...]
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data else None
        try:
            response = await self._client.request(
                method, self.url + path, headers=headers, body=data
            )
        except HttpError as error:
            raise BackendError(f"toxiproxy at {self.url}: {error}") from None
        answer: Any = None
        if response.body:
            try:
                answer = json.loads(response.body)
            except ValueError:
                answer = response.body.decode(errors="replace").strip()
        if response.status not in ok:
            detail = answer.get("error") if isinstance(answer, dict) else answer
            raise BackendError(
                f"toxiproxy at {self.url}: {method} {path} answered {response.status}: {detail}"
            )
        return response.status, answer
