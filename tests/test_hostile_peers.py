"""Peers that send what no well-behaved client sends get a counted answer, never a crash or
a traceback: bytes outside ASCII in a signature, a body cut short, a header with a line
break, a certificate nobody trusts."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from pydantic import ValidationError
from test_http_observers import Record, follow, observing

from fleetprobe.core.events import RunEvents
from fleetprobe.probes.chains import ChainSpec, HopSpec
from fleetprobe.probes.observers import ObserverContext, WatchedHop
from fleetprobe.probes.observers.http_poll import HttpPollHop, HttpPollObserver
from fleetprobe.probes.observers.webhook import WebhookHop, WebhookObserver
from fleetprobe.probes.tracker import Tracker
from fleetprobe.testbed.platform import Testbed
from fleetprobe.testbed.topics import TestbedTopics
from fleetprobe.transport.http import HttpClient, HttpError
from fleetprobe.transport.mqtt import BrokerTarget


async def raw_request(port: int, head: bytes, body: bytes, *, close_early: bool) -> bytes:
    """Send ``head`` and ``body`` to 127.0.0.1:``port`` byte for byte; with
    ``close_early``, go away before the body is complete and return nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    await writer.drain()
    if close_early:
        writer.close()
        return b""
    async with asyncio.timeout(10):
        answer = await reader.read(4096)
    writer.close()
    return answer


async def test_a_signature_with_bytes_outside_ascii_is_a_counted_401(tmp_path: Path) -> None:
    """A signature header of raw 0xff bytes: 401 and `bad_signature`, not a 500."""
    record = Record()
    config = WebhookHop(path="/hooks/t", secret="s3cret")
    async with observing(WebhookObserver, config, record) as (_, observer):
        body = b'{"trace_id": "0123456789abcdef0123456789abcdef"}'
        head = (
            b"POST /hooks/t HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Hub-Signature-256: sha256=\xff\xfe\xfd\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        answer = await raw_request(observer.port, head, body, close_early=False)
    assert answer.startswith(b"HTTP/1.1 401")
    assert record.hop_errors == {"bad_signature": 1}


async def test_a_caller_that_goes_away_mid_body_is_counted_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Content-Length 1000, 10 bytes, then the connection closes: counted `incomplete`."""
    counted = asyncio.Event()

    class Counting(Record):
        def hop_error(self, chain_index: int, hop_index: int, reason: str) -> None:
            super().hop_error(chain_index, hop_index, reason)
            counted.set()

    record = Counting()
    config = WebhookHop(path="/hooks/t")
    async with observing(WebhookObserver, config, record) as (_, observer):
        head = b"POST /hooks/t HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        await raw_request(observer.port, head, b"0123456789", close_early=True)
        async with asyncio.timeout(10):
            await counted.wait()
    assert record.hop_errors == {"incomplete": 1}
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize("value", ["a\r\nInjected: 1", "a\nb", "a\0b"])
def test_a_poll_header_with_a_line_break_is_a_scenario_error(value: str) -> None:
    """A header value from ${ENV} with CR/LF or NUL is refused, and the value is not echoed."""
    with pytest.raises(ValidationError) as raised:
        HttpPollHop(url="http://127.0.0.1:1/x", headers={"Authorization": value})
    message = str(raised.value)
    assert "the value of header 'Authorization' has a line break or NUL" in message
    assert value not in message


async def test_an_untrusted_certificate_is_reason_tls_not_refused(tmp_path: Path) -> None:
    """https to a server whose certificate no CA we trust signed: reason `tls`."""
    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with HttpClient(concurrency=1) as client:
            with pytest.raises(HttpError) as raised:
                await client.request("GET", f"https://127.0.0.1:{port}/")
    finally:
        await runner.cleanup()
    assert raised.value.reason == "tls"
    assert "certificate not trusted" in str(raised.value)


async def test_the_testbed_refuses_a_cross_site_browser_post(
    broker: BrokerTarget, prefix: str
) -> None:
    """A page of another origin POSTing text/plain to /control is refused (403) and changes
    nothing; the same body from curl (no Origin) is taken."""
    async with Testbed(broker, topics=TestbedTopics.under(prefix), seed=3) as testbed:
        url = f"{testbed.url}/control/processor"
        body = b'{"drop": 1.0}'
        cross_site = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=body, headers=cross_site) as response:
                assert response.status == 403
            assert testbed.knobs["processor"].drop_ratio == 0.0
            async with http.post(url, data=body, headers={"Sec-Fetch-Site": "cross-site"}) as r:
                assert r.status == 403
            async with http.post(url, data=body) as response:
                assert response.status == 200
        assert testbed.knobs["processor"].drop_ratio == 1.0


@pytest.mark.parametrize(
    ("host", "warned"), [("127.0.0.1", False), ("0.0.0.0", True)], ids=["loopback", "beyond"]
)
async def test_a_receiver_without_a_secret_beyond_loopback_is_warned_of(
    host: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The webhook receiver, unsigned, on 0.0.0.0: a warning that anyone may call it; on
    127.0.0.1 none."""
    tracker = Tracker([ChainSpec("c", "t", (HopSpec("h", 1.0),))], RunEvents())
    context = ObserverContext(tracker, BrokerTarget("127.0.0.1", 1), RunEvents(), (host, 0))
    observer = WebhookObserver([WatchedHop(0, 0, "c", "h", WebhookHop(path="/x"))], context)
    with caplog.at_level(logging.WARNING, logger="fleetprobe"):
        await observer.start()
        await observer.close()
    messages = [record.getMessage() for record in caplog.records]
    warnings = [m for m in messages if "without authentication" in m]
    assert bool(warnings) is warned
    if warned:
        receiver = "the webhook receiver (/x without a secret)"
        assert warnings[0].startswith(f"{receiver} listens on 0.0.0.0")


async def test_a_poll_trusts_the_ca_the_hop_names(tmp_path: Path) -> None:
    """https to a state API signed by a private CA: with `ca:` naming it the signal is seen
    (and `validate` checks the file); without, every poll is a `tls` error."""
    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    trace_id = f"{1:032x}"

    async def state(request: web.Request) -> web.Response:
        return web.json_response({"last_trace_id": trace_id})

    app = web.Application()
    app.router.add_get("/vehicles/{vin}", state)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}/vehicles/{{vin}}"
    try:
        for ca, expected in (("ca.pem", "ok"), (None, "timeout")):
            config = HttpPollHop(url=url, every="50ms", trace_id="$.last_trace_id", ca=ca)
            record = Record()
            record.expected = 1
            located = config.located(tmp_path)
            async with observing(HttpPollObserver, located, record, within_s=1.0) as (
                tracker,
                _,
            ):
                follow(tracker, 1, "V1")
                async with asyncio.timeout(10):
                    await record.judged.wait()
            assert record.verdicts[0].results[0] == expected
            assert ("tls" in record.hop_errors) is (ca is None)
    finally:
        await runner.cleanup()
    problems = list(HttpPollHop(url=url, ca="missing.pem").problems("5", tmp_path))
    assert problems and problems[0][0] == ("ca",)
    assert f"cannot use {tmp_path / 'missing.pem'} as CA certificates" in problems[0][1]
