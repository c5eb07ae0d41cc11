"""A pytest plugin the runner loads into MLflow's test session (``-p suite_plugin``).

An editable install made before a prefix existed (``process+``) has no entry point for it: register
every prefix of pyproject's ``mlflow.tracking_store`` table with the same builder, where missing.
"""

from __future__ import annotations

from pathlib import Path


def pytest_configure(config: object) -> None:
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry as registry

    from mlflow_er import mlflow_store

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    table = text.split('[project.entry-points."mlflow.tracking_store"]', 1)[1].split("\n[", 1)[0]
    for line in table.splitlines():
        if "=" in line and not line.startswith("#"):  # "threaded+http" = "mlflow_er.mlflow_store:build_store"
            registry._registry.setdefault(line.split("=", 1)[0].strip().strip('"'), mlflow_store.build_store)
