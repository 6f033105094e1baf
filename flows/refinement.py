"""Continuous refinement: the flow `rlhf serve` runs on a schedule, one round per run.

Each run: check that MLflow answers (retried with backoff), take the workspace's round lock
(an overlapping run is cancelled, never run beside it), import the preference files dropped in
the inbox, then one round of the loop (`rlhf-round`): new feedback on the champion's outputs,
validation, the reward model retrained on all feedback so far, PPO from the champion,
evaluation, gated promotion. With `refinement.keep_versions` set, the run then frees disk as
`rlhf gc --keep N` does (`flows.pipeline.prune_after_round`, as `rlhf run` does after each round).

A round killed at any point leaves the champion untouched (only `promote` moves it, last) and
the next run redoes it under the same number: DVC skips the stages whose inputs did not change
(so no model is registered twice) and PPO resumes from its last checkpoint.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, Completed
from prefect.tasks import exponential_backoff

from flows.pipeline import prune_after_round, rlhf_round
from tasks import gc, importers, rounds, tracking, versioning
from tasks.config import PipelineConfig, load_config, with_overrides
from tasks.workspace import Workspace, init_workspace


class TrackingUnavailable(RuntimeError):
    """MLflow's tracking store did not answer."""


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5,
      cache_policy=NO_CACHE)
