"""What the fault proxy costs with no toxic: added round-trip latency and throughput.

Measured side by side in one run, against an echo server on loopback:

* round trip of a 200-byte message (one at a time), direct and through the proxy;
* bulk throughput of 64 KiB writes echoed back, direct and through the proxy;
* MQTT framing: a CONNECT and then 200,000 QoS 0 PUBLISH packets of 200 bytes, written
  as fast as the socket takes them, into a server that only counts bytes: the proxy
  frames every packet (the cost an MQTT-aware toxic needs);
* MQTT: QoS 0 publishes from one client to Mosquitto, counted by a subscriber that
  connects directly, with the publisher direct and through the proxy (bounded by the
  client library, which awaits each publish).

Run: ``python bench/proxy_cost.py [--json out.json]`` (Mosquitto on PATH for the MQTT part).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from fleetprobe.faults.proxy import ProxySet
from fleetprobe.testbed.mosquitto import MosquittoProcess, mosquitto_path
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession
from fleetprobe.transport.servers import split_listen

ROUND_TRIPS = 5_000
BULK_BYTES = 200 * 1024 * 1024
MQTT_MESSAGES = 50_000
FRAMED_PACKETS = 200_000


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def round_trips_us(host: str, port: int) -> list[float]:
    reader, writer = await asyncio.open_connection(host, port)
    message = b"x" * 200
    samples = []
    for _ in range(ROUND_TRIPS):
        start = time.perf_counter_ns()
        writer.write(message)
        await reader.readexactly(len(message))
        samples.append((time.perf_counter_ns() - start) / 1000)
    writer.close()
    return samples


async def bulk_mb_s(host: str, port: int) -> float:
    reader, writer = await asyncio.open_connection(host, port)
    chunk = b"y" * 65536

    async def send() -> None:
        for _ in range(BULK_BYTES // len(chunk)):
            writer.write(chunk)
            await writer.drain()

    start = time.perf_counter()
    sender = asyncio.create_task(send())
    await reader.readexactly(BULK_BYTES)
    await sender
    writer.close()
    return BULK_BYTES / (time.perf_counter() - start) / 1e6


def _publish_packet(topic: bytes, payload: bytes) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + payload
    return bytes([0x30, len(body) & 0x7F | 0x80, len(body) >> 7]) + body


async def framed_packets_s(host: str, port: int, sink: Sink) -> float:
    """PUBLISH packets per second written through to a byte-counting server."""
    connect = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x1e\x00\x04bnch"
    packet = _publish_packet(b"bench/framing", b"p" * 200)
    batch = packet * (65536 // len(packet))
    per_batch = 65536 // len(packet)
    total = len(connect) + len(batch) * (FRAMED_PACKETS // per_batch)
    sink.expect(total)
    _, writer = await asyncio.open_connection(host, port)
    start = time.perf_counter()
    writer.write(connect)
    for _ in range(FRAMED_PACKETS // per_batch):
        writer.write(batch)
        await writer.drain()
    await sink.done.wait()
    elapsed = time.perf_counter() - start
    writer.close()
    return per_batch * (FRAMED_PACKETS // per_batch) / elapsed


class Sink:
    """A server that reads and counts bytes, and says when the expected number came."""

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self._expected = 0
        self._received = 0

    def expect(self, count: int) -> None:
        self.done.clear()
        self._expected, self._received = count, 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 18):
            self._received += len(data)
            if self._received >= self._expected:
                self.done.set()
        writer.close()


async def mqtt_rate(publisher_target: BrokerTarget, broker: BrokerTarget) -> float:
    """QoS 0 messages per second from publish to a direct subscriber."""
    async with MqttSession(broker) as subscriber, MqttSession(publisher_target) as publisher:
        await subscriber.subscribe(["bench/#"], qos=0)
        payload = b"z" * 200
        received = 0
        start = time.perf_counter()

        async def publish() -> None:
            for _ in range(MQTT_MESSAGES):
                await publisher.publish("bench/proxy", payload)

        sending = asyncio.create_task(publish())
        async for _ in subscriber.messages():
            received += 1
            if received == MQTT_MESSAGES:
                break
        await sending
        return MQTT_MESSAGES / (time.perf_counter() - start)


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure() -> dict[str, Any]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = server.sockets[0].getsockname()[1]
    sink = Sink()
    sink_server = await asyncio.start_server(sink.serve, "127.0.0.1", 0)
    sink_port = sink_server.sockets[0].getsockname()[1]
    proxies = ProxySet(seed=1)
    proxy = await proxies.create("echo", "127.0.0.1:0", f"127.0.0.1:{echo_port}")
    to_sink = await proxies.create("sink", "127.0.0.1:0", f"127.0.0.1:{sink_port}")
    results: dict[str, Any] = {}
    for name, echo_at, sink_at in (
        ("direct", ("127.0.0.1", echo_port), ("127.0.0.1", sink_port)),
        ("proxy", split_listen(proxy.listen), split_listen(to_sink.listen)),
    ):
        samples = await round_trips_us(*echo_at)
        results[name] = {
            "rtt_p50_us": statistics.median(samples),
            "rtt_p99_us": _quantile(samples, 0.99),
            "bulk_mb_s": await bulk_mb_s(*echo_at),
            "framed_packets_s": await framed_packets_s(sink_at[0], sink_at[1], sink),
        }
    if mosquitto_path():
        with MosquittoProcess() as mosquitto:
            broker = BrokerTarget(mosquitto.host, mosquitto.port)
            mqtt_proxy = await proxies.create(
                "mqtt", "127.0.0.1:0", f"{mosquitto.host}:{mosquitto.port}"
            )
            host, port = split_listen(mqtt_proxy.listen)
            results["direct"]["mqtt_msg_s"] = await mqtt_rate(broker, broker)
            results["proxy"]["mqtt_msg_s"] = await mqtt_rate(BrokerTarget(host, port), broker)
    await proxies.close()
    server.close()
    sink_server.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = asyncio.run(measure())
    direct, proxied = results["direct"], results["proxy"]
    rows = [
        ("round trip p50 (µs)", "rtt_p50_us", "{:.0f}"),
        ("round trip p99 (µs)", "rtt_p99_us", "{:.0f}"),
        ("bulk echo (MB/s)", "bulk_mb_s", "{:.0f}"),
        ("MQTT PUBLISH framed (pkt/s)", "framed_packets_s", "{:.0f}"),
        ("MQTT QoS 0 (msg/s)", "mqtt_msg_s", "{:.0f}"),
    ]
    print(
        f"fault proxy, no toxic — {platform.node()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    print(f"{'':28}{'direct':>12}{'proxy':>12}{'proxy/direct':>14}")
    for label, key, fmt in rows:
        if key not in direct:
            continue
        ratio = proxied[key] / direct[key]
        print(
            f"{label:28}{fmt.format(direct[key]):>12}{fmt.format(proxied[key]):>12}{ratio:>13.2f}x"
        )
    added = proxied["rtt_p50_us"] - direct["rtt_p50_us"]
    print(f"added round-trip latency p50: {added:.0f} µs (two proxy hops: there and back)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
