"""The ``fleetprobe`` command: run, validate, schema, testbed, demo, proxy."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from fleetprobe.app.exit_codes import ExitCode
from fleetprobe.app.scenario import ScenarioError, load_scenario
from fleetprobe.app.scenario.models import Scenario
from fleetprobe.core.durations import parse_duration
from fleetprobe.core.trace_ids import check_run_id
from fleetprobe.testbed import cli as testbed_cli
from fleetprobe.transport.servers import split_listen


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (see :class:`ExitCode`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("fleetprobe.transport.mqtt").setLevel(logging.WARNING)
    try:
        code: int = args.command(args)
        return code
    except ScenarioError as error:
        print(error, file=sys.stderr)
        return ExitCode.BAD_SCENARIO
    except ValueError as error:
        print(f"fleetprobe: {error}", file=sys.stderr)
        return ExitCode.BAD_SCENARIO
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    from fleetprobe.app.run import RunOptions, run_scenario
    from fleetprobe.app.workers import run_workers

    if args.workers > 1 and args.shard != (0, 1):
        raise ValueError(
            "give --workers or --shard, not both (for W workers on each of N hosts, use N*W shards)"
        )
    loaded = load_scenario(args.scenario)
    options = RunOptions(
        duration_s=args.duration,
        shard=args.shard,
        metrics_listen=args.metrics_listen,
        out=sys.stdout,
        run_id=args.run_id,
    )
    if args.workers > 1:
        return asyncio.run(run_workers(loaded, args.scenario, options, args.workers)).exit_code
    return asyncio.run(run_scenario(loaded, options)).exit_code


def _validate(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            loaded = load_scenario(path)
        except ScenarioError as error:
            print(error, file=sys.stderr)
            failed = True
            continue
        s = loaded.scenario
        hops = sum(len(c.hops) for c in s.chains)
        print(
            f"{path}: ok ({s.name}: {s.fleet.vehicles} vehicles, {len(s.signals)} signals, "
            f"{len(s.chains)} chains, {hops} hops, {len(s.slo)} objectives)"
        )
    return ExitCode.BAD_SCENARIO if failed else ExitCode.OK


def _schema(_args: argparse.Namespace) -> int:
    schema = Scenario.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "fleetprobe scenario (v1)"
    print(json.dumps(schema, indent=2))
    return ExitCode.OK


def _demo(args: argparse.Namespace) -> int:
    from fleetprobe.app.demo import run_demo
    from fleetprobe.testbed.knobs import StageKnobs

    knobs = {
        "gateway": StageKnobs(delay_s=args.gateway_delay),
        "processor": StageKnobs(drop_ratio=args.processor_drop),
    }
    return asyncio.run(
        run_demo(
            duration_s=args.duration,
            metrics_listen=args.metrics_listen,
            knobs=knobs,
            scenario=args.scenario,
        )
    )


def _proxy(args: argparse.Namespace) -> int:
    from fleetprobe.faults.api import serve_until_stopped
    from fleetprobe.faults.proxy import ProxyError, ProxySet
    from fleetprobe.transport.servers import ListenError

    async def serve(config: list[dict[str, object]]) -> int:
        proxies = ProxySet(seed=args.seed)
        try:
            await proxies.populate(config)
            await serve_until_stopped(args.api, proxies)
        except (ProxyError, ListenError) as error:
            print(f"fleetprobe proxy: {error}", file=sys.stderr)
            return ExitCode.BAD_SCENARIO
        finally:
            await proxies.close()
        return ExitCode.OK

    config = []
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as file:
                config = json.load(file)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            print(f"fleetprobe proxy: --config {args.config}: {error}", file=sys.stderr)
            return ExitCode.BAD_SCENARIO
        if not isinstance(config, list) or not all(isinstance(p, dict) for p in config):
            print(
                f"fleetprobe proxy: --config {args.config}: expected a JSON list of proxies, "
                "as for /populate",
                file=sys.stderr,
            )
            return ExitCode.BAD_SCENARIO
    return asyncio.run(serve(config))


T = TypeVar("T")


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser that raises ValueError with the message to show."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def _listen_address(text: str) -> str:
    split_listen(text)
    return text


_run_id = _argument(check_run_id)
_duration = _argument(parse_duration)
_listen = _argument(_listen_address)


def _shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or not 0 <= int(index) < int(count):
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N with 0 <= I < N (like 0/4)")
    return int(index), int(count)


MAX_WORKERS = 64
"""More shard processes than this on one machine only compete for its cores."""


def _workers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of workers from 1 to {MAX_WORKERS} (one per core; "
            "past one machine, use --shard I/N on each)"
        )
    return int(text)


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetprobe",
        description="Synthetic end-to-end probe for vehicle/IoT platforms.",
        epilog="Exit codes: 0 objectives met, 1 an objective failed, 2 bad scenario or usage, "
        "3 target unreachable, 5 a report could not be written, 130/143/129 interrupted "
        "(SIGINT/SIGTERM/SIGHUP).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a scenario against a platform")
    run.add_argument("scenario", help="the scenario YAML file")
    run.add_argument("--duration", type=_duration, help="override the emission duration (e.g. 10s)")
    run.add_argument(
        "--shard",
        type=_shard,
        default=(0, 1),
        metavar="I/N",
        help="run only shard I of N of the fleet (stable by VIN)",
    )
    run.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="run the fleet as N shard processes (one per core) with one merged /metrics, "
        "report and trace log",
    )
    run.add_argument(
        "--metrics-listen",
        type=_listen,
        metavar="HOST:PORT",
        help="override exporters.prometheus.listen",
    )
    run.add_argument(
        "--run-id",
        type=_run_id,
        metavar="ID",
        help="the run's id (default: random); trace ids derive from the seed and the run id, "
        "so the same seed and run id replay a run exactly",
    )
    run.set_defaults(command=_run)

    validate = commands.add_parser("validate", help="check scenario files; exit 0 or 2")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(command=_validate)

    schema = commands.add_parser("schema", help="print the JSON Schema of the scenario format")
    schema.set_defaults(command=_schema)

    testbed = commands.add_parser(
        "testbed", help="run the reference platform (gateway, processor, state API, webhooks)"
    )
    testbed_cli.add_arguments(testbed)
    testbed.set_defaults(command=testbed_cli.run)

    demo = commands.add_parser(
        "demo", help="run the demo: a broker, the testbed and the demo scenario"
    )
    demo.add_argument(
        "--duration", type=_duration, default=None, help="emission time (default: 30s)"
    )
    demo.add_argument(
        "--metrics-listen",
        type=_listen,
        metavar="HOST:PORT",
        default=os.environ.get("FLEETPROBE_METRICS_LISTEN", "127.0.0.1:9464"),
    )
    demo.add_argument(
        "--gateway-delay",
        type=_duration,
        default=0.0,
        help="make the testbed's gateway slow (e.g. 100ms)",
    )
    demo.add_argument(
        "--processor-drop",
        type=_ratio,
        default=0.0,
        help="share of events the testbed's processor drops (e.g. 0.2)",
    )
    demo.add_argument(
        "--scenario",
        type=Path,
        help="run this scenario against the testbed instead of the demo (e.g. a fault drill)",
    )
    demo.set_defaults(command=_demo)

    proxy = commands.add_parser(
        "proxy", help="run the fault proxy with a Toxiproxy-compatible HTTP API"
    )
    proxy.add_argument(
        "--api",
        type=_listen,
        default="127.0.0.1:8474",
        metavar="HOST:PORT",
        help="where the API listens (default: Toxiproxy's 127.0.0.1:8474)",
    )
    proxy.add_argument(
        "--config", metavar="FILE", help="proxies to create at start (JSON, as for /populate)"
    )
    proxy.add_argument("--seed", type=int, help="seed for toxicity and jitter")
    proxy.set_defaults(command=_proxy)
    return parser