def check_tracking(workspace: str) -> str:
    """Fail early, and clearly, when the tracking server is unreachable; retried with backoff. A server
    that does not answer is said in 10 s a try (tracking.check_reachable), not after the four minutes
    MLflow's client retries each request for: four tries in about a minute and a half, not 17."""
    ws = Workspace(workspace)
    try:
        tracking.check_reachable(ws.tracking_uri)
        MlflowClient(tracking_uri=ws.tracking_uri).search_experiments(max_results=1)
    except Exception as e:  # MlflowException, connection errors: all mean "not reachable now"
        raise TrackingUnavailable(f"MLflow tracking store {ws.tracking_uri} is unreachable: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    return ws.tracking_uri


INBOX_SETTLE_S = 10  # an inbox file changed more recently than this may still be being written


def unused_path(folder: Path, name: str) -> Path:
    """folder/name, or folder/<stem>-2<suffix>, -3... where that exists: a file moved there never
    replaces one moved earlier under the same name."""
    path, n = folder / name, 1
    while path.exists():
        n += 1
        path = folder / f"{Path(name).stem}-{n}{Path(name).suffix}"
    return path


@task(cache_policy=NO_CACHE)
def import_inbox(workspace: str, inbox: str, settle_s: float = INBOX_SETTLE_S, mapping: str | None = None,
                 chat_template: bool = False) -> dict:
    """Import every file in the inbox; move each to inbox/done/ or inbox/failed/ (with the reason).
    `mapping`: refinement.inbox_map, the files' columns as `rlhf import --map` takes them;
    `chat_template`: chat.template (without it, pairs whose prompt and response run together are said).

    A file changed in the last `settle_s` seconds is left for the next round: a copy still under
    way would be imported in part and the rest never read. Hidden files (a writer's `.name.tmp`
    before its rename) are never read.
    """
    ws = Workspace(workspace)
    folder = (ws.root / inbox).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    logger = get_run_logger()
    columns = importers.parse_mapping(mapping)  # once: the same for every file
    result = {"imported": [], "failed": [], "waiting": []}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        age = time.time() - path.stat().st_mtime
        if abs(age) < settle_s:  # abs: a file server's clock may run a little ahead; far ahead is not a copy now
            logger.warning("inbox file %s changed %.0f s ago and may still be being written: left for the next "
                           "round", path.name, max(age, 0))
            result["waiting"].append(path.name)
            continue
        try:
            summary = importers.import_file(ws, path, mapping=columns, map_for_tables=True)
            problem = importers.failed(summary)
        except importers.ImportError_ as e:
            problem = str(e)
        target = folder / ("failed" if problem else "done")
        target.mkdir(exist_ok=True)
        moved = unused_path(target, path.name)
        shutil.move(str(path), moved)
        if problem:
            (target / f"{moved.name}.reason.txt").write_text(problem + "\n")
            logger.warning("inbox file %s not imported (now %s): %s", path.name, moved.relative_to(folder), problem)
            result["failed"].append({"file": path.name, "moved_to": str(moved.relative_to(folder)), "reason": problem})
        else:
            logger.info("inbox file %s imported: %d kept, %d set aside", path.name, summary.kept,
                        summary.set_aside)
            if summary.map_not_applied:
                logger.info("inbox file %s: %s", path.name, summary.map_not_applied)
            note = None if chat_template else importers.run_together_note(summary)
            if note:
                logger.warning("inbox file %s: %s", path.name, note)
            if summary.push_error:
                logger.warning("inbox file %s: %s", path.name, summary.push_error)
            result["imported"].append({"file": path.name, "moved_to": str(moved.relative_to(folder)),
                                       "kept": summary.kept, "set_aside": summary.set_aside,
                                       "run_together": summary.run_together,
                                       "map_not_applied": summary.map_not_applied})
    return result


def new_feedback_since_last_round(ws: Workspace) -> list[str]:
    """Raw feedback files that the last completed round did not train on."""
    done = rounds.completed_rounds(ws)
    files = [p.name for p in versioning.raw_files(ws)]
    seen = set(done[-1].get("feedback_files", [])) if done else set()
    return [f for f in files if f not in seen]


@flow(name="rlhf-refinement", log_prints=True)
def rlhf_refinement(workspace: str = ".", config: PipelineConfig | None = None,
                    overrides: dict[str, Any] | None = None):
    """One scheduled round of continuous refinement (see the module's docstring).

    `config` is the whole typed configuration (the Prefect UI renders it as a form; empty = the
    workspace's params.yaml); `overrides` sets single dotted keys on top, e.g. {"ppo.steps": 20}.
    """
    logger = get_run_logger()
    ws = init_workspace(workspace)
    if config is None:
        cfg = load_config(ws.params if ws.params.exists() else None, overrides)
    else:
        cfg = with_overrides(config, overrides)
    check_tracking(str(ws.root))
    if rounds.round_in_progress(ws):  # rlhf_round takes the lock itself; this makes the skip a clean one
        message = f"another round is running in {ws.root}; this run is skipped (at most one round at a time)"
        logger.warning(message)
        return Cancelled(message=message)
    inbox = import_inbox(str(ws.root), cfg.refinement.inbox, mapping=cfg.refinement.inbox_map,
                         chat_template=cfg.chat.template)
    if not cfg.collect.simulate and cfg.refinement.skip_without_new_feedback:
        new = new_feedback_since_last_round(ws)
        if not new:
            message = "no feedback since the last round (collect.simulate is false): nothing to train on"
            if inbox["waiting"]:
                message += f"; {len(inbox['waiting'])} inbox file(s) still being written are left for the next round"
            logger.info(message)
            return Completed(message=message)
        logger.info("new feedback since the last round: %s", ", ".join(new))
    line = rlhf_round(str(ws.root), cfg)
    line["inbox"] = inbox
    line |= prune_after_round(str(ws.root), cfg, line["round"])
    pruning = line.get("pruning", "refinement.keep_versions is null: nothing pruned")
    inbox_note = f"inbox: {len(inbox['imported'])} imported, {len(inbox['failed'])} failed"
    if inbox["waiting"]:
        inbox_note += f", {len(inbox['waiting'])} left for the next round (still being written)"
    create_markdown_artifact(
        key="rlhf-refinement", description=f"Refinement round {line['round']}",
        markdown=f"# Refinement round {line['round']}: {'promoted' if line['promoted'] else 'not promoted'}\n\n"
                 f"{rounds.headline(line)}, "
                 f"KL {line['kl']:.2f}, win-rate {line['win_rate']:.2f}\n\n"
                 f"{inbox_note}\n\n{pruning}\n\n"
                 f"disk: {gc.describe_usage(gc.disk_usage(ws))}\n")
    return line

