"""The Prometheus multiprocess directory of one ``difyq worker``: claimed at start with a lock file that the worker's
processes hold until the last of them exits, so two workers on one host never share, or wipe, each other's metrics.

``PROMETHEUS_MULTIPROC_DIR`` set: that very directory, and a worker refuses to start on one another live worker
holds. Unset: the first free ``worker-N`` directory under ``/tmp/difyq-prometheus`` (one per live worker, reused
after a worker exits). A claimed directory's sample files from an earlier run are removed: summed into this run's
metrics they would count twice.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE = "/tmp/difyq-prometheus"
LOCK_FILE = ".difyq-worker.lock"
SAMPLE_FILES = "*.db"


class MetricsDirectoryInUse(Exception):
    """The directory named by ``PROMETHEUS_MULTIPROC_DIR`` is held by another live worker."""

    def __init__(self, path: Path, holder: str):
        self.path = path
        super().__init__(f"PROMETHEUS_MULTIPROC_DIR {path} is in use by another difyq worker (pid {holder or '?'}); "
                         "give each worker on a host its own directory, or leave the variable unset to get one")


@dataclass(frozen=True)
class ClaimedDirectory:
    """A metrics directory and the lock file descriptor that holds it (inherited across exec and fork)."""

    path: Path
    lock_fd: int


def claim_metrics_directory(explicit: str | None, base: str = DEFAULT_BASE) -> ClaimedDirectory:
    """The directory this worker writes its metrics to; raises MetricsDirectoryInUse for a held explicit one."""
    if explicit:
        directory = Path(explicit)
        claimed = _try_claim(directory)
        if claimed is None:
            raise MetricsDirectoryInUse(directory, _holder(directory))
        return claimed
    index = 0
    while (claimed := _try_claim(Path(base) / f"worker-{index}")) is None:
        index += 1
    return claimed


def _try_claim(directory: Path) -> ClaimedDirectory | None:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    for stale in directory.glob(SAMPLE_FILES):
        stale.unlink()
    os.set_inheritable(fd, True)
    return ClaimedDirectory(directory, fd)


def _holder(directory: Path) -> str:
    try:
        return (directory / LOCK_FILE).read_text().strip()
    except OSError:
        return ""
