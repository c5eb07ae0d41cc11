"""Real frameworks logging through ``threaded+sqlite:`` store exactly what they store on ``sqlite:``.

Each test runs the same small training twice — once on a plain ``sqlite:`` store, once with
the URI prefixed ``threaded+`` (the user changes nothing else) — and compares everything the
store then holds for the run(s): status, params, tags, every metric's (step, value) series,
dataset inputs, artifact paths and logged models. Only what differs from run to run by
nature is left out: ids, timestamps, paths of the temporary folder, wall-clock metrics.

The second half executes every code block of ``docs/integrations.md`` in a subprocess
against a temporary store, so the "Works with" page cannot rot.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "integrations.md"

# Tags that name the machine, the user, the source file or other run ids, or carry timestamps.
VOLATILE_TAGS = {"mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit",
                 "mlflow.log-model.history", "mlflow.parentRunId", "git_commit"}


# --------------------------------------------------------------------------- store snapshots


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out: list[str] = []
    for info in client.list_artifacts(run_id, path):
        out.extend(_artifact_paths(client, run_id, info.path) if info.is_dir else [info.path])
    return sorted(out)


def snapshot(db: Path, tmp: Path, wall_clock: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Everything the sqlite store ``db`` holds per run, keyed by (experiment name, run name).

    Read with a plain ``sqlite:`` client, so it is what really landed, not what a scheme
    would show. ``tmp`` (the variant's own folder) is replaced by ``<tmp>`` in strings;
    metrics in ``wall_clock`` keep their keys and steps but not their values.
    """
    client = MlflowClient(f"sqlite:///{db}")

    def clean(value: str) -> str:
        return value.replace(str(tmp), "<tmp>")

    runs: dict[Any, Any] = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            rid = run.info.run_id
            metrics = {}
            for key in run.data.metrics:
                history = sorted(client.get_metric_history(rid, key), key=lambda m: (m.step, m.timestamp))
                # Every row: a point logged again at once (the Trainer's last `epoch`) is two rows on
                # plain sqlite and through the scheme (tests/test_scheme_dropin.py::
                # test_identical_points_logged_back_to_back_are_all_stored).
                metrics[key] = [(m.step, None if key in wall_clock else m.value) for m in history]
            models = client.search_logged_models(experiment_ids=[exp.experiment_id],
                                                 filter_string=f"source_run_id = '{rid}'")
            name = (exp.name, run.info.run_name)
            assert name not in runs, f"two runs named {name}"
            runs[name] = {
                "status": run.info.status,
                "params": {k: clean(v) for k, v in run.data.params.items()},
                "tags": {k: clean(v) for k, v in run.data.tags.items()
                         if k not in VOLATILE_TAGS and "datetime" not in k},
                "metrics": metrics,
                "inputs": sorted((d.dataset.name, d.dataset.digest, sorted((t.key, t.value) for t in d.tags))
                                 for d in (run.inputs.dataset_inputs if run.inputs else [])),
                "artifacts": _artifact_paths(client, rid),
                "models": sorted((m.name, sorted(m.params.items()) if m.params else []) for m in models),
            }
    return runs


def assert_same_records(plain: dict[str, Any], threaded: dict[str, Any]) -> None:
    """Equal, with a message naming the first run and field that differ."""
    assert sorted(threaded) == sorted(plain), "different runs"
    for key in plain:
        for field in plain[key]:
            assert threaded[key][field] == plain[key][field], f"run {key}: {field} differs"
    assert threaded == plain


@contextmanager
def variant_dir(tmp_path: Path, name: str) -> Iterator[Path]:
    """A folder of its own for one variant, also the working directory (MLflow's ./mlruns lands there)."""
    path = tmp_path / name
    path.mkdir()
    old = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)
        while mlflow.active_run():
            mlflow.end_run()


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An sqlite store with MLflow's tables created, copied for each store below (its migrations take seconds)."""
    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def compare(tmp_path: Path, empty_store: Path, train: Callable[[str, Path], None],
            wall_clock: frozenset[str] = frozenset()) -> Any:
    """Run ``train(tracking_uri, folder)`` on ``sqlite:`` and on ``threaded+sqlite:``; compare the stores."""
    from mlflow_er import mlflow_store

    snaps = {}
    for name, prefix in (("plain", ""), ("threaded", "threaded+")):
        with variant_dir(tmp_path, name) as folder:
            db = folder / "mlflow.db"
            shutil.copyfile(empty_store, db)
            uri = f"{prefix}sqlite:///{db}"
            train(uri, folder)
        snaps[name] = snapshot(db, folder, wall_clock)
    assert snaps["plain"], "the framework logged nothing"
    # The threaded variant's writes really went through mlflow-er's writer, and all were delivered.
    route = mlflow_store.stats().get(uri)
    assert route is not None, f"nothing was routed through {uri}: {sorted(mlflow_store.stats())}"
    assert route["delivered"] > 0 and route["failed"] == 0 and route["dropped_total"] == 0, route
    assert_same_records(snaps["plain"], snaps["threaded"])
    return snaps["plain"]


@pytest.fixture(autouse=True)
def _isolated_mlflow(tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with no MLflow URI/experiment in the environment and restores them after."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")  # no downloads, ever
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield


# --------------------------------------------------------------------------- the frameworks


def _lightning_train(uri: str, folder: Path) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.loggers import MLFlowLogger
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(L.LightningModule):
        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch: Any, _idx: int) -> Any:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, _idx: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])

    L.seed_everything(0, verbose=False)
    x = torch.randn(64, 4)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True))
    logger = MLFlowLogger(experiment_name="lightning", run_name="tiny", tracking_uri=uri, log_model=True)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder)
    trainer.fit(Tiny(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=32))


