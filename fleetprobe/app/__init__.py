"""The application: the CLI, the scenario model and loader, and the run that wires the fleet
(``fleetprobe.simulator``), the probes (``fleetprobe.probes``), the exporters
(``fleetprobe.exporters``) and fault injection (``fleetprobe.faults``)."""
