"""MLflow helpers: the experiment, stage runs with lineage tags, models and their registry aliases."""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.store.artifact.utils.models import get_model_name_and_version
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from tasks import versioning
from tasks.config import ChatConfig
from tasks.errors import ModelLoadError
from tasks.workspace import RoundState, Workspace, tracking_server

SERVING_CODE = Path(__file__).with_name("serving.py")
SERVING_SETTINGS = "serving.json"  # the artifact serving.py reads: {"kind": "policy" | "reward", "chat": ...}
PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "pandas"]
CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
PRUNED = "pruned"  # version tag set by `rlhf gc`: when and why the version's weights were deleted
BASE = "base_model"  # version tag: JSON of the settings the version's base model was made from (promote.base_identity)
# A served policy's `predict(prompts, params={...})` settings: MLflow passes params on only when the
# logged signature names them, and fills in these defaults.
PREDICT_PARAMS = {"max_new_tokens": ("long", 32), "temperature": ("double", 1.0), "seed": ("long", 0)}


def signature(kind: str) -> ModelSignature:
    """policy: prompts (one string column, or a list of strings) -> texts, with PREDICT_PARAMS;
    reward: a frame of `prompt` and `response` -> scores."""
    if kind == "policy":
        return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                              params=ParamSchema([ParamSpec(k, t, d) for k, (t, d) in PREDICT_PARAMS.items()]))
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "response")]),
                          outputs=Schema([ColSpec("double")]))


def setup(ws: Workspace, experiment: str) -> MlflowClient:
    """Point MLflow at the workspace's store (SQLite beside mlruns/, or the tracking server of
    MLFLOW_TRACKING_URI) and create the experiment once: its artifacts under mlruns/, or with a
    server, in the server's artifact store, where its UI, other machines and `mlflow models serve`
    reach them (a folder on the machine that ran the first round they could not)."""
    # a new workspace's store is created by the first command that reads it, `rlhf status` as well:
    # MLflow's "Creating initial MLflow database tables..." said nothing a user needs
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(ws.tracking_uri)
    client = MlflowClient()
    if client.get_experiment_by_name(experiment) is None:
        location = None
        if not tracking_server(ws.tracking_uri):
            ws.mlruns.mkdir(parents=True, exist_ok=True)
            location = ws.mlruns.as_uri()
        try:
            client.create_experiment(experiment, artifact_location=location)
        except MlflowException:  # another process created it first
            pass
    mlflow.set_experiment(experiment)
    return client


@contextlib.contextmanager
def stage_run(ws: Workspace, project: str, stage: str, state: RoundState, data_file: Path | None = None):
    """One MLflow run per stage and round, tagged with its lineage."""
    setup(ws, project)
    tags = {
        "stage": stage,
        "round": str(state.round),
        "git_commit": versioning.head_commit(ws) or "none",
        "parent_champion_policy": state.champion_policy_version or "none",
        "parent_champion_reward": state.champion_reward_version or "none",
        "policy_source": state.policy,
    }
    if data_file is not None and Path(data_file).exists():
        tags["dvc_data_md5"] = versioning.file_md5(data_file)
    with mlflow.start_run(run_name=f"round-{state.round}-{stage}", tags=tags) as run:
        yield run


class Logged(NamedTuple):
    version: str  # in the registry
    model_id: str  # the logged model's: mlflow.log_metrics(..., model_id=...) files figures under it


