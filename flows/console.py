"""The console a person reads: racm3's own log lines once each, library chatter kept out."""

from __future__ import annotations

import logging
import os

from pipelines.core.liblogs import LIGHTNING, route_lightning_logs

QUIET = ("httpx", "faiss.loader", "apache_beam", "distributed", "urllib3", "PIL", "matplotlib")
TIP = "💡 Tip"
NOISE = ("apitools not found",)  # Beam's GCP extras, absent by design, warned at every import


class DropChatter(logging.Filter):
    """Library tips (Lightning's "💡 Tip: ... try installing ..."), open_clip's per-model INFO
    lines (logged through the root logger, `logging.info`) and, unless verbose, Lightning's
    INFO banners (devices, model summaries). Sits on the root handlers, which Prefect keeps."""

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if TIP in msg or any(n in msg for n in NOISE):
            return False
        if record.levelno >= logging.WARNING or self.verbose:
            return True
        return "open_clip" not in record.pathname and not record.name.startswith(LIGHTNING)


class DropTaskCompleted(logging.Filter):
    """Prefect logs "Finished in state Completed()" for every shard task, without naming it;
    the progress lines and the task states in the UI say the same. Failures still log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno < logging.WARNING and "Completed()" in str(record.msg))


def setup_logging(verbose: bool = False) -> None:
    """One handler (the root's) prints every line; library loggers propagate to it."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TQDM_DISABLE", "1")  # open_clip/HF download bars: racm3 shows its own
    chatter = DropChatter(verbose)
    logging.getLogger().addFilter(chatter)
    for h in logging.getLogger().handlers:
        h.addFilter(chatter)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("prefect.task_runs").addFilter(DropTaskCompleted())
    route_lightning_logs()
