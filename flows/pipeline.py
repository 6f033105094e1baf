"""The Prefect flow of the RLHF loop: thin orchestration over DVC stages.

Each stage runs through `dvc repro --single-item`, so an unchanged stage is skipped and the
lineage lands in dvc.lock; the stage itself logs to MLflow. Between `collect` and `validate`
the round's feedback becomes a new immutable file under data/feedback/raw/ (DVC add, git
commit, push). A validation failure stops the round before any training.
"""
from __future__ import annotations

import json

from filelock import Timeout
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks import gc, promote, rounds, versioning
from tasks.config import PipelineConfig, load_config
from tasks.records import read_jsonl
from tasks.workspace import Workspace, init_workspace

STAGES_AFTER_VALIDATION = ["train_reward", "train_policy", "evaluate", "promote"]


def _retry_transient(task_, task_run, state) -> bool:
    """Retry a stage only for faults that a retry can fix, never for a stage's own clear error (exit 2)."""
    try:
        state.result()
    except versioning.VersioningError as e:
        return "exited with 2" not in str(e)  # tasks.stage exits 2 on a clear, final error
    except Exception:
        return True
    return False


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_transient, task_run_name="stage-{stage}",
      cache_policy=NO_CACHE)
def run_stage(workspace: str, stage: str) -> bool:
    logger = get_run_logger()

    def echo(line: str) -> None:  # what the stage printed: its warnings as warnings
        (logger.warning if line.startswith("warning:") else logger.info)("%s: %s", stage, line)

    def stderr(line: str) -> None:  # said once it has succeeded: libraries' notes (MLflow's "Created
        # version '4' of model ..."), their warnings as warnings ("...: FutureWarning: ...")
        (logger.warning if "warning" in line.lower() else logger.info)("%s (stderr): %s", stage, line)

    try:
        ran = versioning.repro(Workspace(workspace), stage, echo, stderr)
    except BaseException as e:  # which stage a signal stopped, for `rlhf status` (rounds.record_failure)
        e.add_note(f"stage: {stage}")
        raise
    logger.info("stage %s %s", stage, "ran" if ran else "unchanged, skipped by DVC")
    return ran


@task(cache_policy=NO_CACHE)
def prepare_workspace(workspace: str, config: PipelineConfig | None) -> PipelineConfig:
    ws = init_workspace(workspace)
    note = versioning.free_index(ws)  # now, not when the round commits its hour of training
    if note:
        get_run_logger().warning(note)
    # before params.yaml changes and the base model is made again: nothing of the workspace is touched
    promote.check_same_base(ws, config if config is not None else load_config(ws.params))
    for line in rounds.upgrade_pipeline(ws):  # a workspace an earlier version made
        get_run_logger().info(line)
    if config is not None and rounds.write_params(ws, config):
        get_run_logger().info("params.yaml updated from the run's parameters")
    return load_config(ws.params)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def bootstrap(workspace: str, config: PipelineConfig) -> str:
    ws = Workspace(workspace)
    return promote.bootstrap_champion(ws, config, ws.read_state())


@task(cache_policy=NO_CACHE)
def begin_round(workspace: str, config: PipelineConfig):
    return rounds.begin_round(Workspace(workspace), config)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def version_feedback(workspace: str, round_: int) -> str | None:
    ws = Workspace(workspace)
    n = sum(1 for _ in read_jsonl(ws.collected))
    if n == 0:
        get_run_logger().info("round %d collected no simulated feedback", round_)
        return None
    path = versioning.add_raw_feedback(ws, ws.collected, round_, "simulated", n)
    get_run_logger().info("round %d feedback versioned as %s (%d records)", round_, path.name, n)
    problem = versioning.push(ws, path)
    if problem:
        get_run_logger().warning("%s: %s", path.name, problem)
    return str(path)


@task(cache_policy=NO_CACHE)
def finish_round(workspace: str, state) -> dict:
    line = rounds.finish_round(Workspace(workspace), state)
    if line["push_error"]:
        get_run_logger().warning("round %s: %s", state.round, line["push_error"])
    rows = "\n".join(f"| {k} | {v} |" for k, v in line.items() if k != "reasons" and v is not None)
    reasons = "\n".join(f"- {r}" for r in line["reasons"])
    create_markdown_artifact(
        key="rlhf-round", description=f"Round {state.round}",
        markdown=f"# Round {state.round}: {'promoted' if line['promoted'] else 'not promoted'}\n\n"
                 f"| metric | value |\n|---|---|\n{rows}\n\n## Gates\n{reasons}\n")
    return line