def log_model(folder: Path, kind: str, registered_name: str, chat: ChatConfig | None = None,
              params: dict | None = None) -> Logged:
    """Log a save_pretrained folder as an MLflow pyfunc model (code-based, no pickle) inside the
    active run and register it. `chat`: the model was trained with prompts in its chat template
    (params.yaml `chat`), and serves them so.

    The logged model (the experiment's Models tab in MLflow 3) carries its own params (kind, chat
    settings, `params`); give it its metrics after every model of the run is logged (MLflow files
    the run's metrics so far under each model it logs). The serving settings
    travel as an artifact, not as model_config: MLflow copies model_config into the run's params,
    and a logged model takes the run's params as its own, so the second model of a run read the
    first one's (the policy's logged model said kind=reward)."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # an input example would make MLflow load the model and predict, here
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        settings = Path(tmp) / SERVING_SETTINGS
        settings.write_text(json.dumps({"kind": kind, "chat": chat.model_dump() if chat is not None else None}))
        info = mlflow.pyfunc.log_model(
            name=kind,
            python_model=str(SERVING_CODE),
            artifacts={"hf_model": str(folder), "serving": str(settings)},
            params={"kind": kind, **(chat.params() if chat is not None else {"chat.template": "False"}),
                    **(params or {})},
            pip_requirements=PIP_REQUIREMENTS,
            signature=signature(kind),  # without it MLflow drops predict's params (max_new_tokens, ...)
            code_paths=[str(Path(__file__).parent)],  # the `tasks` package, so a served model imports it
            registered_model_name=registered_name,
        )
    return Logged(str(info.registered_model_version), info.model_id)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


REACH_TIMEOUT_S = 10


def check_reachable(uri: str | None, timeout: float = REACH_TIMEOUT_S) -> None:
    """A tracking server that does not answer, said within `timeout` seconds: MLflow's client retries
    each request for about four minutes (7 retries, backoff factor 2) before it gives up, and an
    interactive command (`rlhf status`) sat silent that long. Any HTTP answer counts as an answer
    (a server that asks for a password does answer); only no connection, or none in time, does not."""
    if uri is None or not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", e)
        raise MlflowException(f"the server does not answer at {uri.rstrip('/')}/health within {timeout:.0f} s "
                              f"({why}); start it, or unset MLFLOW_TRACKING_URI to use the workspace's own "
                              "mlflow.db") from None


def check_not_pruned(client: MlflowClient, ref: str) -> None:
    """A models:/NAME/VERSION or models:/NAME@ALIAS whose weights `rlhf gc` deleted is named as such."""
    body = ref[len("models:/"):]
    name, sep, which = body.partition("@")
    if not sep:
        name, _, which = body.partition("/")
    try:
        version = client.get_model_version_by_alias(name, which) if sep else client.get_model_version(name, which)
    except MlflowException:
        return  # not a registry version (a logged model's id, a typo): the download names it
    if PRUNED in version.tags:
        raise ModelLoadError(f"{ref} is {name} v{version.version}, pruned ({version.tags[PRUNED]}): its weights are "
                             "gone, its metrics remain; use a version `rlhf gc` kept")


def resolve_model(ws: Workspace, ref: str) -> str:
    """A folder, HF id or models:/ URI -> something from_pretrained loads (a folder or HF id).

    A models:/ URI is fetched into the workspace's cache once per registry version: an alias or
    `latest` is read as the version it names now (fetched again only once it names another), so the
    stages of one round share one download of a judge or reward model named by alias."""
    if not ref.startswith("models:/"):
        path = ws.root / ref
        return str(path) if path.exists() else ref
    mlflow.set_tracking_uri(ws.tracking_uri)
    client = MlflowClient()
    check_not_pruned(client, ref)
    try:
        pinned = get_model_name_and_version(client, ref)  # (name, version), or (model id,)
    except MlflowException:
        pinned = None  # not in the registry (a typo): the download below says what MLflow says
    fetch = f"models:/{'/'.join(map(str, pinned))}" if pinned else ref
    target = ws.model_cache / (fetch[len("models:/"):].replace("/", "_").replace("@", "_at_"))
    # a version's number is given again when its registered model is deleted and made anew
    stamp = json.dumps(_version_source(client, pinned))
    if pinned is None or not (target / "MLmodel").exists() or _read(target / SOURCE_STAMP) != stamp:
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=fetch, dst_path=str(target))
        (target / SOURCE_STAMP).write_text(stamp)
    mlmodel = yaml.safe_load((target / "MLmodel").read_text())
    return str(target / mlmodel["flavors"]["python_function"]["artifacts"]["hf_model"]["path"])


SOURCE_STAMP = ".registry-source.json"  # beside a fetched model: which registry version it is


def _version_source(client: MlflowClient, pinned: tuple | None) -> dict | None:
    if pinned is None or len(pinned) != 2:
        return None
    version = client.get_model_version(*pinned)
    return {"source": version.source, "created": version.creation_timestamp}


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None
