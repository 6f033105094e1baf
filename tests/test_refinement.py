"""Continuous refinement against a real Prefect server started here, served by `rlhf serve`.

One workspace, in order: the deployments exist (with the schedule); two overlapping triggers run
one round and cancel the other; that round, killed during PPO, changes no champion and no history,
and the next run redoes it, registering nothing twice, then prunes (refinement.keep_versions); a
run with people's feedback from the inbox trains a round, and none runs without new feedback; an
unreachable MLflow is retried, then reported clearly. Rounds use the tiny locally built model and
small sizes: this module tests the orchestration, test_flow.py the learning.
"""
import asyncio
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from flows.serve import ServerError, check_exposure, free_port, spawn_serve, start_servers
from tasks import registry, rounds, tracking, versioning
from tasks.config import load_config
from tasks.processes import stop_groups
from tasks.workspace import Workspace, folder_bytes, init_workspace

from conftest import SMALL, still_running

pytestmark = pytest.mark.slow



SECRET = "rlhf-test-secret-5f0c9e"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    # mlflow.set_tracking_uri() in earlier tests exports MLFLOW_TRACKING_URI (their stores): the
    # served rounds would take it for the user's tracking server. A user's shell has no such leftover.
    env = pytest.MonkeyPatch()
    env.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = init_workspace(tmp_path_factory.mktemp("refine") / "ws")
    rounds.write_params(ws, load_config(None, {**SMALL, "models.policy": str(tiny_model_dir),
                                               "refinement.cron": "0 3 * * 1"}))
    servers = start_servers(ws, prefect_port=free_port(), mlflow_port=free_port())
    API_URL["prefect"] = servers.prefect_url
    # a remote's credential, as users give it (the environment): it must never land anywhere we write
    serve = spawn_serve(ws.root, servers.prefect_url, ws.root / ".cache" / "serve.log",
                        env={"AWS_SECRET_ACCESS_KEY": SECRET})
    try:
        names = ["rlhf-refinement/scheduled", "rlhf-round/on-demand", "rlhf-label/on-demand"]
        _wait(lambda: all(_deployment(n) is not None for n in names), 120, serve, ws)
        yield ws, serve, servers
    finally:
        stop_groups(serve)
        servers.stop()
        env.undo()


def _serve_log(ws):
    return (ws.root / ".cache" / "serve.log").read_text(errors="replace")[-3000:]


