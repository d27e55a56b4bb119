"""The fault proxy with Toxiproxy's toxics, between real sockets on loopback."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from conftest import echo
from fleetprobe.faults.proxy import Proxy, ProxyError, ProxySet
from fleetprobe.faults.toxics import ToxicSpec
from fleetprobe.transport.servers import split_listen


@asynccontextmanager
async def echo_proxy(seed: int = 1) -> AsyncIterator[Proxy]:
    """A proxy in front of an echo server, both on free loopback ports."""
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxies = ProxySet(seed=seed)
    try:
        yield await proxies.create("echo", "127.0.0.1:0", f"127.0.0.1:{port}")
    finally:
        await proxies.close()
        server.close()


async def connect(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = split_listen(proxy.listen)
    return await asyncio.open_connection(host, port)


def toxic(kind: str, stream: str = "downstream", **attributes: Any) -> ToxicSpec:
    return ToxicSpec(name=f"{kind}_{stream}", type=kind, stream=stream, attributes=attributes)


async def round_trip_ms(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    start = time.perf_counter()
    writer.write(b"ping")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    return (time.perf_counter() - start) * 1000


async def test_without_toxics_bytes_pass_unchanged_both_ways() -> None:
    async with echo_proxy() as proxy:
        reader, writer = await connect(proxy)
        data = bytes(range(256)) * 1000
        writer.write(data)
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(len(data)), 5) == data
        writer.close()


async def test_latency_adds_its_delay_to_a_live_connection() -> None:
    async with echo_proxy() as proxy:
        reader, writer = await connect(proxy)
        before = statistics.median([await round_trip_ms(reader, writer) for _ in range(5)])
        proxy.add_toxic(toxic("latency", "upstream", latency=100))
        during = statistics.median([await round_trip_ms(reader, writer) for _ in range(5)])
        proxy.remove_toxic("latency_upstream")
        after = statistics.median([await round_trip_ms(reader, writer) for _ in range(5)])
        # Every round trip with the toxic takes its 100 ms at least; without it, less than
        # that (medians of 5; generous upper bounds: a busy machine slows every round trip).
        assert during >= 100 and during - before < 1000
        assert after < 100
        writer.close()


async def test_a_sequence_arrives_complete_and_in_order_while_toxics_come_and_go() -> None:
    """Toxiproxy's invariant: adding and removing toxics never loses or reorders data."""
    async with echo_proxy() as proxy:
        reader, writer = await connect(proxy)
        count = 20_000
        stream = b"".join(i.to_bytes(4, "big") for i in range(count))

        async def send() -> None:
            for start in range(0, len(stream), 1000):
                writer.write(stream[start : start + 1000])
                await writer.drain()
                await asyncio.sleep(0)

        async def churn() -> None:
            toxics = [
                toxic("latency", "upstream", latency=2, jitter=2),
                toxic("latency", "downstream", latency=1),
                toxic("slicer", "downstream", average_size=7, size_variation=5, delay=10),
                toxic("bandwidth", "upstream", rate=2000),
                toxic("mqtt_delay", "upstream", delay=5),
                toxic("slow_close", "downstream", delay=10),
            ]
            for round_ in range(60):
                spec = toxics[round_ % len(toxics)]
                proxy.add_toxic(spec)
                await asyncio.sleep(0.005)
                proxy.remove_toxic(spec.name)

        sender = asyncio.create_task(send())
        churner = asyncio.create_task(churn())
        received = await asyncio.wait_for(reader.readexactly(len(stream)), 30)
        await asyncio.gather(sender, churner)
        numbers = [int.from_bytes(received[i : i + 4], "big") for i in range(0, len(received), 4)]
        assert numbers == list(range(count))
        writer.close()


async def test_timeout_zero_black_holes_and_removing_it_closes() -> None:
    async with echo_proxy() as proxy:
        reader, writer = await connect(proxy)
        proxy.add_toxic(toxic("timeout", "upstream", timeout=0))
        writer.write(b"lost")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(4), 0.3)
        proxy.remove_toxic("timeout_upstream")
        assert await asyncio.wait_for(reader.read(4), 5) == b""
        reader, writer = await connect(proxy)
        assert await round_trip_ms(reader, writer) < 1000  # it answers again, toxic-free
        writer.close()


