"""The root of every error fleetprobe raises on purpose, and the whole tree.

::

    FleetprobeError                     anything fleetprobe raises on purpose
    ├── ScenarioError                   a scenario that cannot run (app.scenario): every problem
    ├── ListenError                     a server could not bind its address (transport.servers)
    ├── TransportError                  talking to a peer failed; ``reason`` is a metric label
    │   ├── ConnectError                the peer could not be reached (refused, DNS, TLS, timeout)
    │   │   └── NotAuthorizedError      the broker refused the credentials (fatal, no retry)
    │   ├── SendError                   a message could not be handed over
    │   └── HttpError                   an HTTP exchange failed (transport.http)
    ├── MqttError                       an MQTT peer broke the protocol (transport.mqtt_codec)
    ├── ObserverSetupError              a hop cannot be observed as configured (probes.observers)
    ├── ProxyError                      the fault proxy refuses a request (faults.proxy)
    ├── BackendError                    a proxy backend failed an operation (faults.backends)
    ├── TemplateError                   a payload or topic template is invalid (simulator)
    └── FaultError                      a fault's settings are invalid (app.scenario.faults)

A caller that must not die of any of them catches :class:`FleetprobeError`. The two that
the scenario's pydantic models raise (``TemplateError``, ``FaultError``) are also
``ValueError``, as pydantic requires, and end up in a ``ScenarioError``. A failed hop is
never an exception: it is a result in the tracker.
"""

from __future__ import annotations


class FleetprobeError(Exception):
    """Base of every error fleetprobe raises on purpose."""
