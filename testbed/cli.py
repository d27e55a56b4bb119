"""``fleetprobe testbed``: run the reference platform until interrupted.

:func:`add_arguments` declares the command's options on a parser; :func:`run` runs it
with the parsed arguments and returns the exit code (0, 2 bad usage, 3 broker
unreachable, 130 interrupted).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from fleetprobe.core.durations import parse_duration
from fleetprobe.testbed.knobs import STAGES, StageKnobs, stage_seed
from fleetprobe.testbed.platform import Testbed, TestbedTopics
from fleetprobe.testbed.webhooks import WebhookTarget, redact_url
from fleetprobe.transport.errors import ConnectError
from fleetprobe.transport.mqtt import BrokerTarget, make_tls_context, parse_broker_url
from fleetprobe.transport.servers import ListenError, split_listen

log = logging.getLogger("fleetprobe.testbed")

DEFAULT_HTTP = "127.0.0.1:8080"
EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 2, 3, 130
# How each stage's knobs read in --help: who adds the delay, and what a drop drops.
_STAGE_HELP = {
    "gateway": ("the gateway", "share of signals the gateway drops"),
    "processor": ("the processor", "share of events the processor drops"),
    "api": ("the state API", "share of GET /vehicles requests answered 503"),
    "webhooks": ("the webhook sender", "share of webhook deliveries dropped"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``fleetprobe testbed`` on ``parser``."""
    parser.description = parser.description or (
        "Run the reference platform: gateway (vehicles/+/+ -> platform/events/{vin}), "
        "processor (-> platform/state/{vin}), state API (GET /vehicles/{vin}, "
        "GET /control, POST /control/{stage}) and webhook sender. Every stage has knobs: "
        "delay, jitter (±), drop ratio; change them while it runs with "
        'POST /control/{stage} {"delay": "100ms", "drop": 0.1, "stall": "5s"}.'
    )
    parser.add_argument(
        "--mqtt", required=True, metavar="URL", help="the broker, mqtt://host:port or mqtts://"
    )
    parser.add_argument(
        "--http",
        type=_listen,
        default=DEFAULT_HTTP,
        metavar="HOST:PORT",
        help=f"where the state API and control endpoint listen (default {DEFAULT_HTTP}; "
        "port 0 picks a free one)",
    )
    parser.add_argument(
        "--webhook",
        type=_webhook,
        action="append",
        default=[],
        metavar="[SIGNALS=]URL",
        help="POST each processed event to URL (repeatable). To send only some signals, "
        "put their names and '=' in front: door,trip=http://127.0.0.1:9000/hooks",
    )
    parser.add_argument(
        "--webhook-secret-env",
        metavar="NAME",
        help="sign webhooks with the secret in environment variable NAME "
        "(HMAC-SHA256 of the body, 'sha256=<hex>' in the signature header)",
    )
    parser.add_argument(
        "--webhook-signature-header",
        default="X-Hub-Signature-256",
        metavar="HEADER",
        help="the header that carries the signature (default X-Hub-Signature-256)",
    )
    parser.add_argument("--seed", type=int, help="seed the knobs' random draws (reproducible)")
    for stage in STAGES:
        group = parser.add_argument_group(f"{stage} knobs")
        # The gateway keeps the bare --delay/--jitter/--drop of the gateway-only testbed.
        aliases: tuple[tuple[str, ...], ...] = (
            (("--delay",), ("--jitter",), ("--drop",)) if stage == "gateway" else ((), (), ())
        )
        group.add_argument(
            f"--{stage}-delay",
            *aliases[0],
            dest=f"{stage}_delay",
            type=_duration,
            default=0.0,
            metavar="DURATION",
            help=f"delay {_STAGE_HELP[stage][0]} adds (e.g. 100ms)",
        )
        group.add_argument(
            f"--{stage}-jitter",
            *aliases[1],
            dest=f"{stage}_jitter",
            type=_duration,
            default=0.0,
            metavar="DURATION",
            help=f"± variation of {_STAGE_HELP[stage][0]}'s delay",
        )
        group.add_argument(
            f"--{stage}-drop",
            *aliases[2],
            dest=f"{stage}_drop",
            type=_ratio,
            default=0.0,
            metavar="RATIO",
            help=f"{_STAGE_HELP[stage][1]}, 0 to 1",
        )


