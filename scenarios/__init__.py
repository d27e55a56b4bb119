"""The shipped scenarios (YAML files), a package so that an installed fleetprobe finds them."""
