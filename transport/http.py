"""The HTTP client boundary: the one module that owns aiohttp client sessions.

An :class:`HttpClient` is one ``aiohttp.ClientSession`` with bounded concurrency (its
connection pool is as large as its concurrency, so a request never waits for a pooled
connection after it was stamped as sent), redirects off, a per-request timeout and a
bounded body read. aiohttp errors are translated into :class:`HttpError` with a bounded
``reason``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

import aiohttp
from multidict import CIMultiDictProxy

from fleetprobe.transport.errors import TransportError

MAX_BODY_BYTES = 1 << 20


class HttpError(TransportError):
    """A request that got no usable response; ``reason`` is a bounded label."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A response, with monotonic stamps of the request start and of its arrival."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    sent_ns: int
    received_ns: int


class HttpClient:
    """A shared HTTP client; use as an async context manager.

    Args:
        concurrency: requests in flight at most (the pool has as many connections).
        timeout_s: the default total time for one request.
        max_body_bytes: longer bodies are refused (reason ``too_large``), never read whole.
        tls: how https peers are verified (default: the system's CAs).
    """

    def __init__(
        self,
        *,
        concurrency: int = 16,
        timeout_s: float = 5.0,
        max_body_bytes: int = MAX_BODY_BYTES,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._tls = tls
        self._concurrency = asyncio.Semaphore(concurrency)
        self._limit = concurrency
        self._timeout_s = timeout_s
        self._max_body = max_body_bytes
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpClient:
        connector = aiohttp.TCPConnector(
            limit=self._limit, limit_per_host=self._limit, ssl=self._tls or True
        )
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=True, raise_for_status=False
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout_s: float | None = None,
    ) -> HttpResponse:
        """Send one request and read the whole (bounded) response.

        Raises:
            HttpError: no response, a broken connection, a timeout or a body too large.
        """
        if self._session is None:
            raise RuntimeError("HttpClient used outside 'async with'")
        timeout = aiohttp.ClientTimeout(total=timeout_s or self._timeout_s)
        async with self._concurrency:
            sent_ns = time.monotonic_ns()
            try:
                async with self._session.request(
                    method, url, headers=headers, data=body, timeout=timeout, allow_redirects=False
                ) as response:
                    received_ns = time.monotonic_ns()
                    payload = await self._read(response, url)
                    return HttpResponse(
                        response.status, response.headers, payload, sent_ns, received_ns
                    )
            except TimeoutError:
                raise HttpError(f"{method} {url}: no answer in time", reason="timeout") from None
            except aiohttp.ClientConnectorCertificateError as error:
                raise HttpError(
                    f"{method} {url}: certificate not trusted ({error.certificate_error})",
                    reason="tls",
                ) from None
            except aiohttp.ClientConnectorError as error:
                raise HttpError(
                    f"{method} {url}: {error.strerror or error}", reason="refused"
                ) from None
            except aiohttp.ClientPayloadError as error:
                raise HttpError(
                    f"{method} {url}: broken body ({error})", reason="bad_body"
                ) from None
            except aiohttp.ClientError as error:
                raise HttpError(f"{method} {url}: {error}", reason="connection") from None
            except ValueError as error:  # a header value aiohttp refuses (CR/LF, ...)
                raise HttpError(f"{method} {url}: {error}", reason="bad_request") from None

    async def _read(self, response: aiohttp.ClientResponse, url: str) -> bytes:
        declared = response.content_length
        if declared is not None and declared > self._max_body:
            raise HttpError(
                f"{url}: body of {declared} bytes is over the limit", reason="too_large"
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self._max_body:
                raise HttpError(f"{url}: body over {self._max_body} bytes", reason="too_large")
            chunks.append(chunk)
        return b"".join(chunks)
