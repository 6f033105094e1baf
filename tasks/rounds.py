"""The bookkeeping around a round: its number, the policy it starts from, its history line.

A round is complete once its line is in reports/history.jsonl and its lineage is committed;
a round that was killed before that is simply run again under the same number.
"""
from __future__ import annotations

import copy
import json
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
from filelock import FileLock, Timeout
from mlflow.exceptions import MlflowException
from ruamel.yaml import YAML
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken

from tasks import tracking, versioning
from tasks.config import PipelineConfig, load_config
from tasks.promote import version_base
from tasks.workspace import RoundState, Workspace


def write_params(ws: Workspace, cfg: PipelineConfig) -> bool:
    """Make params.yaml say `cfg`, keeping its comments. Returns True if anything changed."""
    if ws.params.exists() and load_config(ws.params) == cfg:
        return False
    yaml = params_yaml()
    data = yaml.load(ws.params.read_text()) if ws.params.exists() else {}

    def merge(node, values: dict):
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                merge(node[key], value)
            else:
                node[key] = value

    merge(data, cfg.to_params())
    with open(ws.params, "w") as f:
        yaml.dump(data, f)
    return True


def upgrade_pipeline(ws: Workspace) -> list[str]:
    """Bring a workspace made by an earlier version to this one's pipeline, at the start of a round:
    dvc.yaml becomes this version's (its stages' dependencies and params change between versions;
    the workspace's old one stays in git, and the round commits the new one), and params.yaml gains
    the settings it lacks, with their defaults and comments (DVC stops on a params dependency
    missing from it); its own values and comments stay. A dvc.yaml with changes of yours that git
    does not hold is left alone. Returns what it did, a line each, for the log."""
    from tasks.workspace import PROJECT_ROOT

    said = []
    yaml = params_yaml()
    template = yaml.load((PROJECT_ROOT / "params.yaml").read_text())
    data = yaml.load(ws.params.read_text()) if ws.params.exists() else None
    added = _add_missing(data, template) if data is not None else []
    if added:
        with open(ws.params, "w") as f:
            yaml.dump(data, f)
        said.append(f"params.yaml: added {', '.join(added)} (this version's defaults)")
    ours, theirs = (PROJECT_ROOT / "dvc.yaml").read_text(), ws.dvc_yaml.read_text() if ws.dvc_yaml.exists() else ""
    if ours != theirs:
        plain = YAML(typ="safe")
        new_stages, old_stages = plain.load(ours)["stages"], (plain.load(theirs) or {}).get("stages") or {}
        changed = sorted(n for n in set(new_stages) | set(old_stages) if new_stages.get(n) != old_stages.get(n))
        what = f"stages {', '.join(changed)}" if changed else "comments only"
        if versioning.git(ws, "status", "--porcelain", "--", "dvc.yaml").stdout.strip():
            said.append(f"dvc.yaml: left as it is, since it has changes git does not hold; this version's pipeline "
                        f"differs in {what} ({PROJECT_ROOT / 'dvc.yaml'})")
        else:
            ws.dvc_yaml.write_text(ours)
            said.append(f"dvc.yaml: brought to this version's pipeline ({what}; the old one is in git: "
                        "git show HEAD:dvc.yaml)")
    return said


def params_yaml() -> YAML:
    """ruamel's round trip as params.yaml is written: quotes kept ("0 3 * * *" stays quoted) and None
    written `null` (ruamel writes nothing after the colon), so a rewrite changes only what it must."""
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def _add_missing(node, template, prefix: str = "") -> list[str]:
    """Copy into `node` the keys of `template` it lacks, each after the key it follows there (or
    first), with its comment; their dotted names. A blank line rides on the comment of the key before
    it, so a key added at a paragraph's end takes it over from that key, and one added inside a
    paragraph has none."""
    added = []
    keys = list(template)
    for i, key in enumerate(keys):
        if key in node:
            if isinstance(template[key], dict) and isinstance(node[key], dict):
                added += _add_missing(node[key], template[key], f"{prefix}{key}.")
            continue
        before = next((k for k in reversed(keys[:i]) if k in node), None)
        at = list(node).index(before) + 1 if before is not None else 0
        node.insert(at, key, template[key])
        # `before` closed a paragraph (a blank line) only because `key` was missing: `key` closes it now
        blank = _take_blank(node, before) if before is not None and not _blank(template, before) else ""
        comment = template.ca.items.get(key) or [None] * 4
        if comment[2] is not None or blank:
            token = copy.copy(comment[2]) if comment[2] is not None else CommentToken("\n", CommentMark(0))
            token.value = token.value.rstrip("\n") + "\n" + blank
            node.ca.items[key] = [comment[0], comment[1], token, comment[3]]
        added.append(prefix + key)
    return added


