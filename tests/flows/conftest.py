"""Flow tests start Prefect servers on a loaded 2-core machine: give them time to come up."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
