"""TCP proxies with toxics, and the set of them that the API and the timeline manage."""

from __future__ import annotations

import asyncio
import logging
import os
from random import Random
from typing import Any

from fleetprobe.core.errors import FleetprobeError
from fleetprobe.faults.link import Connection
from fleetprobe.faults.toxics import Toxic, ToxicSpec
from fleetprobe.transport.servers import split_listen

log = logging.getLogger("fleetprobe.faults")


DEFAULT_LISTEN = "127.0.0.1:0"
"""Where a proxy listens when not told: loopback, any free port."""


class ProxyError(FleetprobeError):
    """A request the proxy set refuses; ``status`` is the HTTP status the API answers."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.done: list[Proxy] = []
        """For ``populate``: the proxies applied before the failure."""


def _require(**fields: str) -> None:
    for field, value in fields.items():
        if not value:
            raise ProxyError(f"missing required field: {field}", 400)


class Proxy:
    """Listens on ``listen`` and connects each client to ``upstream`` through its toxics."""

    def __init__(self, name: str, listen: str, upstream: str, rng: Random) -> None:
        self.name = name
        self.listen = listen
        self.upstream = upstream
        self.enabled = False
        self.toxics: dict[str, ToxicSpec] = {}
        self._rng = rng
        self._server: asyncio.Server | None = None
        self._connections: set[Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    def to_json(self) -> dict[str, Any]:
        """The proxy as Toxiproxy's API shows it."""
        return {
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
            # Toxiproxy lists upstream toxics first, each direction in the order added.
            "toxics": [
                toxic.model_dump()
                for stream in ("upstream", "downstream")
                for toxic in self.toxics.values()
                if toxic.stream == stream
            ],
        }

    async def start(self) -> None:
        """Listen; ``listen`` then shows the bound port (for a requested port 0).

        Raises:
            ProxyError: the address is not HOST:PORT or cannot be bound.
        """
        if self.enabled:
            return
        try:
            host, port = split_listen(self.listen)
        except ValueError as error:
            raise ProxyError(str(error), 400) from None
        try:
            self._server = await asyncio.start_server(self._serve, host, port)
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise ProxyError(f"listen tcp {self.listen}: bind: {reason.lower()}", 500) from None
        bound = self._server.sockets[0].getsockname()
        self.listen = f"{host}:{bound[1]}"
        self.enabled = True
        log.info("proxy %s listening on %s, upstream %s", self.name, self.listen, self.upstream)

    async def stop(self) -> None:
        """Close the listener and cut every connection."""
        self.enabled = False
        if self._server is not None:
            self._server.close()
            self._server = None
        for connection in list(self._connections):
            connection.close()
        # Clients still being connected upstream have no connection to close yet.
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def add_toxic(self, spec: ToxicSpec) -> ToxicSpec:
        """Add a toxic; it acts on open connections at once.

        Raises:
            ProxyError: the name is taken, or the type or an attribute is invalid.
        """
        if spec.name in self.toxics:
            raise ProxyError("toxic already exists", 409)
        try:
            spec = spec.checked()
        except ValueError as error:
            raise ProxyError(str(error), 400) from None
        self.toxics[spec.name] = spec
        for connection in self._connections:
            self._attach(connection, spec)
        return spec

    def update_toxic(self, name: str, changes: dict[str, Any]) -> ToxicSpec:
        """Change a toxic's toxicity or attributes (merged into the current ones).

        As in Toxiproxy, its name, type and stream stay.

        Raises:
            ProxyError: no such toxic, or the change is invalid.
        """
        current = self.toxic(name)
        fields = current.model_dump()
        if "toxicity" in changes:
            fields["toxicity"] = changes["toxicity"]
        attributes = changes.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise ProxyError("bad request body: attributes must be an object", 400)
        fields["attributes"] = {**current.attributes, **attributes}
        try:
            updated = ToxicSpec.model_validate(fields).checked()
        except ValueError as error:
            raise ProxyError(str(error), 400) from None
        self.remove_toxic(name)
        self.toxics[name] = updated
        for connection in self._connections:
            self._attach(connection, updated)
        return updated

    def remove_toxic(self, name: str) -> None:
        """Remove a toxic; what it held back goes on.

        Raises:
            ProxyError: no such toxic.
        """
        spec = self.toxic(name)
        del self.toxics[name]
        for connection in self._connections:
            connection.links[spec.stream].remove(name)

    def toxic(self, name: str) -> ToxicSpec:
        """The toxic called ``name``.

        Raises:
            ProxyError: no such toxic.
        """
        spec = self.toxics.get(name)
        if spec is None:
            raise ProxyError("toxic not found", 404)
        return spec

    def _attach(self, connection: Connection, spec: ToxicSpec) -> None:
        if self._rng.random() >= spec.toxicity:
            return
        link = connection.links[spec.stream]
        link.add(Toxic.registry[spec.type](spec, link))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._carry(reader, writer)
        except asyncio.CancelledError:
            # stop() cancels handlers; asyncio's stream server logs an error for a handler
            # task that ends cancelled, and this is an orderly end.
            pass
        finally:
            writer.close()
            self._handlers.discard(task)

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = split_listen(self.upstream)
        try:
            server = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=10)
        except (OSError, TimeoutError) as error:
            log.warning("proxy %s: cannot reach upstream %s: %s", self.name, self.upstream, error)
            return
        connection = Connection((reader, writer), server, self._rng)
        self._connections.add(connection)
        try:
            for spec in self.toxics.values():
                self._attach(connection, spec)
            await connection.run()
        finally:
            self._connections.discard(connection)


