"""Fault injection: a TCP proxy with Toxiproxy's toxics and MQTT-aware ones."""

# Every kind of toxic registers itself when its module is imported.
from fleetprobe.faults import mqtt_toxics, toxics  # noqa: F401