def run(args: argparse.Namespace) -> int:
    """Run ``fleetprobe testbed`` with arguments parsed by :func:`add_arguments`."""
    secret: str | None = None
    if args.webhook_secret_env:
        secret = os.environ.get(args.webhook_secret_env)
        if not secret:
            log.error(
                "fleetprobe testbed: environment variable %s (--webhook-secret-env) is not set",
                args.webhook_secret_env,
            )
            return EXIT_USAGE
    webhooks = tuple(
        WebhookTarget(url, signals, secret, args.webhook_signature_header)
        for signals, url in args.webhook
    )
    knobs = {
        stage: StageKnobs(
            getattr(args, f"{stage}_delay"),
            getattr(args, f"{stage}_jitter"),
            getattr(args, f"{stage}_drop"),
            seed=stage_seed(args.seed, stage),
        )
        for stage in STAGES
    }
    return run_testbed(args.mqtt, http=args.http, webhooks=webhooks, knobs=knobs, seed=args.seed)


def run_testbed(
    url: str,
    *,
    delay_s: float = 0.0,
    jitter_s: float = 0.0,
    drop_ratio: float = 0.0,
    http: str = DEFAULT_HTTP,
    webhooks: Sequence[WebhookTarget] = (),
    knobs: Mapping[str, StageKnobs] | None = None,
    seed: int | None = None,
) -> int:
    """Serve the testbed against the broker at ``url`` until interrupted; the exit code.

    Args:
        url: the broker, ``mqtt://host:port`` or ``mqtts://host:port``.
        delay_s: the gateway's delay, when ``knobs`` has no gateway entry.
        jitter_s: the gateway's jitter, likewise.
        drop_ratio: the gateway's drop ratio, likewise.
        http: ``HOST:PORT`` for the state API.
        webhooks: where to POST processed events.
        knobs: knobs by stage; missing stages get defaults.
        seed: seeds the default knobs.
    """
    try:
        host, port, tls = parse_broker_url(url)
        http_host, http_port = split_listen(http)
    except ValueError as error:
        log.error("fleetprobe testbed: %s", error)
        return EXIT_USAGE
    broker = BrokerTarget(host, port, tls=make_tls_context(None, None, None) if tls else None)
    stage_knobs = dict(knobs or {})
    stage_knobs.setdefault(
        "gateway", StageKnobs(delay_s, jitter_s, drop_ratio, seed=stage_seed(seed, "gateway"))
    )
    testbed = Testbed(
        broker,
        http_host=http_host,
        http_port=http_port,
        webhooks=webhooks,
        knobs=stage_knobs,
        seed=seed,
    )
    try:
        asyncio.run(_serve(testbed))
    except ConnectError as error:
        log.error("fleetprobe testbed: the broker is unreachable: %s", error)
        return EXIT_UNREACHABLE
    except ListenError as error:
        log.error("fleetprobe testbed: %s (choose another with --http HOST:PORT)", error)
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.info("testbed stopped: %s", _summary(testbed))
        return EXIT_INTERRUPTED
    return EXIT_OK


async def _serve(testbed: Testbed) -> None:
    async with testbed:
        topics: TestbedTopics = testbed.topics
        log.info(
            "testbed on %s: %s -> %s -> %s; state API and control on %s",
            testbed.broker.url,
            topics.vehicles,
            topics.events,
            topics.state,
            testbed.url,
        )
        for target in testbed.webhooks:
            log.info(
                "webhook: %s (%s%s)",
                redact_url(target.url),
                ", ".join(target.signals) if target.signals else "all signals",
                ", signed" if target.secret else "",
            )
        for stage, knobs in testbed.knobs.items():
            if knobs.delay_s or knobs.jitter_s or knobs.drop_ratio:
                log.info(
                    "%s: delay %gs ± %gs, drop %g",
                    stage,
                    knobs.delay_s,
                    knobs.jitter_s,
                    knobs.drop_ratio,
                )
        await testbed.wait()


def _summary(testbed: Testbed) -> str:
    counts = testbed.counters.snapshot()
    return (
        "; ".join(
            f"{stage} " + ", ".join(f"{key} {n}" for key, n in sorted(counts[stage].items()))
            for stage in STAGES
            if counts.get(stage)
        )
        or "nothing received"
    )


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 1") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not from 0 to 1")
    return value


def _listen(text: str) -> str:
    try:
        split_listen(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _webhook(text: str) -> tuple[tuple[str, ...] | None, str]:
    """``[SIGNALS=]URL`` as the signal filter (None: all) and the URL.

    An '=' before the URL's '://' cannot belong to the URL (a scheme has none), so a URL
    with '=' in its query stays whole.
    """
    scheme_end = text.find("://")
    signals: tuple[str, ...] | None = None
    url = text
    if scheme_end > 0 and "=" in text[:scheme_end]:
        names, _, url = text.partition("=")
        signals = tuple(name.strip() for name in names.split(",") if name.strip())
        if not signals:
            raise argparse.ArgumentTypeError(f"{text!r}: no signal names before '='")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{url!r} is not an http:// or https:// URL with a host "
            "(write [SIGNALS=]URL, like door=http://127.0.0.1:9000/hooks)"
        )
    return signals, url