async def test_timeout_closes_the_connection_after_its_time() -> None:
    async with echo_proxy() as proxy:
        reader, writer = await connect(proxy)
        proxy.add_toxic(toxic("timeout", "downstream", timeout=100))
        start = time.perf_counter()
        assert await asyncio.wait_for(reader.read(10), 5) == b""
        assert 0.09 <= time.perf_counter() - start < 4  # never early; late on a busy machine
        writer.close()


async def test_reset_peer_resets_the_connection() -> None:
    async with echo_proxy() as proxy:
        reader, writer = await connect(proxy)
        await round_trip_ms(reader, writer)
        proxy.add_toxic(toxic("reset_peer", "upstream", timeout=50))
        writer.write(b"dropped")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(10), 5)
        writer.close()


async def test_limit_data_closes_after_the_limit() -> None:
    async with echo_proxy() as proxy:
        reader, writer = await connect(proxy)
        proxy.add_toxic(toxic("limit_data", "downstream", bytes=10))
        writer.write(b"x" * 25)
        await writer.drain()
        received = await asyncio.wait_for(reader.read(100), 5)
        assert received == b"x" * 10
        assert await asyncio.wait_for(reader.read(100), 5) == b""
        writer.close()


async def test_bandwidth_paces_the_data() -> None:
    async with echo_proxy() as proxy:
        reader, writer = await connect(proxy)
        proxy.add_toxic(toxic("bandwidth", "downstream", rate=100))  # 100 KB/s
        start = time.perf_counter()
        writer.write(b"y" * 30_000)
        await writer.drain()
        await asyncio.wait_for(reader.readexactly(30_000), 5)
        # 30 KB at 100 KB/s: 0.3 s at least (minus the first chunk's head start); the upper
        # bound only catches pacing far too slow, as a busy machine adds its own delay.
        assert 0.25 <= time.perf_counter() - start < 3
        writer.close()


async def test_slow_close_delays_the_close() -> None:
    async with echo_proxy() as proxy:
        reader, writer = await connect(proxy)
        proxy.add_toxic(toxic("slow_close", "upstream", delay=200))
        writer.write_eof()
        start = time.perf_counter()
        assert await asyncio.wait_for(reader.read(10), 5) == b""
        assert time.perf_counter() - start >= 0.19
        writer.close()


async def test_disabling_cuts_connections_and_refuses_new_ones() -> None:
    async with echo_proxy() as proxy:
        reader, writer = await connect(proxy)
        await proxy.stop()
        assert await asyncio.wait_for(reader.read(10), 5) == b""
        with pytest.raises(ConnectionRefusedError):
            await connect(proxy)
        await proxy.start()
        reader, writer = await connect(proxy)
        assert await round_trip_ms(reader, writer) < 1000  # it answers again, toxic-free
        writer.close()


async def test_toxicity_zero_never_applies() -> None:
    async with echo_proxy() as proxy:
        spec = toxic("timeout", "upstream").model_copy(update={"toxicity": 0.0})
        proxy.add_toxic(spec)
        reader, writer = await connect(proxy)
        assert await round_trip_ms(reader, writer) < 1000  # it answers again, toxic-free
        writer.close()


async def test_bad_toxics_are_refused_with_their_reason() -> None:
    async with echo_proxy() as proxy:
        with pytest.raises(ProxyError, match="invalid toxic type") as error:
            proxy.add_toxic(toxic("lag"))
        assert error.value.status == 400
        with pytest.raises(ProxyError, match="latency") as error:
            proxy.add_toxic(toxic("latency", latency=-1))
        proxy.add_toxic(toxic("latency", latency=1))
        with pytest.raises(ProxyError, match="toxic already exists") as error:
            proxy.add_toxic(toxic("latency", latency=1))
        assert error.value.status == 409
