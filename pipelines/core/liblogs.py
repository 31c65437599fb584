"""Lightning's console handlers routed through the root logger, so racm3's filters apply to them.

`import lightning` gives the `lightning` logger its own stream handler ("INFO: GPU available...",
"💡 Tip: ...") and `lightning.pytorch` stops propagating when logging is not configured yet; the
lines then bypass the root handler's filters or print twice. Call after importing lightning.
"""

from __future__ import annotations

import logging
import warnings

LIGHTNING = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


def route_lightning_logs() -> None:
    """Drop Lightning's own stream handlers where the root logger has handlers to print with."""
    # Lightning's pytree shim warns on every fit under torch >= 2.10; not actionable for a user.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    if not logging.getLogger().handlers:
        return  # nothing configured: Lightning's handlers are the only way its lines print
    for name in LIGHTNING:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler:
                lg.removeHandler(h)
        lg.propagate = True
