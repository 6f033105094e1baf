"""Stage `promote`: register both models and move `champion` only when every gate passes.

Every round registers its reward model and its policy (the policy gets the `challenger`
alias). Gates (params.yaml `gates`): win-rate against the champion (by the round's reward model,
and by evaluate.judge's if set), KL budget, fluency not worse (the built-in scenario's prompts
only), no NaN, reward-model accuracy floor. On success the old champions become `previous`.
The decision and each gate's value are logged on the run and as registry version tags.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks import tracking
from tasks.config import GatesConfig, PipelineConfig
from tasks.stage import stage_main
from tasks.workspace import RoundState, Workspace, tracking_server


@dataclass
class Gate:
    name: str
    value: float
    threshold: float
    passed: bool
    detail: str = ""  # what the value rests on, when the reader should weigh it

    def reason(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        detail = f"; {self.detail}" if self.detail else ""
        return f"{self.name} {verdict}: {self.value:.4g} (threshold {self.threshold:.4g}{detail})"


def check_gates(report: dict, gates: GatesConfig) -> list[Gate]:
    """Pure: the evaluation report against the gates, one Gate each.

    The fluency gate rests on the built-in scenario's judge; on your own held-out prompts the
    report has no fluent rate and that gate is left out (the KL budget bounds the drift, and the
    perplexity under the reference is in the report)."""
    finite = all(math.isfinite(v) for v in report.values() if isinstance(v, float))
    accuracy_detail = accuracy_detail_of(report)
    win_detail = ""
    if "win_rate/prompts" in report:  # (reports of earlier versions: an interval over pairs alone)
        over = "prompts (the wider of the two)" if report["win_rate/over_prompts"] else "pairs"
        win_detail = (f"win-rate {report['win_rate/rate']:.3f}, {report['win_rate/prompts']} held-out prompts, "
                      f"{report['n_samples']} pairs, interval over {over}")
    checked = [Gate("win_rate_lower_bound", report["win_rate/low"], gates.min_win_rate,
                    report["win_rate/low"] >= gates.min_win_rate, win_detail)]
    if "judge_win_rate/low" in report:  # evaluate.judge: a reward model PPO never saw
        checked.append(Gate("judge_win_rate_lower_bound", report["judge_win_rate/low"], gates.min_judge_win_rate,
                            report["judge_win_rate/low"] >= gates.min_judge_win_rate, judge_detail(report)))
    checked.append(Gate("kl_to_reference", report["candidate/kl_to_reference"], gates.max_kl,
                        report["candidate/kl_to_reference"] <= gates.max_kl))
    if "candidate/fluent_rate" in report:
        fluency_drop = report["champion/fluent_rate"] - report["candidate/fluent_rate"]
        checked.append(Gate("fluency_drop", fluency_drop, gates.max_fluency_drop,
                            fluency_drop <= gates.max_fluency_drop))
    return checked + [
        Gate("no_nan", float(finite), 1.0, finite),
        Gate("reward_accuracy", report["reward_model/accuracy"], gates.min_reward_accuracy,
             report["reward_model/accuracy"] >= gates.min_reward_accuracy, accuracy_detail),
    ]


def accuracy_detail_of(report: dict) -> str:
    """What the reward model's accuracy rests on: '14 held-out pairs of 7 prompts, each prompt also
    trained on, 95% interval 0.60-0.96 over pairs'. Reports of earlier versions say less."""
    if "reward_model/pairs" not in report:
        return ""
    n, interval = report["reward_model/pairs"], (f"95% interval {report['reward_model/accuracy_low']:.2f}-"
                                                 f"{report['reward_model/accuracy_high']:.2f}")
    if "reward_model/prompts" not in report:
        return f"{n} held-out pairs, {interval}"
    seen = report["reward_model/seen_prompt_pairs"]
    detail = f"{n} held-out pairs of {report['reward_model/prompts']} prompts"
    if seen:
        detail += ", each prompt also trained on" if seen == n else f", {seen} of them with a prompt also trained on"
    over = "prompts (the wider of the two)" if report["reward_model/over_prompts"] else "pairs"
    detail += f", {interval} over {over}"
    if "reward_model/accuracy_unseen_prompts" in report:
        detail += (f"; {report['reward_model/accuracy_unseen_prompts']:.2f} on the "
                   f"{report['reward_model/pairs_unseen_prompts']} pairs of unseen prompts")
    if "reward_model/eval_file_accuracy" in report:
        detail += (f"; {report['reward_model/eval_file_accuracy']:.2f} on the "
                   f"{report['reward_model/eval_file_pairs']} pairs of reward.eval_file")
    return detail


