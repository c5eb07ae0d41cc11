"""``python -m mlflow_er.bench``: the same as ``mlflow-er bench``."""

from __future__ import annotations

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
