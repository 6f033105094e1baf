"""Registry operations a person runs by hand: compare two policy versions, force a promotion,
roll back, prune old weights. Each change is tagged on the versions it touches and logged as an
MLflow run."""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from tasks import tracking
from tasks.config import PipelineConfig
from tasks.promote import base_differences, base_identity, move_champion, pair_reward, version_base
from tasks.workspace import Workspace, folder_bytes

COMPARED = ["candidate/reward_mean", "candidate/neutral_rate", "candidate/fluent_rate", "candidate/kl_to_reference",
            "candidate/perplexity_under_reference", "candidate/degenerate_rate", "candidate/length_tokens",
            "win_rate/rate", "win_rate/low", "win_rate/hard", "reward_model/accuracy", "reward_model/accuracy_low",
            "reward_model/pairs", "reward_model/accuracy_unseen_prompts", "reward_model/eval_file_accuracy",
            "candidate/judge_score", "judge_win_rate/rate", "judge_win_rate/low", "judge/agreement", "judge/accuracy"]


class RegistryError(ValueError):
    pass


def _version(client: MlflowClient, name: str, ref: str):
    """'3', 'champion', 'previous', 'latest' -> the ModelVersion."""
    try:
        if ref == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise RegistryError(f"{name} has no versions yet; run a round first")
            return max(versions, key=lambda v: int(v.version))
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException:
        raise RegistryError(f"{name} has no version or alias {ref!r}") from None


def _pair(client: MlflowClient, name: str, a: str, b: str):
    va, vb = _version(client, name, a), _version(client, name, b)
    if va.version == vb.version:
        raise RegistryError(f"{a!r} and {b!r} are both {name} v{va.version}: name two different versions")
    return va, vb