@pytest.mark.timeout(120)
def test_lightning_mlflow_logger(tmp_path: Path, empty_store: Path) -> None:
    runs = compare(tmp_path, empty_store, _lightning_train)
    run = runs[("lightning", "tiny")]
    assert run["status"] == "FINISHED"
    assert run["params"] == {"lr": "0.05"}
    assert [s for s, _ in run["metrics"]["train_loss"]] == list(range(16))  # 2 epochs x 8 batches
    assert len(run["metrics"]["val_loss"]) == 2
    assert any(p.endswith(".ckpt") for p in run["artifacts"]), run["artifacts"]  # log_model=True


def _hf_train(uri: str, folder: Path) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    # As in a fresh process pointed at a store by the environment only: the Trainer's MLflow
    # callback leaves the URI alone when one was set in-process (as the fixture and other tests did).
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "transformers"
    try:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16)
        model = BertForSequenceClassification(config)  # built from a config: nothing downloaded
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 64, (32, 8), generator=g)
        data = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": int(ids[i, 0] % 2)}
                for i in range(len(ids))]
        args = TrainingArguments(output_dir="out", run_name="tiny-bert", max_steps=6, per_device_train_batch_size=8,
                                 logging_steps=1, learning_rate=1e-3, report_to=["mlflow"], save_strategy="no",
                                 use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
        Trainer(model=model, args=args, train_dataset=data).train()
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)


HF_WALL_CLOCK = frozenset({"train_runtime", "train_samples_per_second", "train_steps_per_second"})


@pytest.mark.timeout(120)
def test_transformers_trainer_report_to_mlflow(tmp_path: Path, empty_store: Path) -> None:
    runs = compare(tmp_path, empty_store, _hf_train, HF_WALL_CLOCK)
    run = runs[("transformers", "tiny-bert")]
    assert run["status"] == "FINISHED"
    assert [s for s, _ in run["metrics"]["loss"]] == list(range(1, 7))
    assert run["params"]["learning_rate"] == "0.001" and run["params"]["hidden_size"] == "16"


def _optuna_train(uri: str, folder: Path) -> None:
    import optuna
    from optuna_integration.mlflow import MLflowCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    callback = MLflowCallback(tracking_uri=uri, metric_name="loss")
    study = optuna.create_study(study_name="optuna", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(lambda t: (t.suggest_float("x", -3, 3) - 1) ** 2 + t.suggest_int("n", 1, 4), n_trials=5,
                   callbacks=[callback])


@pytest.mark.timeout(60)
def test_optuna_mlflow_callback(tmp_path: Path, empty_store: Path) -> None:
    runs = compare(tmp_path, empty_store, _optuna_train)
    assert sorted(runs) == [("optuna", str(n)) for n in range(5)]
    for run in runs.values():
        assert run["status"] == "FINISHED" and set(run["params"]) == {"x", "n"} and len(run["metrics"]["loss"]) == 1


def _sklearn_train(uri: str, folder: Path) -> None:
    import mlflow.sklearn
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("sklearn")
    mlflow.sklearn.autolog()
    try:
        x, y = make_classification(n_samples=200, n_features=5, random_state=0)
        with mlflow.start_run(run_name="logreg"):
            LogisticRegression(C=0.5, max_iter=200, random_state=0).fit(x, y)
    finally:
        mlflow.sklearn.autolog(disable=True)


@pytest.mark.timeout(120)
def test_sklearn_autolog(tmp_path: Path, empty_store: Path) -> None:
    runs = compare(tmp_path, empty_store, _sklearn_train)
    run = runs[("sklearn", "logreg")]
    assert run["status"] == "FINISHED"
    assert run["params"]["C"] == "0.5"
    assert "training_accuracy_score" in run["metrics"]
    assert run["models"] and run["tags"]["estimator_name"] == "LogisticRegression"


# --------------------------------------------------------------------------- docs/integrations.md


def doc_snippets() -> dict[str, str]:
    """The ```python blocks of docs/integrations.md, by the ``## `` heading above each."""
    snippets: dict[str, str] = {}
    heading = None
    for block in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```$", DOC.read_text(), re.M | re.S):
        if block.group(1):
            heading = block.group(1).strip()
        else:
            assert heading and heading not in snippets, f"a second snippet under {heading!r}"
            snippets[heading] = block.group(2)
    return snippets


# heading -> (experiment, runs expected, a metric every run has)
DOC_EXPECT = {
    "Lightning": ("lightning", 1, "train_loss"),
    "Hugging Face transformers": ("transformers", 1, "loss"),
    "Optuna": ("optuna", 5, "loss"),
    "scikit-learn autolog": ("sklearn", 1, "training_accuracy_score"),
}


def test_every_framework_has_one_snippet() -> None:
    assert sorted(doc_snippets()) == sorted(DOC_EXPECT)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("heading", sorted(DOC_EXPECT))
def test_doc_snippet_runs(heading: str, tmp_path: Path, empty_store: Path) -> None:
    code = doc_snippets()[heading]
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    assert "threaded+sqlite:///mlflow.db" in code  # it shows the scheme, on a store in its folder
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=140, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert "DeliveryError" not in proc.stderr, proc.stderr[-5000:]

    experiment, n_runs, metric = DOC_EXPECT[heading]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, [e.name for e in client.search_experiments()]
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == n_runs
    for run in runs:
        assert run.info.status == "FINISHED"
        assert client.get_metric_history(run.info.run_id, metric), (metric, sorted(run.data.metrics))
