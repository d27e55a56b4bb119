"""``python -m fleetprobe``."""

import sys

from fleetprobe.app.cli import main

sys.exit(main())
