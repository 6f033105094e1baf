"""Free disk: what `rlhf gc` does, and what a scheduled refinement round does after itself when
`refinement.keep_versions` is set.

Each round registers a policy and a reward model, and each is stored three times (MLflow
artifacts, the DVC cache, the DVC remote). This deletes the weights of registry versions nothing
points at (registry.prune_models), runs `dvc gc --workspace` (versioning.collect_garbage) and
empties the registry download cache, all under the round lock so no round runs meanwhile.
"""
from __future__ import annotations

import shutil

from filelock import Timeout

from tasks import registry, rounds, versioning
from tasks.config import PipelineConfig
from tasks.workspace import Workspace, folder_bytes, tracking_server


def collect_garbage(ws: Workspace, cfg: PipelineConfig, keep: int, remote: bool = False,
                    dry_run: bool = False) -> dict:
    """Prune model weights (each model keeps its aliased versions and newest `keep`), unused DVC
    cache (and remote, with `remote`) and downloaded models. Raises rounds.RoundBusy while a round
    runs, registry.RegistryError or versioning.VersioningError when it cannot go on safely."""
    try:
        lock = rounds.round_lock(ws).acquire()
    except Timeout:
        raise rounds.RoundBusy(f"a round is running in {ws.root}; run gc after it") from None
    with lock:
        # DVC first: with `remote` it refuses (before deleting anything) while history holds a
        # feedback file the workspace lacks, so a refusal leaves the model weights as they were too
        data = versioning.collect_garbage(ws, remote, dry_run)
        models = registry.prune_models(ws, cfg, keep, dry_run)
        downloads = folder_bytes(ws.model_cache)
        if not dry_run:
            shutil.rmtree(ws.model_cache, ignore_errors=True)  # registry models fetched for rounds: fetched again
    size = {"models": models["bytes"], "dvc": data["bytes"], "downloads": downloads}
    return {"dry_run": dry_run, "keep": keep, "models": models["models"], "dvc": data,
            "bytes": {**size, "total": sum(size.values())}}


def disk_usage(ws: Workspace) -> dict:
    """Bytes of what the pipeline keeps in the workspace, by where: MLflow (artifacts and its
    SQLite database), the DVC cache, the local DVC remote, downloaded registry models, and the
    working copy (data, models, reports, PPO checkpoints). Anything else in the folder (a virtual
    environment, the project's own git history) is not counted."""
    def size(path):
        return path.stat().st_size if path.is_file() else folder_bytes(path)

    where = {"mlflow": [ws.root / "mlruns", ws.root / "mlflow.db"], "dvc_cache": [ws.root / ".dvc" / "cache"],
             "dvc_remote": [ws.root / versioning.DEFAULT_REMOTE], "downloads": [ws.model_cache],
             "working": [ws.root / "data", ws.root / "models", ws.root / "reports",
                         ws.root / ".cache" / "ppo-checkpoints"]}
    usage = {name: sum(size(p) for p in paths) for name, paths in where.items()}
    return {"total": sum(usage.values()), **usage, "mlflow_server": tracking_server(ws.tracking_uri)}


PARTS = {"mlflow": "MLflow", "dvc_cache": "DVC cache", "dvc_remote": "DVC remote", "downloads": "downloaded models",
         "working": "working copy"}


def describe_usage(usage: dict) -> str:
    def part(key: str, label: str) -> str:
        if key == "mlflow" and usage["mlflow_server"]:  # its artifacts are in the server's store, not here
            return "MLflow on its server"
        return f"{label} {usage[key] / 2**20:.1f}"
    parts = ", ".join(part(key, label) for key, label in PARTS.items())
    return f"{usage['total'] / 2**20:.1f} MiB kept by the pipeline ({parts})"


def describe(out: dict) -> list[str]:
    """What collect_garbage did (or would do), as lines for people."""
    dry = out["dry_run"]
    lines = []
    for name, m in out["models"].items():
        kept = ", ".join(f"v{k['version']} ({k['why']})" for k in m["kept"]) or "none"
        pruned = ", ".join(f"v{p['version']}" for p in m["pruned"]) or "none"
        before = f"; pruned before: {', '.join('v' + v for v in m['already_pruned'])}" if m["already_pruned"] else ""
        lines.append(f"{name}: kept {kept}; weights {'to delete' if dry else 'deleted'}: {pruned}{before}")
    lines.append(f"DVC {'cache and remote' if out['dvc']['cloud'] else 'cache'}: {out['dvc']['objects']} unused objects")
    mib = {k: f"{v / 2**20:.1f}" for k, v in out["bytes"].items()}
    lines.append(f"{'would free' if dry else 'freed'} {mib['total']} MiB (model weights {mib['models']}, "
                 f"DVC {mib['dvc']}, downloaded models {mib['downloads']})")
    return lines