def _wait(cond, timeout, serve, ws, every=1.0, run_id=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            pytest.fail(f"rlhf serve exited ({serve.returncode}):\n{_serve_log(ws)}")
        value = cond()
        if value:
            return value
        time.sleep(every)
    state = f"; the flow run is {_flow_run(run_id).state!r}" if run_id else ""
    pytest.fail(f"timed out after {timeout} s{state}; rlhf serve log:\n{_serve_log(ws)}")


def _in_thread(fn, *args, **kwargs):
    """Run a Prefect client call on its own thread: Playwright's sync API holds this one's event loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kwargs).result()


API_URL = {}  # the served server's, set by the fixture: helpers name it, never rely on ambient settings


def _api(coro_fn):
    from prefect.client.orchestration import PrefectClient

    async def go():
        async with PrefectClient(api=API_URL["prefect"]) as client:
            return await coro_fn(client)
    return _in_thread(asyncio.run, go())


def _deployment(name):
    from prefect.exceptions import ObjectNotFound

    async def read(client):
        try:
            return await client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None
    return _api(read)


def _scheduled_runs(deployment_id):
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    return _api(lambda c: c.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))), limit=10))


def _trigger(name):
    return _run_deployment(name)


def _run_deployment(name, parameters=None):
    from prefect.deployments.flow_runs import arun_deployment

    return _api(lambda c: arun_deployment(name, client=c, parameters=parameters, timeout=0))


def _flow_run(run_id):
    return _api(lambda c: c.read_flow_run(run_id))


def _final(run_id):
    run = _flow_run(run_id)
    return run if run.state.is_final() else None


def _cmdline(proc):
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _versions(ws, name):
    client = MlflowClient(tracking_uri=ws.tracking_uri)
    return sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))


def _stage_runs(ws, cfg, stage):
    client = tracking.setup(ws, cfg.project)
    runs = client.search_runs([client.get_experiment_by_name(cfg.project).experiment_id], f"tags.stage = '{stage}'")
    return sorted(r.info.run_id for r in runs)


def test_deployments_are_served_with_the_schedule_and_the_limit(served):
    ws, serve, _ = served
    refinement = _deployment("rlhf-refinement/scheduled")
    assert [s.schedule.cron for s in refinement.schedules] == ["0 3 * * 1"]
    assert refinement.schedules[0].active
    assert refinement.global_concurrency_limit.limit == 1
    assert refinement.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert refinement.parameters["workspace"] == str(ws.root)
    assert _deployment("rlhf-round/on-demand") is not None
    assert _deployment("rlhf-label/on-demand") is not None
    # the run form: the typed config is part of the flow's parameter schema
    assert "config" in refinement.parameter_openapi_schema["properties"]
    # the server's scheduler turns the cron into upcoming runs (it failed on SQLAlchemy 2.1)
    upcoming = _wait(lambda: _scheduled_runs(refinement.id), 150, serve, ws, every=2)
    for run in upcoming:
        start = run.expected_start_time
        assert (start.weekday(), start.hour, start.minute) == (0, 3, 0), start  # Mondays 03:00 UTC


def test_overlapping_triggers_run_one_round_and_a_round_killed_during_ppo_changes_nothing(served):
    """Two triggers at once: one round runs, the other is cancelled. That round is killed during PPO
    (its whole process tree, as a lost machine would be): no candidate, no history, the champion the
    bootstrap registered is untouched; the next run redoes the round, PPO going on from the killed
    run's last checkpoint, registering nothing twice, and after it frees disk as
    refinement.keep_versions says, as `rlhf gc --keep N --remote` does."""
    import mlflow

    ws, serve, _ = served
    cfg = load_config(ws.params)
    client = tracking.setup(ws, cfg.project)
    first, second = _trigger("rlhf-refinement/scheduled"), _trigger("rlhf-refinement/scheduled")
    checkpoints = ws.root / ".cache" / "ppo-checkpoints" / "round-1"
    _wait(lambda: (checkpoints / "policy.safetensors").exists(), 600, serve, ws, every=0.5)
    ours = psutil.Process(serve.pid)
    ppo = _wait(lambda: [p for p in ours.children(recursive=True)
                         if "tasks.train_policy" in " ".join(_cmdline(p))], 30, serve, ws, every=0.2)
    flow_proc = next(p for p in ppo[0].parents() if p.ppid() == serve.pid)  # the flow run's own process
    victims = [flow_proc, *flow_proc.children(recursive=True)]
    for p in victims:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    runs = [_wait(lambda r=r: _final(r.id), 120, serve, ws, every=2) for r in (first, second)]
    states = sorted(r.state.type.value for r in runs)
    assert states in (["CANCELLED", "CRASHED"], ["CANCELLED", "FAILED"]), [(r.state.type, r.state.message) for r in runs]
    assert len(_stage_runs(ws, cfg, "train_policy")) == 1  # never two rounds side by side

    champion = tracking.alias_version(client, cfg.policy_name, tracking.CHAMPION)
    assert champion is not None and _versions(ws, cfg.policy_name) == [int(champion)]  # the bootstrap's only
    assert _versions(ws, cfg.reward_name) == []  # models are registered only by `promote`
    assert rounds.completed_rounds(ws) == []
    assert not ws.history_file.exists() or not ws.history_file.read_text().strip()
    assert not rounds.round_in_progress(ws)  # the OS dropped the dead round's lock
    reward_runs_killed = _stage_runs(ws, cfg, "train_reward")  # the round's reward model, trained before the kill
    policy_runs_killed = _stage_runs(ws, cfg, "train_policy")
    assert len(reward_runs_killed) == 1

    # the next run redoes the round, then prunes as refinement.keep_versions says (`rlhf gc --keep 1`,
    # with gc_remote on the DVC remote too): a policy version neither aliased nor newest loses its weights
    extra, extra_folder = _extra_version(ws, cfg, client, ws.base_model)
    prune = {"refinement.keep_versions": 1, "refinement.gc_remote": True}
    run = _run_deployment("rlhf-refinement/scheduled", {"overrides": prune})
    final = _wait(lambda: _final(run.id), 600, serve, ws, every=2)
    assert final.state.is_completed(), final.state.message
    assert [r["round"] for r in rounds.completed_rounds(ws)] == [1]  # redone under the same number
    assert _stage_runs(ws, cfg, "train_reward") == reward_runs_killed  # DVC skipped it: trained once
    assert len(_versions(ws, cfg.reward_name)) == 1  # one version per round
    assert len(_versions(ws, cfg.policy_name)) == 3  # the bootstrap's, the extra one and round 1's candidate
    assert not rounds.round_in_progress(ws)
    # PPO went on from the killed run's last checkpoint (it had written one before the kill)
    redone = [r for r in _stage_runs(ws, cfg, "train_policy") if r not in policy_runs_killed]
    params = client.get_run(redone[0]).data.params
    assert len(redone) == 1 and int(params["ppo.resumed_from_step"]) >= cfg.ppo.checkpoint_every, params

    [gc_task] = _task_runs(run.id, "collect_garbage")
    assert gc_task.state.is_completed()
    note = _refinement_note(run.id)
    assert re.search(r"gc: freed \d+\.\d MiB", note) and re.search(r"disk: \d+\.\d MiB kept by the pipeline", note)
    for name in (cfg.policy_name, cfg.reward_name):
        versions = sorted((client.get_model_version(name, v.version) for v in client.search_model_versions(f"name='{name}'")),
                          key=lambda v: int(v.version))
        for v in versions:  # kept: an alias or the newest; every other version's weights are gone
            kept = bool(v.aliases) or v is versions[-1]
            assert (tracking.PRUNED in v.tags) != kept, (name, v.version, v.aliases)
    assert tracking.PRUNED in client.get_model_version(cfg.policy_name, extra).tags and not extra_folder.exists()
    assert Path(tracking.resolve_model(ws, f"models:/{cfg.policy_name}@champion"), "model.safetensors").exists()
    gc_runs = mlflow.search_runs(experiment_names=[cfg.project], filter_string="tags.stage = 'gc'", output_format="list")
    assert len(gc_runs) == 1 and gc_runs[0].data.metrics["bytes_freed"] > 100_000
    assert all(len(f.read_bytes()) > 0 for f in versioning.raw_files(ws))  # feedback is never pruned


def _people_feedback(path: Path) -> None:
    """Labels as people give them: the neutral continuation preferred, one pair per line."""
    from tasks import scenario
    from tasks.records import PreferenceRecord

    lines = []
    for profession in sorted(scenario.FEEDBACK_PROFESSIONS):
        for singular, plural in scenario.CONTINUATIONS:
            for pronoun in ("he", "she"):
                lines.append(PreferenceRecord(
                    prompt=scenario.prompt_for(profession), chosen=f" they {plural} .",
                    rejected=f" {pronoun} {singular} .", source="inbox", annotator="reviewer-1", round=0,
                    created_at="2026-11-20T09:00:00+00:00").to_json())
    path.write_text("\n".join(lines) + "\n")


def _extra_version(ws, cfg, client, folder: Path) -> tuple[str, Path]:
    """One more policy version, logged from `folder`: neither aliased nor, after the next round,
    newest. Its version, and the folder of its weights in the store (over 100 kB of them)."""
    import mlflow

    with mlflow.start_run(run_name="extra-version"):
        version = tracking.log_model(folder, "policy", cfg.policy_name).version
    weights = Path(client.get_model_version_download_uri(cfg.policy_name, version).removeprefix("file://"))
    assert folder_bytes(weights) > 100_000
    return version, weights


def test_a_run_while_a_round_holds_the_workspace_is_cancelled(served):
    ws, serve, _ = served
    history = ws.history_file.read_text()
    with rounds.round_lock(ws):  # as a round started any other way (rlhf run, dvc repro) would
        refine, round_ = _run_deployment("rlhf-refinement/scheduled"), _run_deployment("rlhf-round/on-demand")
        refine = _wait(lambda: _final(refine.id), 300, serve, ws, every=2)
        round_ = _wait(lambda: _final(round_.id), 300, serve, ws, every=2)
    assert refine.state.is_cancelled() and "another round is running" in refine.state.message
    assert round_.state.is_failed() and "at most one round runs at a time" in round_.state.message
    assert ws.history_file.read_text() == history


def test_people_feedback_from_the_inbox_trains_a_round_and_without_new_feedback_none_runs(served):
    """collect.simulate false: the round trains on what people gave (here, files dropped into the
    inbox); a bad file is set aside with its reason; with nothing new, the next run is skipped.
    The round's run also prunes (refinement.keep_versions, with gc_remote) while a feedback file of
    history is missing from the workspace: its gc refuses before deleting anything, its task fails,
    and the run, whose round is done, completes and says why; the file is restored after."""
    ws, serve, _ = served
    cfg = load_config(ws.params)
    client = tracking.setup(ws, cfg.project)
    extra, extra_folder = _extra_version(ws, cfg, client, ws.policy_model)
    weights = folder_bytes(extra_folder)
    pointer = sorted((ws.root / "data" / "feedback" / "raw").glob("*.dvc"))[0]
    versioning.git(ws, "rm", "-q", str(pointer.relative_to(ws.root)))
    versioning.git(ws, "commit", "-q", "-m", "drop a feedback file")
    dropped = versioning.git(ws, "rev-parse", "HEAD").stdout.strip()
    inbox = ws.root / "inbox"
    inbox.mkdir(exist_ok=True)
    _people_feedback(inbox / "reviews.jsonl")
    (inbox / "broken.jsonl").write_text("this is not json\n{\"prompt\": 1}\n")
    for f in ("reviews.jsonl", "broken.jsonl"):  # written a minute ago: not a copy still under way
        os.utime(inbox / f, (time.time() - 60,) * 2)
    done_before = len(rounds.completed_rounds(ws))
    people_only = {"overrides": {"collect.simulate": False, "refinement.keep_versions": 1,
                                 "refinement.gc_remote": True}}

    run = _run_deployment("rlhf-refinement/scheduled", people_only)
    run = _wait(lambda: _final(run.id), 600, serve, ws, every=2)
    assert run.state.is_completed(), run.state.message
    assert (inbox / "done" / "reviews.jsonl").exists() and not (inbox / "reviews.jsonl").exists()
    assert "cannot tell the format" in (inbox / "failed" / "broken.jsonl.reason.txt").read_text()
    done = rounds.completed_rounds(ws)
    assert len(done) == done_before + 1, (run.state.message, _serve_log(ws))
    new_files = set(done[-1]["feedback_files"]) - set(done[-2]["feedback_files"])
    assert len(new_files) == 1 and "import-jsonl" in new_files.pop()  # the inbox file, nothing simulated
    [gc_task] = _task_runs(run.id, "collect_garbage")
    assert gc_task.state.is_failed() and "would delete their only copy" in gc_task.state.message
    assert "gc failed" in _refinement_note(run.id) and "would delete their only copy" in _refinement_note(run.id)
    assert folder_bytes(extra_folder) == weights  # refused before anything was deleted
    assert tracking.PRUNED not in client.get_model_version(cfg.policy_name, extra).tags

    run = _run_deployment("rlhf-refinement/scheduled", people_only)
    run = _wait(lambda: _final(run.id), 300, serve, ws, every=2)
    assert run.state.is_completed() and "no feedback since the last round" in run.state.message
    assert len(rounds.completed_rounds(ws)) == done_before + 1
    # the feedback file back (its data is on the DVC remote: gc refused), and the simulated annotator
    # back for the rounds of the tests below
    versioning.git(ws, "revert", "--no-edit", dropped)  # the round committed its lineage since
    versioning.dvc(ws, "pull", "-q", str(pointer.relative_to(ws.root)))
    assert all(len(f.read_bytes()) > 0 for f in versioning.raw_files(ws))
    rounds.write_params(ws, load_config(ws.params, {"collect.simulate": True}))
    # and the champion before it: the people's feedback above prefers one sentence per prompt, and a
    # policy trained on it may answer a prompt with the same sentence every time, which the label
    # flows below cannot show as a pair
    if done[-1]["promoted"]:
        registry.rollback(ws, cfg, "tests: the champion of varied feedback back")


def _task_runs(flow_run_id, prefix):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = _api(lambda c: c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))))
    return [t for t in runs if t.name.startswith(prefix)]


def _refinement_note(flow_run_id):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    found = _api(lambda c: c.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=["rlhf-refinement"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))))
    assert len(found) == 1, found
    return found[0].data


def _stage_processes(serve):
    """`dvc repro` and the stage it runs, under `rlhf serve` (the dead but unreaped left out)."""
    found = []
    for p in psutil.Process(serve.pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and re.search(r"-m (dvc|tasks\.)", " ".join(p.cmdline())):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_a_round_cancelled_in_the_ui_stops_its_stage_and_changes_nothing(served):
    """Cancel, as the UI's button does it, while a stage runs: Prefect's runner sends the flow run
    SIGTERM; the stage and DVC stop with it (nothing runs on, orphaned), the run ends Cancelled,
    the workspace is free again and no round is recorded."""
    from prefect.states import Cancelling

    ws, serve, _ = served
    done = rounds.completed_rounds(ws)
    run = _run_deployment("rlhf-round/on-demand")
    _wait(lambda: any("tasks.collect" in " ".join(_cmdline(p)) for p in _stage_processes(serve)), 300, serve, ws,
          every=0.2)
    running = _stage_processes(serve)  # `dvc repro` and the collect stage it started
    _api(lambda c: c.set_flow_run_state(run.id, Cancelling(message="cancelled by a test"), force=True))
    final = _wait(lambda: _final(run.id), 120, serve, ws, every=1)
    assert final.state.is_cancelled(), (final.state.type, final.state.message)
    # stopped before the run is marked Cancelled (the stage takes longer than this: it has just started);
    # orphans would be init's children by now, so they are followed by pid
    alive = still_running(running, timeout=2)
    assert not alive, [_cmdline(p) for p in alive]
    assert not rounds.round_in_progress(ws) and rounds.completed_rounds(ws) == done


UNREACHABLE = """
import json, sys
import flows.refinement as refinement
refinement.check_tracking = refinement.check_tracking.with_options(retry_delay_seconds=[0.2, 0.4, 0.8])
state = refinement.rlhf_refinement(workspace=sys.argv[1], return_state=True)
print(json.dumps({"failed": state.is_failed(), "message": state.message,
                  "flow_run_id": str(state.state_details.flow_run_id)}))
"""


def test_an_unreachable_mlflow_is_retried_then_reported(served):
    """The flow in its own process, pointed at an MLflow server nobody listens on."""
    ws, _, servers = served
    # MLflow's own retries left as users have them (about four minutes a request): the probe says it
    env = {**os.environ, "PREFECT_API_URL": servers.prefect_url, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    out = subprocess.run([sys.executable, "-c", UNREACHABLE, str(ws.root)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failed"]
    assert re.search(r"TrackingUnavailable: MLflow tracking store http://127.0.0.1:\d+ is unreachable: "
                     r"MlflowException: the server does not answer at http://127.0.0.1:\d+/health", result["message"])
    flow_run = _flow_run(result["flow_run_id"])
    assert "unreachable" in flow_run.state.message  # what the Prefect UI shows
    task_runs = _api(lambda c: c.read_task_runs())
    attempts = [t.run_count for t in task_runs if t.flow_run_id == flow_run.id and t.name.startswith("check_tracking")]
    assert attempts == [4]  # the first try and three retries

ARTIFACTS = Path(os.environ.get("RLHF_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


@pytest.fixture
def page():
    """A page of Debian's headless Chromium, driven by Playwright (`make test` installs Chromium as root)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def test_the_uis_show_the_deployment_a_paused_label_form_and_the_champion(served, page):
    """Prefect's UI lists the deployments with the schedule and renders the typed config as a run
    form; a paused label run shows its pairs and form, and submitting it finishes the run; MLflow's
    UI shows the champion alias on the registered policy. Screenshots land in test-artifacts/browser."""
    from playwright.sync_api import expect

    ws, serve, servers = served
    shots = ARTIFACTS / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    ui = servers.prefect_url.removesuffix("/api")
    raw_before = set(versioning.raw_files(ws))
    run = _run_deployment("rlhf-label/on-demand", {"pairs": 2, "batch_size": 2})

    page.goto(f"{ui}/deployments")
    row = page.get_by_role("row").filter(has_text="rlhf-refinement")
    expect(row).to_contain_text("scheduled")
    page.screenshot(path=shots / "prefect-deployments.png")
    row.get_by_role("link", name="scheduled").click()
    expect(page.get_by_text("At 03:00 AM, only on Monday")).to_be_visible()  # the cron of params.yaml
    page.screenshot(path=shots / "prefect-refinement-deployment.png")
    page.goto(page.url.split("?")[0] + "/run")  # the custom run form: the typed config as fields
    page.get_by_role("button", name="PipelineConfig").click()
    expect(page.get_by_text("Missing Eos Penalty")).to_be_visible()
    expect(page.get_by_text("adaptive controller target, nats per sequence", exact=False)).to_be_visible()
    expect(page.get_by_text("simulated annotator's Bradley-Terry sharpness")).to_be_visible()
    page.screenshot(path=shots / "prefect-run-form.png", full_page=True)

    _wait(lambda: _flow_run(run.id).state.is_paused(), 300, serve, ws)
    page.goto(f"{ui}/runs/flow-run/{run.id}")
    page.get_by_role("button", name="Resume").click()
    form = page.get_by_role("dialog")
    expect(form).to_contain_text("Pick the better response of each pair below")
    expect(form).to_contain_text("Pair 2")
    for n, choice in ((1, "B"), (2, "A")):  # as a person answers: each pair's drop-down
        field = form.locator(".schema-form-property").filter(has_text=f"Pair {n}: the better response")
        field.locator("button.p-select-button__control").press("ArrowDown")  # opens it (headless clicks do not)
        page.get_by_role("option", name=choice, exact=True).click()
        expect(field).to_contain_text(choice)
    form.locator(".schema-form-property").filter(has_text="Pair 2: comment").locator("textarea").fill("A is clearer")
    # run without an annotator: the form asks who answers
    form.locator(".schema-form-property").filter(has_text="Your name").locator("textarea, input").first.fill("erin")
    page.screenshot(path=shots / "prefect-label-form.png", full_page=True)
    form.get_by_role("button", name="Submit").click()
    try:
        expect(form).to_be_hidden(timeout=45_000)  # the UI took the answers
    except AssertionError:  # once in six suite runs on 2 busy cores the click went nowhere: the run still
        assert _flow_run(run.id).state.is_paused()  # paused, the form open with no error in it. A person
        page.screenshot(path=shots / "prefect-label-form-submitted-again.png", full_page=True)  # presses
        form.get_by_role("button", name="Submit").click()  # Submit again; the answers must then land
        expect(form).to_be_hidden(timeout=60_000)
    final = _wait(lambda: _final(run.id), 180, serve, ws, run_id=run.id)
    assert final.state.is_completed(), final.state.message
    (labels,) = set(versioning.raw_files(ws)) - raw_before  # the form's answers, versioned
    records = [json.loads(line) for line in labels.read_text().splitlines()]
    assert [(r["label"], r["source"], r["annotator"], r["shown_as_a"], r.get("comment")) for r in records] == [
        ("pair", "prefect-ui", "erin", "rejected", None), ("pair", "prefect-ui", "erin", "chosen", "A is clearer")]
    # the label flow loaded the champion to sample its pairs: no progress bars in the flow-run log
    assert "Loading weights" not in (ws.root / ".cache" / "serve.log").read_text(errors="replace")

    cfg = load_config(ws.params)
    champion = tracking.alias_version(MlflowClient(tracking_uri=ws.tracking_uri), cfg.policy_name, tracking.CHAMPION)
    assert champion is not None
    page.goto(f"{servers.mlflow_url}/#/models/{cfg.policy_name}")
    version = page.get_by_role("row").filter(has_text=f"Version {champion}")
    expect(version).to_contain_text("champion")
    page.screenshot(path=shots / "mlflow-champion.png", full_page=True)


def test_a_label_session_cancelled_in_the_ui_keeps_the_labels_given(served):
    """Cancel, as the UI's button does it, a label run paused at its second batch: the first
    batch's answers are saved as raw feedback before the run ends Cancelled."""
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    ws, serve, servers = served
    raw_before = set(versioning.raw_files(ws))
    run = _run_deployment("rlhf-label/on-demand", {"pairs": 4, "batch_size": 2, "annotator": "dana"})
    _wait(lambda: _flow_run(run.id).state.is_paused(), 300, serve, ws, run_id=run.id)

    def answer():
        with temporary_settings({PREFECT_API_URL: servers.prefect_url}):
            resume_flow_run(run.id, run_input={"pair_1": "B", "pair_2": "tie", "comment_2": "both fine"})
    _in_thread(answer)
    _wait(lambda: (_flow_run(run.id).state.is_paused()
                   and _flow_run(run.id).state.state_details.pause_key == "2"), 120, serve, ws, run_id=run.id)
    _api(lambda c: c.set_flow_run_state(run.id, Cancelling(message="cancelled by a test"), force=True))
    final = _wait(lambda: _final(run.id), 120, serve, ws, run_id=run.id)
    assert final.state.is_cancelled(), (final.state.type, final.state.message)
    (labels,) = set(versioning.raw_files(ws)) - raw_before
    records = [json.loads(line) for line in labels.read_text().splitlines()]
    assert [(r["label"], r["annotator"], r.get("comment")) for r in records] == [
        ("pair", "dana", None), ("tie", "dana", "both fine")]


def test_the_credential_in_the_environment_lands_nowhere(served):
    """After every round above: not in the workspace (git history, DVC, MLflow's store and
    artifacts, params, logs), not in the Prefect server's database (flow-run logs, parameters)."""
    ws, _, _ = served
    prefect_home = Path(os.environ["PREFECT_HOME"])
    scanned, found = 0, []
    for folder in (ws.root, prefect_home):
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                scanned += 1
                if SECRET.encode() in path.read_bytes():
                    found.append(str(path))
    assert scanned > 100 and (ws.root / ".git").is_dir() and (ws.root / "mlflow.db").exists()
    assert not found, f"the credential was written to {found}"



def test_stopping_serve_mid_round_stops_the_stage_too(served):
    """Last of the served tests: `rlhf serve` stopped (`kill PID`: SIGTERM to it alone) while a
    round's stage runs. Prefect's runner stops the flow run, which stops DVC and the stage."""
    ws, serve, _ = served
    _run_deployment("rlhf-round/on-demand")
    running = _wait(lambda: _stage_processes(serve), 300, serve, ws, every=0.2)
    serve.send_signal(signal.SIGTERM)
    serve.wait(timeout=60)
    alive = still_running(running, timeout=2)
    assert not alive, [_cmdline(p) for p in alive]


def test_servers_refuse_to_bind_beyond_loopback_without_auth(tmp_path):
    with pytest.raises(ServerError, match="PREFECT_SERVER_API_AUTH_STRING.*--mlflow-auth"):
        check_exposure("0.0.0.0", mlflow_auth=False, environ={})
    with pytest.raises(ServerError, match="--mlflow-auth"):
        check_exposure("10.1.2.3", mlflow_auth=False, environ={"PREFECT_SERVER_API_AUTH_STRING": "a:b"})
    check_exposure("0.0.0.0", mlflow_auth=True, environ={"PREFECT_SERVER_API_AUTH_STRING": "a:b"})
    check_exposure("127.0.0.1", mlflow_auth=False, environ={})
    check_exposure("localhost", mlflow_auth=False, environ={})
    with pytest.raises(ServerError, match="refusing"):
        start_servers(Workspace(tmp_path), host="0.0.0.0")


def test_cli_rejects_bad_serve_and_server_arguments(tmp_path, capsys):
    from flows.cli import main

    for argv in (["server", "--prefect-port", "0"], ["server", "--mlflow-port", "http"],
                 ["serve", "--prefect-port", "70000"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    (tmp_path / "params.yaml").write_text("refinement:\n  cron: every day\n")
    assert main(["serve", "--workspace", str(tmp_path)]) == 2
    assert "not a cron expression" in capsys.readouterr().err
    (tmp_path / "params.yaml").write_text("refinement:\n  timezone: Mars/Olympus\n")
    assert main(["serve", "--workspace", str(tmp_path)]) == 2
    assert "unknown time zone" in capsys.readouterr().err