def _evaluation(client: MlflowClient, version) -> tuple[dict, str | None]:
    """The metrics of the evaluate run of the round that registered `version`, and where they come
    from. A version no round registered (the bootstrapped base policy) was measured as the champion
    by the first round evaluated against it: its champion/* figures, read as candidate/*."""
    experiment = client.get_run(version.run_id).info.experiment_id
    round_ = version.tags.get("round")
    if round_:
        found = client.search_runs([experiment], f"tags.stage = 'evaluate' and tags.round = '{round_}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        return (found[0].data.metrics, f"round {round_}") if found else ({}, None)
    found = client.search_runs([experiment], f"tags.stage = 'evaluate' and "
                                             f"tags.parent_champion_policy = '{version.version}'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    if not found:
        return {}, None
    first = found[0].data
    return _as_candidate(first.metrics, "champion/"), f"round {first.tags.get('round')}, as the champion"


def _as_candidate(metrics: dict, side: str) -> dict:
    """One side's figures of an evaluation (`candidate/...` or `champion/...`), named as compare shows them."""
    return {"candidate/" + k.removeprefix(side): v for k, v in metrics.items() if k.startswith(side)}


def default_refs(ws: Workspace, cfg: PipelineConfig) -> tuple[str, str]:
    """What `rlhf compare` with no versions compares: the champion and the newest version; when the
    newest is the champion (its round promoted it), the champion and the one it replaced."""
    client = tracking.setup(ws, cfg.project)
    latest = str(_version(client, cfg.policy_name, "latest").version)  # none yet: "run a round first"
    return ("champion", "previous") if tracking.alias_version(client, cfg.policy_name,
                                                              tracking.CHAMPION) == latest else ("champion", "latest")


def compare(ws: Workspace, cfg: PipelineConfig, a: str = "champion", b: str = "latest") -> dict:
    client = tracking.setup(ws, cfg.project)
    va, vb = _pair(client, cfg.policy_name, a, b)
    return {label: _column(v, *_evaluation(client, v)) for label, v in ((a, va), (b, vb))}


def _column(version, metrics: dict, measured_in: str | None) -> dict:
    """One version's side of a comparison."""
    return {"version": str(version.version), "aliases": list(version.aliases), "round": version.tags.get("round"),
            "promoted": version.tags.get("promoted"), "gates": version.tags.get("gates"), "measured_in": measured_in,
            "metrics": {k: m for k, m in metrics.items() if k in COMPARED}}


def _check_base(cfg: PipelineConfig, version, why: str) -> None:
    changed = base_differences(version_base(version) or {}, base_identity(cfg))
    if changed:
        raise RegistryError(f"{cfg.policy_name} v{version.version} was trained from another base model than this "
                            f"workspace's ({'; '.join(changed)}): {why}")


def head_to_head(ws: Workspace, cfg: PipelineConfig, a: str, b: str) -> dict:
    """Evaluate two policy versions now, on the same held-out prompts and seeds, judged by the
    champion reward model: the figures of `compare` are each from their own round (another
    reward model, another champion), these from one evaluation. Logged as an MLflow run
    (stage `compare`); the output has compare's shape, `win_rate` being a's over b's."""
    from tasks import prompts as prompts_
    from tasks.evaluate import evaluate, log_report
    from tasks.stage import StageError

    client = tracking.setup(ws, cfg.project)
    va, vb = _pair(client, cfg.policy_name, a, b)
    for v in (va, vb):  # KL to this workspace's reference and the champion's scores would mean nothing
        _check_base(cfg, v, "it cannot be evaluated against this base and judged by this reward model; "
                            "`rlhf compare` without --evaluate shows its own figures")
    reward = tracking.alias_version(client, cfg.reward_name, tracking.CHAMPION)
    if reward is None:
        raise RegistryError(f"{cfg.reward_name} has no champion to judge with yet; run a round first")
    refs = [tracking.resolve_model(ws, f"models:/{cfg.policy_name}/{v.version}") for v in (va, vb)]
    try:
        heldout, total = prompts_.evaluation_prompts(ws, cfg)
        report, table = evaluate(refs[0], refs[1], str(ws.base_model),
                                 tracking.resolve_model(ws, f"models:/{cfg.reward_name}/{reward}"), heldout,
                                 cfg.evaluate.samples_for(len(heldout)), cfg.evaluate.temperature, cfg.ppo.max_new_tokens,
                                 cfg.seed * 1000, gold_judge=cfg.scenario_prompts,
                                 where=prompts_.where(cfg, "heldout"), chat=cfg.chat_format,
                                 over_prompts=cfg.evaluate.over_prompts(cfg.scenario_prompts),
                                 judge=tracking.resolve_model(ws, cfg.evaluate.judge) if cfg.evaluate.judge else None,
                                 judge_name=cfg.evaluate.judge)
    except StageError as e:  # no held-out prompts yet, a prompt too long for the model: said as such
        raise RegistryError(str(e)) from None
    with mlflow.start_run(run_name=f"compare-v{va.version}-v{vb.version}", tags={"stage": "compare"}):
        mlflow.log_params({"a": va.version, "b": vb.version, "reward_version": reward,
                           "prompts.heldout": prompts_.source(cfg, "heldout"), "prompts.heldout_count": total,
                           "prompts.evaluated": len(heldout),
                           "prompts.heldout_sha256": hashlib.sha256("\n".join(heldout).encode()).hexdigest()[:16],
                           "seed": cfg.seed * 1000, "max_new_tokens": cfg.ppo.max_new_tokens, **cfg.chat.params(),
                           **{f"evaluate.{k}": v for k, v in cfg.evaluate.model_dump().items()}})
        log_report(report, table)
    measured_in = f"now, judged by {cfg.reward_name} v{reward}"
    out = {label: _column(v, _as_candidate(report, side), measured_in)
           for label, v, side in ((a, va, "candidate/"), (b, vb, "champion/"))}
    out["win_rate"] = {k.removeprefix("win_rate/"): m for k, m in report.items() if k.startswith("win_rate/")}
    if "judge" in report:  # evaluate.judge: a's win-rate over b's by it, and how often it sided with the reward model
        out["judge"] = {"model": report["judge"], "agreement": report.get("judge/agreement"),
                        "truncated": report["judge/truncated"],
                        "win_rate": {k.removeprefix("judge_win_rate/"): m for k, m in report.items()
                                     if k.startswith("judge_win_rate/")}}
    return out


def force_promote(ws: Workspace, cfg: PipelineConfig, version: str, reason: str, force: bool) -> dict:
    """Make a policy version champion by hand. One whose gates failed needs force=True."""
    if not reason.strip():
        raise RegistryError("a manual promotion needs a reason (--reason)")
    client = tracking.setup(ws, cfg.project)
    v = _version(client, cfg.policy_name, version)
    if PRUNED in v.tags:
        raise RegistryError(f"{cfg.policy_name} v{v.version} was pruned ({v.tags[PRUNED]}): its weights are gone; "
                            "promote a version `rlhf gc` kept")
    _check_base(cfg, v, "the next round would train it against another reference")
    if v.tags.get("promoted") == "false" and not force:
        raise RegistryError(f"{cfg.policy_name} v{v.version} failed its gates ({v.tags.get('gates')}); "
                            "pass --force with a --reason to promote it anyway")
    with mlflow.start_run(run_name=f"manual-promote-v{v.version}", tags={"stage": "manual-promote"}):
        old = move_champion(client, cfg.policy_name, str(v.version), f"manual: {reason}")
        reward = pair_reward(client, cfg.policy_name, cfg.reward_name, str(v.version), f"manual: {reason}")
        mlflow.log_params({"version": v.version, "previous_champion": old, "forced": force, "reason": reason,
                           "reward.from": reward["from"], "reward.to": reward["to"]})
    client.set_model_version_tag(cfg.policy_name, str(v.version), "manual_promotion", reason)
    return {"champion": str(v.version), "was_champion": old == str(v.version),
            "previous": tracking.alias_version(client, cfg.policy_name, tracking.PREVIOUS), "reward": reward}


def rollback(ws: Workspace, cfg: PipelineConfig, reason: str) -> dict:
    """Policy champion <-> previous; the reward champion follows the policy (the reward model that
    trained it). Run again, it swaps them back."""
    client = tracking.setup(ws, cfg.project)
    champion = tracking.alias_version(client, cfg.policy_name, tracking.CHAMPION)
    previous = tracking.alias_version(client, cfg.policy_name, tracking.PREVIOUS)
    if previous is None:
        raise RegistryError(f"{cfg.policy_name} has no previous champion to roll back to")
    with mlflow.start_run(run_name="rollback", tags={"stage": "rollback"}):
        client.set_registered_model_alias(cfg.policy_name, tracking.CHAMPION, previous)
        client.set_registered_model_alias(cfg.policy_name, tracking.PREVIOUS, champion)
        client.set_model_version_tag(cfg.policy_name, previous, "promotion_reason", f"rollback: {reason}")
        client.set_model_version_tag(cfg.policy_name, champion, "rolled_back", reason)
        reward = pair_reward(client, cfg.policy_name, cfg.reward_name, previous, f"rollback: {reason}")
        mlflow.log_params({f"{cfg.policy_name}.from": champion, f"{cfg.policy_name}.to": previous,
                           f"{cfg.reward_name}.from": reward["from"], f"{cfg.reward_name}.to": reward["to"],
                           "reason": reason})
    return {cfg.policy_name: {"from": champion, "to": previous}, cfg.reward_name: reward}


# ---- pruning: a scheduled loop registers two models a round; their weights fill the disk ---------
PRUNED = tracking.PRUNED


def _size(uri: str) -> int:
    """Bytes of the artifacts under `uri`: a local folder's, or what a remote store lists (0 when
    it lists no sizes)."""
    if uri.startswith("file:"):
        return folder_bytes(Path(urlparse(uri).path))
    repo = get_artifact_repository(uri)

    def listed(path: str | None) -> int:
        return sum(listed(f.path) if f.is_dir else (f.file_size or 0) for f in repo.list_artifacts(path))
    try:
        return listed(None)
    except MlflowException:
        return 0


def prune_models(ws: Workspace, cfg: PipelineConfig, keep: int, dry_run: bool = False) -> dict:
    """Delete the weights of registry versions nothing points at: each model keeps every version
    holding an alias (champion, previous, challenger) and its newest `keep` versions. A pruned
    version keeps its registry entry, run, metrics and tags (`rlhf compare` still reads them) and
    gains a `pruned` tag; only its logged model's artifacts go. Logged as an MLflow run."""
    if keep < 1:
        raise RegistryError(f"keep must be at least 1, got {keep}")
    client = tracking.setup(ws, cfg.project)
    report = {"keep": keep, "dry_run": dry_run, "models": {}, "bytes": 0}
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for name in (cfg.policy_name, cfg.reward_name):
        found = client.search_model_versions(f"name='{name}'")
        versions = sorted((client.get_model_version(name, v.version) for v in found),  # with their aliases
                          key=lambda v: int(v.version), reverse=True)
        newest = {str(v.version) for v in versions[:keep]}
        kept, pruned, already = [], [], []
        for v in versions:
            version = str(v.version)
            if v.aliases or version in newest:
                kept.append({"version": version, "why": ", ".join(v.aliases) or "newest"})
            elif PRUNED in v.tags:
                already.append(version)
            else:
                location = client.get_model_version_download_uri(name, version)
                pruned.append({"version": version, "bytes": _size(location), "location": location})
        report["models"][name] = {"kept": kept, "pruned": pruned, "already_pruned": already}
        report["bytes"] += sum(p["bytes"] for p in pruned)
    if dry_run:
        return report
    with mlflow.start_run(run_name="gc", tags={"stage": "gc"}):
        for name, models in report["models"].items():
            for p in models["pruned"]:
                get_artifact_repository(p["location"]).delete_artifacts()
                client.set_model_version_tag(name, p["version"], PRUNED,
                                             f"{stamp}: weights deleted by rlhf gc (kept: aliases, newest {keep})")
            mlflow.log_param(f"{name}.pruned", ",".join(p["version"] for p in models["pruned"]) or "none")
        mlflow.log_params({"keep": keep})
        mlflow.log_metric("bytes_freed", report["bytes"])
    return report