class ProxySet:
    """The proxies of one fault proxy server, by name."""

    def __init__(self, seed: int | None = None) -> None:
        self.proxies: dict[str, Proxy] = {}
        self._rng = Random(seed)

    def get(self, name: str) -> Proxy:
        """The proxy called ``name``.

        Raises:
            ProxyError: no such proxy.
        """
        proxy = self.proxies.get(name)
        if proxy is None:
            raise ProxyError("proxy not found", 404)
        return proxy

    async def create(self, name: str, listen: str, upstream: str, *, enabled: bool = True) -> Proxy:
        """Create (and unless ``enabled`` is false, start) a proxy.

        Raises:
            ProxyError: a missing field, a taken name, or an address that cannot be bound.
        """
        _require(name=name, upstream=upstream)
        if name in self.proxies:
            raise ProxyError("proxy already exists", 409)
        proxy = Proxy(name, listen or DEFAULT_LISTEN, upstream, self._rng)
        if enabled:
            await proxy.start()
        self.proxies[name] = proxy
        return proxy

    async def update(
        self, name: str, *, listen: str | None, upstream: str | None, enabled: bool | None
    ) -> Proxy:
        """Change a proxy's addresses (which cuts its connections) or turn it on or off.

        Raises:
            ProxyError: no such proxy, or the new address cannot be bound.
        """
        proxy = self.get(name)
        moved = (listen is not None and listen != proxy.listen) or (
            upstream is not None and upstream != proxy.upstream
        )
        was_enabled = proxy.enabled
        if moved:
            await proxy.stop()
            proxy.listen = listen or proxy.listen
            proxy.upstream = upstream or proxy.upstream
        want = was_enabled if enabled is None else enabled
        if want:
            await proxy.start()
        else:
            await proxy.stop()
        return proxy

    async def populate(self, items: list[dict[str, Any]]) -> list[Proxy]:
        """Create or replace proxies in order (Toxiproxy's ``/populate``); others stay.

        A proxy whose listen and upstream are unchanged is kept as it is, toxics and all.

        Raises:
            ProxyError: an item lacks a field (before anything changes), or cannot be
                started (the items before it stay applied; ``done`` holds them).
        """
        for number, item in enumerate(items, 1):
            for field in ("name", "upstream"):
                if not item.get(field):
                    raise ProxyError(f"missing required field: {field} at proxy {number}", 400)
        done: list[Proxy] = []
        for item in items:
            name, upstream = str(item["name"]), str(item["upstream"])
            listen = str(item.get("listen") or DEFAULT_LISTEN)
            current = self.proxies.get(name)
            if (
                current is not None
                and current.upstream == upstream
                and (listen == current.listen or listen.endswith(":0"))
            ):
                done.append(current)
                continue
            if current is not None:
                await self.delete(name)
            try:
                done.append(
                    await self.create(name, listen, upstream, enabled=item.get("enabled", True))
                )
            except ProxyError as error:
                error.done = done
                raise
        return done

    async def delete(self, name: str) -> None:
        """Stop and forget a proxy.

        Raises:
            ProxyError: no such proxy.
        """
        proxy = self.get(name)
        await proxy.stop()
        del self.proxies[name]

    async def reset(self) -> None:
        """Enable every proxy and remove every toxic (Toxiproxy's ``/reset``)."""
        for proxy in self.proxies.values():
            for name in list(proxy.toxics):
                proxy.remove_toxic(name)
            await proxy.start()

    async def close(self) -> None:
        """Stop every proxy."""
        for proxy in self.proxies.values():
            await proxy.stop()
