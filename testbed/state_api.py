"""The testbed's HTTP side: the state API, the control endpoint and a health check.

* ``GET /vehicles/{vin}``: the vehicle's latest state (200) or ``{"error": "unknown
  vehicle"}`` (404). The ``api`` knobs apply here only: a ``drop`` share of requests get
  503, the others wait the delay ± jitter, and wait while the stage is stalled.
* ``GET /control``: every stage's knobs, as ``{"delay": s, "jitter": s, "drop": ratio,
  "stall": seconds left}`` per stage; ``GET /control/{stage}``: one stage's knobs.
  ``POST /control/{stage}`` with a JSON knob update (``{"delay": "100ms", "jitter": 0,
  "drop": 0.2, "stall": "5s"}``): 200 with the stage's knobs, 400 for a bad update, 404
  for an unknown stage.
* ``GET /stats``: the counts of every stage. ``GET /healthz``: ``{"status": "ok"}``.

Control, stats and health never wait for the api knobs, so a stalled API can be un-stalled.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from fleetprobe.testbed.knobs import STAGES, StageKnobs, parse_knob_update
from fleetprobe.testbed.stage import Counters
from fleetprobe.testbed.state import StateStore

STAGE = "api"
MAX_CONTROL_BODY = 64 << 10

_STORE: web.AppKey[StateStore] = web.AppKey("store")
_KNOBS: web.AppKey[Mapping[str, StageKnobs]] = web.AppKey("knobs")
_COUNTERS: web.AppKey[Counters] = web.AppKey("counters")


def create_app(
    store: StateStore, knobs: Mapping[str, StageKnobs], counters: Counters
) -> web.Application:
    """The testbed's aiohttp application.

    Args:
        store: the state the processor keeps.
        knobs: every stage's knobs by name (:data:`testbed.knobs.STAGES`); changed in place
            by the control endpoint, so the stages see the changes.
        counters: every stage's counts; the api stage counts into it too.
    """
    app = web.Application(client_max_size=MAX_CONTROL_BODY)
    app[_STORE] = store
    app[_KNOBS] = knobs
    app[_COUNTERS] = counters
    app.router.add_get("/vehicles/{vin}", _vehicle)
    app.router.add_get("/control", _control)
    app.router.add_get("/control/{stage}", _stage_control)
    app.router.add_post("/control/{stage}", _update_control)
    app.router.add_get("/stats", _stats)
    app.router.add_get("/healthz", _healthz)
    return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _vehicle(request: web.Request) -> web.Response:
    knobs = request.app[_KNOBS][STAGE]
    counters = request.app[_COUNTERS]
    counters.add(STAGE, "requests")
    if knobs.drops():
        counters.add(STAGE, "dropped")
        return _error(503, "the testbed dropped this request (api drop knob)")
    delay_s = knobs.delay()
    if delay_s > 0:
        await asyncio.sleep(delay_s)  # the knob's delay itself, not a synchronisation
    await knobs.wait_unstalled()
    state = request.app[_STORE].get(request.match_info["vin"])
    if state is None:
        counters.add(STAGE, "not_found")
        return _error(404, "unknown vehicle")
    counters.add(STAGE, "served")
    return web.json_response(state.as_json())


async def _control(request: web.Request) -> web.Response:
    knobs = request.app[_KNOBS]
    return web.json_response({stage: knobs[stage].as_dict() for stage in STAGES})


async def _stage_control(request: web.Request) -> web.Response:
    knobs = _stage_knobs(request)
    if knobs is None:
        return _unknown_stage(request)
    return web.json_response(knobs.as_dict())


def _cross_site(request: web.Request) -> bool:
    """Whether a browser sent ``request`` from a page of another origin."""
    if request.headers.get("Sec-Fetch-Site", "") == "cross-site":
        return True
    origin = request.headers.get("Origin")
    return origin is not None and urlsplit(origin).netloc != request.host


def _stage_knobs(request: web.Request) -> StageKnobs | None:
    return request.app[_KNOBS].get(request.match_info["stage"])


def _unknown_stage(request: web.Request) -> web.Response:
    stage = request.match_info["stage"]
    return _error(404, f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")


async def _update_control(request: web.Request) -> web.Response:
    if _cross_site(request):
        # A web page in the operator's browser must not break the platform: browsers say
        # where a request comes from, curl and fleetprobe send no Origin.
        return _error(403, "cross-site requests are refused")
    knobs = _stage_knobs(request)
    if knobs is None:
        return _unknown_stage(request)
    try:
        data: Any = json.loads(await request.read())
    except ValueError as error:  # UnicodeDecodeError is a ValueError too
        return _error(400, f"the body is not JSON: {error}")
    try:
        update = parse_knob_update(data)
    except ValueError as error:
        return _error(400, str(error))
    knobs.apply(update)
    return web.json_response(knobs.as_dict())


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[_COUNTERS].snapshot())


async def _healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
