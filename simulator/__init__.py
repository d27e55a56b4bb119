"""The simulated fleet: a seeded SimPy model of vehicles that publish MQTT signals.

:mod:`simulator.fleet` models vehicles on simulated time, :class:`FleetClock` keeps that
time in step with the wall clock from asyncio, and :class:`MqttPublisher` renders the
signals from their templates and publishes them.
"""

from fleetprobe.simulator.clock import FleetClock
from fleetprobe.simulator.fleet import (
    SIGNAL_FIELDS,
    TOPIC_FIELDS,
    Area,
    Cadence,
    Emission,
    FleetSpec,
    Profile,
    Vehicle,
    build_fleet,
    shard_of,
    shard_of_trace_id,
)
from fleetprobe.simulator.publisher import MqttPublisher, Outgoing, SignalSpec
from fleetprobe.simulator.templates import PayloadTemplate, TemplateError, TextTemplate
from fleetprobe.simulator.vin import is_valid_vin

__all__ = [
    "SIGNAL_FIELDS",
    "TOPIC_FIELDS",
    "Area",
    "Cadence",
    "Emission",
    "FleetClock",
    "FleetSpec",
    "MqttPublisher",
    "Outgoing",
    "PayloadTemplate",
    "Profile",
    "SignalSpec",
    "TemplateError",
    "TextTemplate",
    "Vehicle",
    "build_fleet",
    "is_valid_vin",
    "shard_of",
    "shard_of_trace_id",
]
