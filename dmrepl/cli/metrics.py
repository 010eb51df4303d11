"""`dmrepl metrics`, and the metrics file `sync` and `run` publish after each cycle."""

from __future__ import annotations

import sqlite3
import sys

from dmrepl import metrics
from dmrepl.cli.app import ConfigOption, GroupArg, config_for_kernel, require_root
from dmrepl.cli.render import err
from dmrepl.config import DEFAULT_PATH, Config
from dmrepl.errors import DmreplError
from dmrepl.executor import Runner


def show_metrics(group: GroupArg = None, config: ConfigOption = DEFAULT_PATH) -> None:
    """Print Prometheus metrics (text exposition format) of every group, or GROUP."""
    require_root()
    loaded = config_for_kernel(config, group)
    sys.stdout.write(metrics.exposition(metrics.read_metrics(Runner(), loaded, group)).decode())


def publish_metrics(config: Config) -> None:
    """Write every group's metrics to `metrics_file`, if configured. A failure is a warning:
    the cycle's own outcome is what `sync` reports (and a stale file is what alerts see)."""
    if config.metrics_file is None:
        return
    try:
        data = metrics.exposition(metrics.read_metrics(Runner(), config))
        metrics.write_textfile(config.metrics_file, data)
    except (DmreplError, OSError, sqlite3.Error) as exc:
        text = exc.message if isinstance(exc, DmreplError) else str(exc)
        err.print(f"warning: metrics_file {config.metrics_file} not written: {text}", markup=False)