@task(cache_policy=NO_CACHE)
def report_validation(workspace: str) -> None:
    """The validation summary as a Prefect artifact: what a person sees in the run's UI."""
    ws = Workspace(workspace)
    if not ws.validation_report.exists():
        return
    summary = json.loads(ws.validation_report.read_text())
    verdict = "passed" if summary["passed"] else "BLOCKED training"
    lines = [f"# Validation {verdict}", "",
             f"accepted {summary['accepted']}, set aside {summary['quarantined']}, ties/skips {summary['not_pairs']}",
             "", "| check | severity | passed | observed |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['severity']} | {c['passed']} | {c['observed']} |" for c in summary["checks"]]
    lines += ["", "| set-aside reason | rows |", "|---|---|"]
    lines += [f"| {r} | {n} |" for r, n in summary["reasons"].items()]
    lines += [""] + [f"- blocking: {f}" for f in summary["blocking_failures"]]
    lines += [f"- warning: {w}" for w in summary["warnings"]]
    if summary.get("docs"):
        lines += ["", f"Data Docs: {summary['docs']}"]
    create_markdown_artifact(key="rlhf-validation", description=f"Validation {verdict}", markdown="\n".join(lines))


@flow(name="rlhf-round", log_prints=True)
def rlhf_round(workspace: str = ".", config: PipelineConfig | None = None) -> dict:
    """One round of the loop: collect, version, validate, train the reward model, PPO, evaluate, promote."""
    ws = init_workspace(workspace)
    try:
        lock = rounds.round_lock(ws).acquire()
    except Timeout:
        raise rounds.RoundBusy(f"another round is running in {ws.root}; at most one round runs at a time") from None
    with lock:
        try:
            cfg = prepare_workspace(workspace, config)
            run_stage(workspace, "pretrain")
            bootstrap(workspace, cfg)
            state = begin_round(workspace, cfg)
            run_stage(workspace, "collect")
            version_feedback(workspace, state.round)
            try:
                run_stage(workspace, "validate")
            finally:
                report_validation(workspace)
            for stage in STAGES_AFTER_VALIDATION:
                run_stage(workspace, stage)
            return finish_round(workspace, state)
        except BaseException as e:  # also a cancelled or interrupted round: `rlhf status` says why it stopped
            try:
                rounds.record_failure(ws, e)
            except Exception as unrecorded:  # (a full disk): the round's own error is the one to raise
                get_run_logger().warning("could not record the round's failure for rlhf status: %s", unrecorded)
            raise


@task(cache_policy=NO_CACHE)
def collect_garbage(workspace: str, config: PipelineConfig) -> dict:
    """After a round: `rlhf gc --keep refinement.keep_versions` (and --remote with refinement.gc_remote)."""
    ws = Workspace(workspace)
    out = gc.collect_garbage(ws, config, config.refinement.keep_versions, config.refinement.gc_remote)
    for line in gc.describe(out):
        get_run_logger().info("gc: %s", line)
    return out


def prune_after_round(workspace: str, config: PipelineConfig, round_: int) -> dict:
    """With refinement.keep_versions set, free disk as `rlhf gc --keep N` does, after a round:
    {"gc": what it did, "pruning": one line saying it}, or {} with keep_versions null. A gc that
    fails is a failed task of a run that stays completed (the round is done and recorded; the
    next round's gc tries again): {"gc": {"error": why}, "pruning": "gc failed: why"}."""
    if config.refinement.keep_versions is None:
        return {}
    state = collect_garbage(workspace, config, return_state=True)
    if state.is_completed():
        out = state.result()
        return {"gc": out, "pruning": "gc: " + gc.describe(out)[-1]}
    get_run_logger().error("gc after round %s failed (the round itself is complete): %s", round_, state.message)
    return {"gc": {"error": state.message}, "pruning": f"gc failed: {state.message}"}


@flow(name="rlhf-loop", log_prints=True)
def rlhf_loop(workspace: str = ".", rounds_: int = 1, config: PipelineConfig | None = None) -> list[dict]:
    """`rounds_` rounds one after another, each starting from the champion the last one left,
    each followed by pruning when refinement.keep_versions is set."""
    lines = []
    for _ in range(rounds_):
        line = rlhf_round(workspace, config)
        ran_with = load_config(Workspace(workspace).params)  # the round wrote its config there
        lines.append(line | prune_after_round(workspace, ran_with, line["round"]))
    return lines
