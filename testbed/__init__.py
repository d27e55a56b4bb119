"""The reference platform fleetprobe is tried against (gateway, processor, state API,
webhooks, each with fault knobs), a Mosquitto launcher, an embedded broker, and the demo."""
