"""fleetprobe: a synthetic black-box probe for vehicle/IoT platforms.

The one name this distribution installs. Its subpackages, by layer, each importing only
those below it (the contracts in ``.importlinter`` hold this in CI):

- ``fleetprobe.app``: the CLI, the scenario model and loader, the run that wires the rest;
- ``fleetprobe.faults`` and ``fleetprobe.testbed``: fault injection and a reference
  platform, independent of each other;
- ``fleetprobe.exporters``: metrics, reports, the trace log, views, alerts;
- ``fleetprobe.probes``: the tracker and one observer module per hop kind;
- ``fleetprobe.simulator``: the fleet model and its MQTT publisher;
- ``fleetprobe.transport``: MQTT and HTTP clients, servers;
- ``fleetprobe.core``: the words every layer shares (durations, times, trace ids, results,
  run events, the error root).

Importing this package imports nothing else, so a layer pays only for what it uses.
"""

__version__ = "0.1.0"
