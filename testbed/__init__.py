"""Test infrastructure for fleetprobe: an embedded MQTT broker for demos and tests."""