def judge_detail(report: dict) -> str:
    """What the judge's gate rests on: who judged, its win-rate, how often it sided with the round's
    reward model, how often with your annotators."""
    detail = f"judge {report['judge']}, win-rate {report['judge_win_rate/rate']:.3f}"
    if "judge/agreement" in report:  # (absent when both policies gave the same responses)
        detail += f", sides with the reward model on {report['judge/agreement']:.0%} of pairs"
    if "judge/accuracy" in report:
        detail += (f", with your annotators on {report['judge/accuracy']:.0%} of {report['judge/pairs']} held-out "
                   "feedback pairs")
    return detail


class BaseChanged(ValueError):
    """The config names another base model than the one the champion was trained from."""


def base_identity(cfg: PipelineConfig) -> dict:
    """The settings the base model (models/base: the first champion, PPO's reference, the tokenizer)
    is made from: your model, or the built-in scenario's seed and pre-training settings. Recorded
    on every registered version (tag `base_model`): a champion trained from one base cannot go on
    training against another."""
    return _identity(cfg.models.policy, cfg.seed, cfg.pretrain.model_dump())


def _identity(policy: str | None, seed: int, pretrain: dict) -> dict:
    if policy:
        return {"models.policy": policy}  # the seed and pre-training settings do not touch your model
    return {"models.policy": None, "seed": seed, **{f"pretrain.{k}": v for k, v in pretrain.items()}}


def describe_base(identity: dict | None) -> str:
    """A base model's settings in a few words, as `rlhf status` prints them."""
    if not identity:
        return "not recorded (versions registered before the base_model tag)"
    if identity.get("models.policy"):
        return identity["models.policy"]
    return f"the built-in scenario's, pre-trained with seed {identity.get('seed')}"


def base_differences(before: dict, now: dict) -> list[str]:
    """Pure: the settings that differ, as 'key: old -> new'. A key only one side has is a setting
    added or dropped by an upgrade (its default), not a change."""
    return [f"{k}: {before[k]!r} -> {now[k]!r}" for k in before if k in now and before[k] != now[k]]


def _locked_base(ws: Workspace) -> dict | None:
    """The base settings dvc.lock says the pretrain stage last ran with: the base of a champion
    registered before versions carried the `base_model` tag."""
    try:
        params = yaml.safe_load((ws.root / "dvc.lock").read_text())["stages"]["pretrain"]["params"]["params.yaml"]
    except (OSError, TypeError, KeyError, yaml.YAMLError):
        return None
    return _identity(params.get("models.policy"), params.get("seed"), params.get("pretrain") or {})


def version_base(version) -> dict | None:
    """A registered version's base settings (its `base_model` tag), None for one registered before the tag."""
    recorded = version.tags.get(tracking.BASE)
    return json.loads(recorded) if recorded else None


