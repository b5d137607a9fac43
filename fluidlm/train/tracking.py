"""Metrics: `metrics.jsonl` in the run folder and MLflow, from rank 0 only.

MLflow is optional and best-effort: when it is not installed, one warning says so and metrics.jsonl
keeps everything; the first failure (server down, disk full, bad URI) prints one warning and
turns MLflow off for the rest of the run; metrics.jsonl keeps everything. Tracking URI: the
config's `logging.tracking_uri`, else $MLFLOW_TRACKING_URI, else `sqlite:///<run_dir parent>/mlflow.db`
(MLflow 3 deprecates the file store); `fluidlm eval` resolves its URI the same way
(`resolve_tracking_uri`). For HTTP servers the client's retries are cut to one short
attempt (unless MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT are set), so a dead server costs seconds,
not minutes.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

from fluidlm.train.config import Config, dump_yaml, flatten


def tracking_uri(config: Config) -> str:
    return resolve_tracking_uri(config.logging.tracking_uri, config.run_dir)


def resolve_tracking_uri(configured: str | None, run_dir: Path | None) -> str:
    """The MLflow URI of training and of `fluidlm eval` (which passes the training config's value and
    run folder): `configured` (logging.tracking_uri), else $MLFLOW_TRACKING_URI, else the default store
    beside the run folder (`run_dir` None: in the cwd)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return _sqlite_store(run_dir)


def default_uri(config: Config) -> str:
    return _sqlite_store(config.run_dir)


def _sqlite_store(run_dir: Path | None) -> str:
    """sqlite:///<run_dir parent>/mlflow.db (MLflow 3 deprecates the file store)."""
    base = run_dir.resolve().parent if run_dir is not None else Path.cwd()
    return f"sqlite:///{base / 'mlflow.db'}"


class Tracker:
    """tracker = Tracker(config, enabled=rank == 0); tracker.start(run_id); tracker.log(step, {...})"""

    def __init__(self, config: Config, enabled: bool):
        self.config = config
        self.enabled = enabled
        self.metrics_path = config.run_dir / "metrics.jsonl"
        self.client = None  # MlflowClient while MLflow works
        self.run_id: str | None = None
        self.uri = tracking_uri(config)
        self.off_reason = "not started"  # why MLflow logs nothing, for the start line

    def destination(self) -> str:
        """Where metrics go, for the start line: the MLflow URI, or metrics.jsonl and why MLflow is off."""
        if self.client is not None:
            return f"MLflow {self.uri}"
        return f"metrics {self.metrics_path} only (MLflow off: {self.off_reason})"

    # --- MLflow guard --------------------------------------------------------------------------
    def _mlflow(self, what: str, fn, *args, **kwargs):
        """Call an MLflow client method; on any failure warn once and stop using MLflow."""
        if self.client is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # never let tracking stop training
            self.client = None
            self.off_reason = f"{what} failed"
            print(f"WARNING: MLflow {what} failed at {self.uri} ({type(exc).__name__}: {str(exc)[:300]}); "
                  f"MLflow logging is off for the rest of this run, metrics still go to {self.metrics_path}",
                  file=sys.stderr, flush=True)
            return None

    def start(self, run_id: str | None, resumed_step: int | None, extra_params: dict) -> str | None:
        """Open (or, on resume, reopen) the MLflow run; truncate metrics.jsonl after the resumed
        step. Returns the run id (None when MLflow is off or failed)."""
        if not self.enabled:
            return None
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_metrics(resumed_step or 0)
        (self.config.run_dir / "config.yaml").write_text(dump_yaml(self.config))
        if not self.config.logging.mlflow:
            self.off_reason = "logging.mlflow=false"
            return None
        if self.uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from mlflow.tracking import MlflowClient

                self.client = MlflowClient(tracking_uri=self.uri)
        except ImportError as exc:  # a thin machine (the GPU bundle leaves MLflow out)
            self.off_reason = "not installed"
            print(f"WARNING: MLflow is not available ({exc}); logging to {self.metrics_path} only "
                  "(pip install 'fluidlm[mlflow]' to log to MLflow, or set logging.mlflow: false to silence this)",
                  file=sys.stderr, flush=True)
            return None
        except Exception as exc:
            self.off_reason = f"unavailable, {type(exc).__name__}"
            print(f"WARNING: MLflow unavailable ({type(exc).__name__}: {exc}); logging to {self.metrics_path} only",
                  file=sys.stderr, flush=True)
            return None
        if run_id is not None:
            run = self._mlflow("reopening run", self.client.get_run, run_id)
            if run is not None:
                self._mlflow("reopening run", self.client.update_run, run_id, status="RUNNING")
                self.run_id = run_id
                self._mlflow("logging the resumed config", self.client.log_text, run_id, dump_yaml(self.config),
                             f"config_resume_step{resumed_step}.yaml")
                return self.run_id if self.client else None
            if self.client is None:
                return None
        experiment = self._mlflow("looking up the experiment", self.client.get_experiment_by_name, self.config.logging.experiment)
        if self.client is None:
            return None
        if experiment is not None:
            exp_id = experiment.experiment_id
        else:
            # With the default local store, keep artifacts beside mlflow.db (not in ./mlruns of the cwd).
            location = ((self.config.run_dir.resolve().parent / "mlartifacts").as_uri()
                        if self.uri == default_uri(self.config) else None)
            exp_id = self._mlflow("creating the experiment", self.client.create_experiment,
                                  self.config.logging.experiment, artifact_location=location)
        name = self.config.logging.run_name or self.config.run_dir.name
        run = self._mlflow("creating the run", self.client.create_run, exp_id, run_name=name,
                           tags={"run_dir": str(self.config.run_dir.resolve())})
        if run is None:
            return None
        self.run_id = run.info.run_id
        self._log_params({**flatten(self.config.to_dict()), **extra_params})
        self._mlflow("logging the config", self.client.log_text, self.run_id, dump_yaml(self.config), "config.yaml")
        return self.run_id

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
        except ImportError:  # pragma: no cover
            limit = 500
        items = [Param(k, (json.dumps(v) if isinstance(v, list) else str(v))[:limit]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._mlflow("logging params", self.client.log_batch, self.run_id, params=items[i:i + 100])

    # --- per-step ------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.client is not None and self.run_id is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
            self._mlflow("logging metrics", self.client.log_batch, self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled and self.client is not None and self.run_id is not None:
            self._mlflow("logging an artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """status: FINISHED, KILLED (stopped early, resumable) or FAILED."""
        if self.enabled and self.client is not None and self.run_id is not None:
            self._mlflow("closing the run", self.client.set_terminated, self.run_id, status)

    def _truncate_metrics(self, keep_until: int) -> None:
        """A resumed run re-logs the steps after its checkpoint: drop them (and, on a fresh start,
        everything) so metrics.jsonl holds each step once."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a killed process
                continue
            if keep_until and row.get("step", 0) <= keep_until:
                kept.append(line)
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)  # a kill mid-write never loses the history
