"""Background-worker jobs importable by a fresh interpreter (``use_process=True``)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def record_process(out: str, delay: float = 0.0) -> None:
    """Sleep ``delay`` s, log a metric to the active run (fluent API), write this process's pid to ``out``."""
    import mlflow

    time.sleep(delay)
    mlflow.log_metric("from_process", 1.0)
    Path(out).write_text(str(os.getpid()))