def _blank(node, key) -> str:
    """The blank lines after `key`'s line: they ride on the end of its comment (or its lone newline)."""
    comment = node.ca.items.get(key)
    if comment is None or comment[2] is None:
        return ""
    text = comment[2].value
    return text[len(text.rstrip("\n")) + 1:]


def _take_blank(node, key) -> str:
    """The blank lines after `key`, taken off it."""
    blank = _blank(node, key)
    if blank:
        token = node.ca.items[key][2]
        token.value = token.value.rstrip("\n") + "\n"
    return blank


class RoundBusy(RuntimeError):
    """Another round holds the workspace."""


def round_lock(ws: Workspace, timeout: float = 2) -> FileLock:
    """Held for a whole round: a second round in the same workspace is refused, never interleaved.
    The operating system drops it when its process dies, so a killed round leaves no stale lock.
    Waited for `timeout` seconds: round_in_progress (`rlhf status`) holds it for an instant to look."""
    (ws.root / ".cache").mkdir(exist_ok=True)
    return FileLock(str(ws.root / ".cache" / "round.lock"), timeout=timeout)


def round_in_progress(ws: Workspace) -> bool:
    try:
        with round_lock(ws, timeout=0).acquire():
            return False
    except Timeout:
        return True


def running(ws: Workspace) -> dict | None:
    """The round this workspace runs now, if any: its number, the DVC stage running in it (the
    `dvc repro --single-item STAGE` process whose folder is the workspace) and for how long, and
    the last line that stage printed (versioning.note_line) and how long ago."""
    if not round_in_progress(ws):
        return None
    now = {"round": next_round(ws), "stage": None, "stage_seconds": None, "line": None, "line_seconds": None}
    root, started = ws.root.resolve(), None
    for proc in psutil.process_iter(["cmdline", "cwd", "create_time"]):
        args, cwd = proc.info["cmdline"] or [], proc.info["cwd"]
        # versioning.repro's command: ... dvc repro --single-item STAGE
        if cwd and Path(cwd) == root and len(args) >= 4 and args[-4].endswith("dvc") and args[-3:-1] == ["repro", "--single-item"]:
            started = proc.info["create_time"]
            now |= {"stage": args[-1], "stage_seconds": time.time() - started}
    try:
        last = json.loads(versioning.stage_line_file(ws).read_text())
    except (OSError, ValueError):
        return now
    if started is not None and last.get("stage") == now["stage"] and last.get("at", 0) >= started:
        now |= {"line": last["line"], "line_seconds": time.time() - last["at"]}  # this run's, not an earlier one's
    return now


def failure_file(ws: Workspace) -> Path:
    return ws.root / ".cache" / "last_failure.json"  # git-ignored: the round's own state, not lineage