def check_same_base(ws: Workspace, cfg: PipelineConfig) -> None:
    """Refuse, before anything runs, a config whose base model is not the champion's: the round
    would sample from the champion, then train it against another reference (another tokenizer,
    or another model's log-probs). A workspace holds one base model's line of policies."""
    client = tracking.setup(ws, cfg.project)
    try:
        champion = client.get_model_version_by_alias(cfg.policy_name, tracking.CHAMPION)
    except MlflowException:
        return  # no champion yet: this round's base becomes the first
    before = version_base(champion) or _locked_base(ws)
    changed = base_differences(before or {}, base_identity(cfg))
    if changed:
        shared = (f", and with a `project` of its own: the registry of {ws.tracking_uri} is shared by every "
                  f"workspace that uses it" if tracking_server(ws.tracking_uri) else "")
        raise BaseChanged(
            f"the champion {cfg.policy_name} v{champion.version} was trained from another base model than this "
            f"config names ({'; '.join(changed)}). A workspace trains one base model's line of policies: "
            f"train the new one in a workspace of its own (`rlhf run --workspace DIR`, with the new settings"
            f"{shared}), or set these back")


def move_champion(client: MlflowClient, name: str, version: str, reason: str) -> str | None:
    """champion -> version, old champion -> previous. Returns the old champion version."""
    old = tracking.alias_version(client, name, tracking.CHAMPION)
    if old == version:
        return old
    if old is not None:
        client.set_registered_model_alias(name, tracking.PREVIOUS, old)
    client.set_registered_model_alias(name, tracking.CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion_reason", reason)
    return old


def pair_reward(client: MlflowClient, policy_name: str, reward_name: str, policy_version: str,
                reason: str) -> dict:
    """Make the champion reward model the one that trained the champion policy (the policy
    version's `reward_version` tag), as a round's promotion does: a manual promotion or a rollback
    moves the policy, and the reward model that judged and trained it follows. The base policy no
    round trained, and a reward version whose weights `rlhf gc` pruned, leave the reward champion
    where it is; the returned `note` says so."""
    before = tracking.alias_version(client, reward_name, tracking.CHAMPION)
    policy = client.get_model_version(policy_name, policy_version)
    wanted = policy.tags.get("reward_version")
    if wanted is None:  # registered before the tag: the reward model logged in the same promote run
        same_run = client.search_model_versions(f"name='{reward_name}' and run_id='{policy.run_id}'")
        wanted = str(same_run[0].version) if same_run else None
    if wanted is None:
        return {"from": before, "to": before,
                "note": f"no reward model trained {policy_name} v{policy_version} (the base policy, or a version "
                        f"registered by hand): {reward_name} champion stays " + (f"v{before}" if before else "unset")}
    if wanted == before:
        return {"from": before, "to": before, "note": None}
    try:
        tags = client.get_model_version(reward_name, wanted).tags
    except MlflowException:
        tags = {tracking.PRUNED: "deleted from the registry"}
    if tracking.PRUNED in tags:
        return {"from": before, "to": before,
                "note": f"{reward_name} v{wanted}, which trained {policy_name} v{policy_version}, is gone "
                        f"({tags[tracking.PRUNED]}): {reward_name} champion stays " + (f"v{before}" if before else "unset")}
    move_champion(client, reward_name, wanted, f"{reason}; trained {policy_name} v{policy_version}")
    return {"from": before, "to": wanted, "note": None}


def bootstrap_champion(ws: Workspace, cfg: PipelineConfig, state: RoundState) -> str:
    """Register the base policy as the first champion, once, so a champion always exists."""
    client = tracking.setup(ws, cfg.project)
    current = tracking.alias_version(client, cfg.policy_name, tracking.CHAMPION)
    if current is not None:
        return current
    with tracking.stage_run(ws, cfg.project, "bootstrap", state):
        version = tracking.log_model(ws.base_model, "policy", cfg.policy_name, cfg.chat_format, {"round": 0}).version
    client.set_model_version_tag(cfg.policy_name, version, tracking.BASE, json.dumps(base_identity(cfg)))
    move_champion(client, cfg.policy_name, version, "bootstrap: the base policy before any feedback")
    return version


def run(ws: Workspace, cfg: PipelineConfig, state: RoundState) -> dict:
    report = json.loads(ws.evaluation_report.read_text())
    gates = check_gates(report, cfg.gates)
    promoted = all(g.passed for g in gates)
    reasons = [g.reason() for g in gates]
    if "candidate/fluent_rate" not in report:  # said, so no reader takes it for passed
        reasons.append("fluency_drop not checked: the built-in scenario's fluency judge does not apply to your "
                       "held-out prompts (perplexity_under_reference is in the evaluation report)")
    client = tracking.setup(ws, cfg.project)
    champion_now = tracking.alias_version(client, cfg.policy_name, tracking.CHAMPION)
    if champion_now != state.champion_policy_version:  # moved by hand while the round ran, or a stale state.yaml
        promoted = False
        began = f"v{state.champion_policy_version}" if state.champion_policy_version else state.policy
        reasons.append(f"the champion is v{champion_now}, not {began}, which this round began from and compared "
                       f"the candidate with: not promoted (`rlhf compare champion challenger --evaluate` compares it "
                       f"with v{champion_now})")
    # each logged model carries the figures about it: MLflow 3 compares logged models by them
    figures = {k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    policy_metrics = {k: v for k, v in figures.items() if k.startswith(("candidate/", "win_rate/", "gold_win_rate/"))}
    policy_metrics |= {f"gate/{g.name}": g.value for g in gates}
    reward_metrics = {k: v for k, v in figures.items() if k.startswith("reward_model/")}
    with tracking.stage_run(ws, cfg.project, "promote", state, data_file=ws.accepted) as run_:
        reward = tracking.log_model(ws.reward_model, "reward", cfg.reward_name, cfg.chat_format, {"round": state.round})
        policy = tracking.log_model(ws.policy_model, "policy", cfg.policy_name, cfg.chat_format,
                                    {"round": state.round, "reward_version": reward.version})
        mlflow.log_metrics(reward_metrics, model_id=reward.model_id)
        mlflow.log_metrics(policy_metrics, model_id=policy.model_id)
        reward_version, policy_version = reward.version, policy.version
        client.set_registered_model_alias(cfg.policy_name, tracking.CHALLENGER, policy_version)
        for g in gates:
            mlflow.set_tag(f"gate.{g.name}", "passed" if g.passed else "failed")
        mlflow.set_tag("promoted", str(promoted).lower())
        decision = {"round": state.round, "promoted": promoted, "reasons": reasons,
                    "gates": [asdict(g) for g in gates], "policy_version": policy_version,
                    "reward_version": reward_version, "run_id": run_.info.run_id,
                    "champion_policy_before": state.champion_policy_version,
                    "champion_reward_before": state.champion_reward_version}
        mlflow.log_dict(decision, "decision.json")
    summary = "; ".join(reasons)
    client.set_model_version_tag(cfg.policy_name, policy_version, "reward_version", reward_version)
    for name, version in ((cfg.policy_name, policy_version), (cfg.reward_name, reward_version)):
        client.set_model_version_tag(name, version, "round", str(state.round))
        client.set_model_version_tag(name, version, "promoted", str(promoted).lower())
        client.set_model_version_tag(name, version, "gates", summary)
        client.set_model_version_tag(name, version, tracking.BASE, json.dumps(base_identity(cfg)))
    if promoted:
        move_champion(client, cfg.policy_name, policy_version, f"round {state.round}: all gates passed")
        move_champion(client, cfg.reward_name, reward_version, f"round {state.round}: trained the promoted policy")
    decision["champion_policy_after"] = tracking.alias_version(client, cfg.policy_name, tracking.CHAMPION)
    decision["champion_reward_after"] = tracking.alias_version(client, cfg.reward_name, tracking.CHAMPION)
    ws.decision_report.parent.mkdir(parents=True, exist_ok=True)
    ws.decision_report.write_text(json.dumps(decision, indent=2))
    print(("PROMOTED" if promoted else "NOT promoted") + f" policy v{policy_version}: " + summary)
    return decision


if __name__ == "__main__":
    stage_main(run)
