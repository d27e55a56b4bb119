"""fleetprobe: a synthetic black-box probe for vehicle/IoT platforms.

This package is the application: the CLI, the scenario model and loader, and the run that
wires the fleet (``simulator``), the probes (``probes``) and the exporters (``exporters``).
"""

__version__ = "0.1.0"