def record_failure(ws: Workspace, error: BaseException) -> dict:
    """Why the round that is running stopped, for `rlhf status`: a scheduled loop that fails every
    night otherwise still reads 'last round 3: PROMOTED'. The stage is the one run_stage noted on the
    error; the reason, the stage's own 'error:' lines, a signal's name, or the error's first line."""
    text = str(error)
    stages = [n.removeprefix("stage: ") for n in getattr(error, "__notes__", []) if n.startswith("stage: ")]
    reasons = [line.removeprefix("error: ") for line in text.splitlines() if line.startswith("error: ")]
    if isinstance(error, KeyboardInterrupt):
        reasons = ["interrupted (Ctrl-C)"]
    elif isinstance(getattr(error, "signal", None), int):  # Prefect's TerminationSignal: a cancel, `kill`
        reasons = [f"stopped by {signal.Signals(error.signal).name}"]
    failure = {"round": next_round(ws), "stage": stages[-1] if stages else None,
               "error": type(error).__name__, "reason": (" ".join(reasons) or text.split("\n")[0] or type(error).__name__)[:2000],
               "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    failure_file(ws).parent.mkdir(exist_ok=True)
    failure_file(ws).write_text(json.dumps(failure, indent=2))
    return failure


def last_failure(ws: Workspace) -> dict | None:
    """The last round that stopped, if no round has completed since."""
    if not failure_file(ws).exists():
        return None
    failure = json.loads(failure_file(ws).read_text())
    return failure if failure["round"] >= next_round(ws) else None


def completed_rounds(ws: Workspace) -> list[dict]:
    if not ws.history_file.exists():
        return []
    return [json.loads(line) for line in ws.history_file.read_text().splitlines() if line.strip()]


def next_round(ws: Workspace) -> int:
    """The number of the round that runs next (or runs now): one after the last completed round."""
    done = completed_rounds(ws)
    return done[-1]["round"] + 1 if done else 1


def begin_round(ws: Workspace, cfg: PipelineConfig) -> RoundState:
    """The next round's state: numbered after the last completed round, starting from the champion."""
    client = tracking.setup(ws, cfg.project)
    champion_policy = tracking.alias_version(client, cfg.policy_name, tracking.CHAMPION)
    champion_reward = tracking.alias_version(client, cfg.reward_name, tracking.CHAMPION)
    state = RoundState(
        round=next_round(ws),
        policy=f"models:/{cfg.policy_name}/{champion_policy}" if champion_policy else "models/base",
        champion_policy_version=champion_policy, champion_reward_version=champion_reward)
    ws.write_state(state)
    return state


def finish_round(ws: Workspace, state: RoundState) -> dict:
    """Append the round's line to the history and commit its lineage to git."""
    evaluation = json.loads(ws.evaluation_report.read_text())
    decision = json.loads(ws.decision_report.read_text())
    line = {
        "round": state.round,
        # the built-in scenario's gold judge; None on your own prompts (prompts.heldout)
        "gold_before": evaluation.get("champion/neutral_rate"),
        "gold_after": evaluation.get("candidate/neutral_rate"),
        "fluent_before": evaluation.get("champion/fluent_rate"),
        "fluent_after": evaluation.get("candidate/fluent_rate"),
        "kl": evaluation["candidate/kl_to_reference"],
        "reward_before": evaluation["champion/reward_mean"],  # both by this round's reward model
        "reward": evaluation["candidate/reward_mean"],
        "reward_accuracy": evaluation["reward_model/accuracy"],
        "reward_eval_file_accuracy": evaluation.get("reward_model/eval_file_accuracy"),  # None without reward.eval_file
        "win_rate": evaluation["win_rate/rate"],
        "gold_win_rate": evaluation.get("gold_win_rate/rate"),
        "judge_win_rate": evaluation.get("judge_win_rate/rate"),  # evaluate.judge's; None without one
        "promoted": decision["promoted"],
        "reasons": decision["reasons"],
        "policy_version": decision["policy_version"],
        "reward_version": decision["reward_version"],
        "champion_policy_before": state.champion_policy_version,
        "champion_policy_after": decision["champion_policy_after"],
        "feedback_files": [p.name for p in versioning.raw_files(ws)],  # what this round trained on
    }
    ws.history_file.parent.mkdir(parents=True, exist_ok=True)
    with open(ws.history_file, "a") as f:
        f.write(json.dumps(line) + "\n")
    verdict = "promoted" if line["promoted"] else "not promoted"
    line["commit"] = versioning.commit_round(
        ws, f"round {state.round}: policy v{line['policy_version']} {verdict}; {headline(line)}, KL {line['kl']:.2f}")
    line["push_error"] = versioning.push(ws)  # everything: the stage outputs, and any feedback a push missed
    return line


def headline(line: dict) -> str:
    """A round's result in a few words: the gold metric on the built-in scenario, else the reward."""
    if line.get("gold_after") is not None:
        return f"held-out neutral rate {line['gold_before']:.3f} -> {line['gold_after']:.3f}"
    if line.get("reward_before") is not None:
        return f"held-out reward {line['reward_before']:+.3f} -> {line['reward']:+.3f}"
    return f"held-out reward {line['reward']:+.3f}"


def status(ws: Workspace, cfg: PipelineConfig) -> dict:
    """What `rlhf status` prints: champion and previous versions, disk use, and the last round."""
    client = tracking.setup(ws, cfg.project)
    try:
        base = version_base(client.get_model_version_by_alias(cfg.policy_name, tracking.CHAMPION))
    except MlflowException:
        base = None
    out = {
        "workspace": str(ws.root),
        "tracking_uri": ws.tracking_uri,
        "base_model": base,
        "champion": {"policy_version": tracking.alias_version(client, cfg.policy_name, tracking.CHAMPION),
                     "reward_version": tracking.alias_version(client, cfg.reward_name, tracking.CHAMPION)},
        "previous": {"policy_version": tracking.alias_version(client, cfg.policy_name, tracking.PREVIOUS),
                     "reward_version": tracking.alias_version(client, cfg.reward_name, tracking.PREVIOUS)},
    }
    from tasks.gc import disk_usage  # gc imports this module

    out["disk"] = {**disk_usage(ws), "keep_versions": cfg.refinement.keep_versions}
    done = completed_rounds(ws)
    out["running"] = running(ws)
    out["last_failure"] = last_failure(ws)
    out["last_round"] = done[-1] if done else None
    out["rounds"] = [{k: r[k] for k in ("round", "gold_before", "gold_after", "kl", "promoted")} for r in done]
    return out
