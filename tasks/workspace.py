"""Where every stage reads and writes: one folder that is a git repository and a DVC repository.

By default it is the project's own folder (dvc.yaml and params.yaml at the top); tests and
users may point at any other folder, which `init_workspace` prepares the same way.
`state.yaml` holds what changes from round to round (the round number and the policy the round
starts from); DVC tracks it as a params file, so dvc.lock records which champion each round used.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # holds the dvc.yaml and params.yaml templates
# The user's MLflow server, if any, read once: mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI,
# so reading it later would leak one workspace's database into the next.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).resolve())

    # configuration and round state
    @property
    def params(self) -> Path: return self.root / "params.yaml"
    @property
    def dvc_yaml(self) -> Path: return self.root / "dvc.yaml"
    @property
    def state_file(self) -> Path: return self.root / "state.yaml"
    # models (stage outputs)
    @property
    def base_model(self) -> Path: return self.root / "models" / "base"
    @property
    def reward_model(self) -> Path: return self.root / "models" / "reward"
    @property
    def policy_model(self) -> Path: return self.root / "models" / "policy"
    # data
    @property
    def collected(self) -> Path: return self.root / "data" / "collected" / "round.jsonl"
    @property
    def raw_dir(self) -> Path: return self.root / "data" / "feedback" / "raw"
    @property
    def validated_dir(self) -> Path: return self.root / "data" / "validated"
    @property
    def accepted(self) -> Path: return self.validated_dir / "accepted.jsonl"
    @property
    def quarantine(self) -> Path: return self.validated_dir / "quarantine.jsonl"
    # reports
    @property
    def reports(self) -> Path: return self.root / "reports"
    @property
    def validation_report(self) -> Path: return self.reports / "validation.json"
    @property
    def evaluation_report(self) -> Path: return self.reports / "evaluation.json"
    @property
    def decision_report(self) -> Path: return self.reports / "decision.json"
    # tracking
    @property
    def history_file(self) -> Path: return self.reports / "history.jsonl"
    @property
    def mlruns(self) -> Path: return self.root / "mlruns"
    @property
    def tracking_uri(self) -> str:
        return USER_TRACKING_URI or f"sqlite:///{self.root / 'mlflow.db'}"
    @property
    def model_cache(self) -> Path: return self.root / ".cache" / "models"

    def read_state(self) -> "RoundState":
        if not self.state_file.exists():
            return RoundState()
        return RoundState(**(yaml.safe_load(self.state_file.read_text()) or {}))

    def write_state(self, state: "RoundState") -> None:
        tmp = self.state_file.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(state.__dict__, sort_keys=False))
        tmp.replace(self.state_file)


@dataclass
class RoundState:
    round: int = 1  # the round being run
    policy: str = "models/base"  # where the round's policy starts: a folder or models:/<name>/<version>
    champion_policy_version: str | None = None  # registry versions of the champion when the round began
    champion_reward_version: str | None = None


def tracking_server(uri: str) -> bool:
    """Whether MLflow is reached through a server (http, https, databricks), which has an artifact
    store of its own, rather than a database or folder this machine opens itself."""
    return urlparse(uri).scheme in ("http", "https", "databricks")


def folder_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def init_workspace(root: str | Path) -> Workspace:
    """Make `root` a usable workspace: git and DVC repositories, a local DVC remote, the
    pipeline definition (dvc.yaml, params.yaml) and a first state.yaml. Idempotent."""
    from tasks import versioning  # DVC and git

    ws = Workspace(root)
    ws.root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml"):
        if not (ws.root / name).exists():
            shutil.copy(PROJECT_ROOT / name, ws.root / name)
    if not ws.state_file.exists():
        ws.write_state(RoundState())
    ws.raw_dir.mkdir(parents=True, exist_ok=True)  # a DVC dependency of validate, even before any feedback
    (ws.raw_dir / ".gitkeep").touch()
    (ws.root / "data" / "prompts").mkdir(exist_ok=True)  # your prompts files; a dependency of PPO and evaluation
    (ws.root / "data" / "prompts" / ".gitkeep").touch()
    versioning.ensure_repos(ws)
    return ws
