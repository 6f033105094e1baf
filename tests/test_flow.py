"""The whole round through the Prefect flow, on a fresh git + DVC workspace, with real MLflow.

One round runs once for the module; the tests then check what every stage left behind.
"""
import hashlib
import json
import re
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from tasks import rounds, scenario, versioning
from tasks.config import load_config
from tasks.workspace import Workspace, init_workspace

from conftest import FAST, SMALL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    """The temporary Prefect server `rlhf run` starts where no PREFECT_API_URL is set; the flows
    of this module report to it, and so do the `rlhf run`s they make."""
    from flows.serve import prefect_api

    with prefect_api(Workspace(tmp_path_factory.mktemp("prefect")), timeout=180):
        yield


@pytest.fixture(scope="module")
def finished_round(prefect, tmp_path_factory):
    from flows.pipeline import rlhf_round

    root = tmp_path_factory.mktemp("flow") / "ws"
    # a label-balance bound the scenario cannot meet: a warning, which must not stop the round;
    # an eval file of your own, scored beside the held-out pairs
    (root.parent / "eval.jsonl").write_text("".join(json.dumps({"prompt": f"the {who} said", "chosen": " they left .",
                                                                "rejected": " she left ."}) + "\n"
                                                    for who in ("judge", "cook", "nurse")))
    line = rlhf_round(workspace=str(root), config=load_config(None, {**FAST, "validate.chosen_longer_max": 0.05,
                                                                       "reward.eval_file": str(root.parent / "eval.jsonl")}))
    return Workspace(root), line


def git(ws, *args):
    return subprocess.run(["git", *args], cwd=ws.root, capture_output=True, text=True, check=True).stdout


def test_round_improves_the_held_out_gold_metric_and_promotes(finished_round):
    ws, line = finished_round
    assert line["round"] == 1
    assert line["gold_after"] > line["gold_before"] + 0.2, line
    assert line["promoted"] is True, line["reasons"]
    assert 0 < line["kl"] < load_config(ws.params).gates.max_kl
    assert line["reward_accuracy"] >= 0.6
    accuracy = next(r for r in line["reasons"] if r.startswith("reward_accuracy"))
    assert re.search(r"\d+ held-out pairs of 10 prompts, each prompt also trained on, 95% interval [0-9.]+-[0-9.]+ "
                     r"over pairs; [0-9.]+ on the 3 pairs of reward.eval_file\)$", accuracy), accuracy


NOTES = """
import sys, warnings
print("step 1/1")
print("warning: 3 pairs are too long")
print("Created version '4' of model 'rlhf-policy'.", file=sys.stderr)  # MLflow's note, on stderr
warnings.warn("`old` is deprecated", FutureWarning)
"""


def test_a_stages_output_reaches_the_rounds_prefect_log(prefect, tmp_path):
    """What a stage prints reaches the round's log in Prefect, its `warning:` lines as warnings;
    what it writes to stderr too, once it has succeeded (before, it was dropped): a library's
    warning as a warning, its notes (MLflow's "Created version ...") as notes."""
    import logging

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from flows.pipeline import run_stage

    root = tmp_path / "ws"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    versioning.dvc(Workspace(root), "init", "-q")
    (root / "notes.py").write_text(NOTES)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"notes": {"cmd": "python notes.py"}}}))
    @flow
    def one_stage():
        return run_stage(str(root), "notes")

    levels = {name: logging.getLogger(name).level for name in ("prefect", "prefect.task_runs")}
    try:  # the suite logs warnings alone; setLevel, which clears the loggers' caches
        for name in levels:
            logging.getLogger(name).setLevel(logging.INFO)
        state = one_stage(return_state=True)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert state.is_completed()
    APILogWorker.drain_all(timeout=10)  # (its worker sends logs in batches)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    said = [(log.level, log.message) for log in logs if log.message.startswith("notes")]
    assert said[:4] == [(logging.INFO, "notes: step 1/1"), (logging.WARNING, "notes: warning: 3 pairs are too long"),
                        (logging.INFO, "notes (stderr): Created version '4' of model 'rlhf-policy'."),
                        (logging.WARNING, f"notes (stderr): {root / 'notes.py'}:6: FutureWarning: `old` is deprecated")]


def test_both_models_registered_with_champion_and_previous(finished_round):
    ws, line = finished_round
    cfg = load_config(ws.params)
    mlflow.set_tracking_uri(ws.tracking_uri)
    client = MlflowClient()
    policy = client.get_model_version_by_alias(cfg.policy_name, "champion")
    assert str(policy.version) == line["policy_version"] == "2"  # v1 is the bootstrapped base policy
    assert str(client.get_model_version_by_alias(cfg.policy_name, "previous").version) == "1"
    assert str(client.get_model_version_by_alias(cfg.reward_name, "champion").version) == line["reward_version"]
    assert policy.tags["promoted"] == "true" and "win_rate_lower_bound passed" in policy.tags["gates"]
    assert (ws.root / "mlflow.db").exists() and any((ws.root / "mlruns").iterdir())


def test_every_stage_run_is_tagged_with_its_lineage(finished_round):
    ws, _ = finished_round
    mlflow.set_tracking_uri(ws.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["rlhf"], output_format="list")
    stages = {r.data.tags["stage"] for r in runs}
    assert {"pretrain", "collect", "validate", "train_reward", "train_policy", "evaluate", "promote"} <= stages
    for r in runs:
        assert r.data.tags["round"] == "1"
        assert len(r.data.tags["git_commit"]) == 40
        assert "parent_champion_policy" in r.data.tags
    trained = [r for r in runs if r.data.tags["stage"] in ("train_reward", "train_policy")]
    assert all(r.data.tags["dvc_data_md5"] == versioning.file_md5(ws.accepted) for r in trained)
    ppo = next(r for r in runs if r.data.tags["stage"] == "train_policy")
    assert {"objective/kl", "objective/scores", "policy/entropy", "val/explained_var"} <= set(ppo.data.metrics)


def test_feedback_is_versioned_committed_and_pushed(finished_round):
    ws, _ = finished_round
    raw = versioning.raw_files(ws)
    assert len(raw) == 1 and raw[0].name.startswith("round-0001-simulated-")
    pointer = raw[0].with_name(raw[0].name + ".dvc")
    assert pointer.exists()
    assert "data: round 1 feedback (simulated" in git(ws, "log", "--format=%s", "--", str(pointer))
    md5 = versioning.file_md5(raw[0])
    assert (ws.root / ".dvcstore" / "files" / "md5" / md5[:2] / md5[2:]).exists()  # pushed to the local remote
    records = [json.loads(x) for x in raw[0].read_text().splitlines()]
    assert {"id", "prompt", "chosen", "rejected", "source", "annotator", "round", "policy_version",
            "created_at"} <= set(records[0])
    assert records[0]["policy_version"] == "1"
    # the round's lineage is committed, and DVC sees nothing out of date
    assert "round 1: policy v2 promoted" in git(ws, "log", "-1", "--format=%s")
    assert git(ws, "status", "--porcelain") == ""
    assert "up to date" in versioning.dvc(ws, "status").stdout.lower()
    assert [v.files for v in versioning.history(ws)] == [[str(raw[0].relative_to(ws.root))]]


def test_validation_report_artifact_and_data_docs(finished_round):
    ws, line = finished_round
    summary = json.loads(ws.validation_report.read_text())
    assert summary["passed"] and summary["accepted"] >= 20
    assert summary["warnings"] and summary["warnings"][0].startswith("label_balance")
    assert line["promoted"]  # the warning did not stop the round
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["rlhf-validation"])))
    assert artifacts and "warning: label_balance" in artifacts[-1].data
    docs = ws.reports / "validation" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    assert "preference_rows" in docs.read_text() and "preference_dataset" in docs.read_text()


def test_status_json_holds_the_documented_keys(finished_round, capsys):
    from flows.cli import main

    ws, line = finished_round
    info = rounds.status(ws, load_config(ws.params))
    disk = info["disk"]
    parts = ("mlflow", "dvc_cache", "dvc_remote", "downloads", "working")
    assert disk["keep_versions"] is None and disk["mlflow_server"] is False and min(disk[k] for k in parts if k != "downloads") > 100_000
    assert disk["total"] == sum(disk[k] for k in parts)
    assert main(["status", "--workspace", str(ws.root)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"disk +\d+\.\d MiB kept by the pipeline \(MLflow \d+\.\d, DVC cache", out)
    assert re.search(r"^base model +the built-in scenario's, pre-trained with seed 0$", out, re.M)
    assert info["base_model"]["models.policy"] is None and info["base_model"]["pretrain.n_layer"] == 2
    assert info["champion"]["policy_version"] == "2" and info["previous"]["policy_version"] == "1"
    assert info["champion"]["reward_version"] == line["reward_version"]
    last = info["last_round"]
    for key in ("round", "gold_before", "gold_after", "kl", "reward", "reward_before", "reward_accuracy", "win_rate",
                "promoted", "reasons"):
        assert key in last
    on_file = last["reward_eval_file_accuracy"]  # the round's reward.eval_file
    assert re.search(rf"^reward model +held-out accuracy {last['reward_accuracy']:.3f}, {on_file:.3f} on "
                     r"reward.eval_file$", out, re.M), out
    assert last["judge_win_rate"] is None and "by the judge" not in out  # no evaluate.judge
    assert info["running"] is None and "running" not in out
    with rounds.round_lock(ws).acquire():  # as a round that runs no stage now holds it
        assert main(["status", "--workspace", str(ws.root)]) == 0
    assert re.search(rf"^running +round {last['round'] + 1}: between stages$", capsys.readouterr().out, re.M)
    history = ws.history_file.read_text()
    ws.history_file.write_text(history + json.dumps({**json.loads(history.splitlines()[-1]), "judge_win_rate": 0.61}) + "\n")
    try:
        assert main(["status", "--workspace", str(ws.root)]) == 0
        assert re.search(r"^win-rate +0\.\d{3} against the champion \(reward model\)\n +0\.610 by the judge "
                         r"\(evaluate.judge\)$", capsys.readouterr().out, re.M)
    finally:
        ws.history_file.write_text(history)
    assert last["gold_after"] == line["gold_after"]


def test_unchanged_stage_is_skipped_by_dvc(finished_round):
    ws, _ = finished_round
    assert versioning.repro(ws, "pretrain") is False


def test_evaluation_report_plots_and_calibration(finished_round):
    ws, _ = finished_round
    page = (ws.reports / "evaluation.html").read_text()
    assert "Candidate against champion, round 1" in page and page.count("data:image/png;base64,") == 2
    mlflow.set_tracking_uri(ws.tracking_uri)
    run = mlflow.search_runs(experiment_names=["rlhf"], filter_string="tags.stage = 'evaluate'", output_format="list")[0]
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/reward_distribution.png", "plots/reward_vs_sqrt_kl.png"}
    metrics = json.loads((ws.reward_model / "metrics.json").read_text())
    buckets = metrics["held_out"]["calibration"]
    assert sum(b["n"] for b in buckets) == metrics["held_out"]["n"]
    assert buckets[-1]["accuracy"] >= buckets[0]["accuracy"]  # surer means more often right
    # the gated win-rate is the reward model's preference probability over the logged side-by-side
    # scores; the share of higher scores is reported beside it
    import math
    table = mlflow.load_table("samples_side_by_side.json", run_ids=[run.info.run_id])
    diffs = table["candidate_reward"] - table["champion_reward"]
    report = json.loads(ws.evaluation_report.read_text())
    assert report["win_rate/rate"] == pytest.approx(sum(1 / (1 + math.exp(-d)) for d in diffs) / len(diffs))
    assert report["win_rate/hard"] == pytest.approx(((diffs > 0).sum() + 0.5 * (diffs == 0).sum()) / len(diffs))
    assert report["win_rate/low"] < report["win_rate/rate"] < report["win_rate/high"]
    # the scenario's gate reads the interval over pairs (its 6 held-out professions are all its gold
    # metric measures); the one over prompts is reported beside it, from the same table
    from tasks.intervals import interval_over_prompts, wilson_interval
    probs = [1 / (1 + math.exp(-d)) for d in diffs]
    assert report["win_rate/prompts"] == 6 and report["win_rate/over_prompts"] == 0
    assert (report["win_rate/low"], report["win_rate/high"]) == pytest.approx(wilson_interval(sum(probs), len(probs)))
    assert (report["win_rate/low_prompts"], report["win_rate/high_prompts"]) == pytest.approx(
        interval_over_prompts(probs, list(table["prompt"])))


def test_the_evaluation_page_shows_texts_as_written():
    """A dialogue's lines and any markup in a response reach the reader as written: escaped, with
    their line breaks kept (pre-wrap), not run together or rendered."""
    from tasks.evaluate import html_report

    prompt = "\n\nHuman: is <b>this</b> bold?\n\nAssistant:"
    page = html_report({"round": 3}, [{"prompt": prompt, "champion": " <script>x</script>", "champion_reward": 0.5,
                                       "candidate": " no\n  indented", "candidate_reward": 1.0}], {})
    assert "<b>this</b>" not in page and "<script>x" not in page
    assert "<td>\n\nHuman: is &lt;b&gt;this&lt;/b&gt; bold?\n\nAssistant:</td>" in page
    assert "<td> no\n  indented</td>" in page and "td{white-space:pre-wrap" in page


def test_worse_candidate_is_evaluated_and_not_promoted(finished_round):
    import torch
    from safetensors.torch import load_file, save_file

    ws, _ = finished_round
    weights = load_file(ws.policy_model / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) if v.dim() > 1 else v
               for k, v in weights.items()}, ws.policy_model / "model.safetensors", metadata={"format": "pt"})
    versioning.repro(ws, "evaluate")
    versioning.repro(ws, "promote")
    decision = json.loads(ws.decision_report.read_text())
    assert decision["promoted"] is False
    failed = [g["name"] for g in decision["gates"] if not g["passed"]]
    assert failed and all(any(f"{name} FAILED" in r for r in decision["reasons"]) for name in failed)
    mlflow.set_tracking_uri(ws.tracking_uri)
    client = MlflowClient()
    worse = client.get_model_version("rlhf-policy", decision["policy_version"])
    assert worse.tags["promoted"] == "false" and f"{failed[0]} FAILED" in worse.tags["gates"]
    assert str(client.get_model_version_by_alias("rlhf-policy", "champion").version) == "2"


def test_champion_loads_with_pyfunc_and_generates(finished_round):
    ws, _ = finished_round
    mlflow.set_tracking_uri(ws.tracking_uri)
    policy = mlflow.pyfunc.load_model("models:/rlhf-policy@champion")
    out = policy.predict(["the ceo said", "the cashier said"])
    assert len(out) == 2 and out[0].startswith("the ceo said ") and len(out[0]) > len("the ceo said ")
    reward = mlflow.pyfunc.load_model("models:/rlhf-reward@champion")
    import pandas as pd

    scores = reward.predict(pd.DataFrame({"prompt": ["the ceo said"] * 2,
                                          "response": [" they were late .", " he was late ."]}))
    assert scores[0] > scores[1]  # the reward model learned the feedback, on a held-out profession


def test_each_logged_model_carries_its_own_params_and_metrics(finished_round):
    """MLflow 3 compares logged models (the experiment's Models tab) by their params and metrics.
    Both models of a round are logged in its promote run: the policy once read the reward model's
    params there (kind=reward) and the reward model the policy's gate metrics."""
    ws, _ = finished_round
    mlflow.set_tracking_uri(ws.tracking_uri)
    client = MlflowClient()
    report = json.loads(ws.evaluation_report.read_text())
    decision = json.loads(ws.decision_report.read_text())

    def logged(name, version):  # a registry version's source is models:/<the logged model's id>
        return client.get_logged_model(client.get_model_version(name, version).source.removeprefix("models:/"))

    policy, reward = logged("rlhf-policy", decision["policy_version"]), logged("rlhf-reward", decision["reward_version"])
    assert policy.params["kind"] == "policy" and reward.params["kind"] == "reward"
    assert policy.params["round"] == reward.params["round"] == "1" and policy.params["chat.template"] == "False"
    assert policy.params["reward_version"] == decision["reward_version"]
    policy_metrics = {m.key: m.value for m in policy.metrics}
    reward_metrics = {m.key: m.value for m in reward.metrics}
    assert policy_metrics["candidate/kl_to_reference"] == pytest.approx(report["candidate/kl_to_reference"])
    assert policy_metrics["win_rate/rate"] == pytest.approx(report["win_rate/rate"])
    assert {f"gate/{g['name']}" for g in decision["gates"]} <= set(policy_metrics)
    assert reward_metrics == pytest.approx({k: v for k, v in report.items() if k.startswith("reward_model/")})
    assert not any(k.startswith(("gate/", "candidate/", "champion/")) for k in reward_metrics)
    assert not any(k.startswith(("reward_model/", "champion/")) for k in policy_metrics)
    promote_run = client.get_run(policy.source_run_id)
    assert promote_run.data.tags["stage"] == "promote" and "kind" not in promote_run.data.params
    bootstrap = logged("rlhf-policy", "1")
    assert bootstrap.params["kind"] == "policy" and bootstrap.params["round"] == "0"
    # reward.eval_file: its accuracy, and which version of the file it was measured on (not a DVC dependency)
    eval_file = ws.root.parent / "eval.jsonl"
    reward_run = mlflow.search_runs(experiment_names=["rlhf"], filter_string="tags.stage = 'train_reward'",
                                    output_format="list")[0]
    assert reward_run.data.params["reward.eval_file"] == str(eval_file)
    assert reward_run.data.params["reward.eval_file_md5"] == hashlib.md5(eval_file.read_bytes()).hexdigest()
    assert reward_run.data.metrics["reward/eval_file_pairs"] == 3
    # and beside its held-out accuracy wherever reward model versions are compared: the registry's
    # logged model, the report, the gate's reason, `rlhf compare`
    assert reward_metrics["reward_model/eval_file_pairs"] == 3
    assert reward_metrics["reward_model/eval_file_accuracy"] == reward_run.data.metrics["reward/eval_file_accuracy"]
    assert any(r.startswith("reward_accuracy ") and r.endswith(
        f"; {report['reward_model/eval_file_accuracy']:.2f} on the 3 pairs of reward.eval_file)")
        for r in decision["reasons"]), decision["reasons"]  # (the value the report holds)
    from tasks import registry
    compared = registry.compare(ws, load_config(ws.params), "champion", "1")
    assert compared["champion"]["metrics"]["reward_model/eval_file_accuracy"] == report["reward_model/eval_file_accuracy"]


def test_served_models_take_params_and_refuse_bad_input(finished_round):
    """Both models are logged with a signature, so predict's params reach the model (without one
    MLflow drops them with a log line), and the REST server of `mlflow models serve` takes them."""
    import pandas as pd
    from fastapi.testclient import TestClient
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    ws, _ = finished_round
    mlflow.set_tracking_uri(ws.tracking_uri)
    policy = mlflow.pyfunc.load_model("models:/rlhf-policy@champion")
    assert [p.name for p in policy.metadata.get_params_schema().params] == ["max_new_tokens", "temperature", "seed"]
    prompt = "the ceo said"
    one = policy.predict([prompt], params={"max_new_tokens": 1, "temperature": 0})[0]
    greedy = policy.predict([prompt] * 3, params={"max_new_tokens": 40, "temperature": 0, "seed": 5})
    assert len(set(greedy)) == 1 and greedy[0].startswith(one) and len(prompt) < len(one) < len(greedy[0])
    assert len(one[len(prompt):].split()) == 1  # one token: a word of the scenario's word-level tokenizer
    sampled = policy.predict([prompt] * 8, params={"max_new_tokens": 40, "temperature": 1.5, "seed": 1})
    assert len(set(sampled)) > 1
    # a dict of lists reaches predict as one row of lists: still one reply per prompt
    assert policy.predict({"prompt": [prompt, prompt]}, params={"temperature": 0, "max_new_tokens": 40}) == greedy[:2]
    for bad, said in [({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
                      ({"temperature": -1}, "temperature must be a finite number >= 0"),
                      ({"max_new_tokens": "many"}, "max_new_tokens"),
                      ({"max_new_tokens": 62}, "a prompt of 3 tokens and max_new_tokens 62 exceed the model's 64 pos")]:
        with pytest.raises(MlflowException, match=said):
            policy.predict([prompt], params=bad)
    assert policy.predict([prompt], params={"max_new_tokens": 61})  # 3 + 61 = 64 positions: fits

    server = TestClient(scoring_server.init(policy))
    reply = server.post("/invocations", json={"inputs": [prompt], "params": {"max_new_tokens": 1, "temperature": 0}})
    assert reply.status_code == 200 and reply.json()["predictions"] == [one]
    reply = server.post("/invocations", json={"inputs": [prompt], "params": {"max_new_tokens": 0}})
    assert reply.status_code == 400 and "max_new_tokens must be at least 1, got 0" in reply.json()["message"]

    reward = mlflow.pyfunc.load_model("models:/rlhf-reward@champion")
    pair = {"prompt": [prompt] * 2, "response": [" they were late .", " he was late ."]}
    scores = reward.predict(pd.DataFrame(pair))
    assert reward.predict(pair) == scores  # a dict of lists, as a frame
    rows = [{"prompt": p, "response": r} for p, r in zip(pair["prompt"], pair["response"])]
    reply = TestClient(scoring_server.init(reward)).post("/invocations", json={"dataframe_records": rows})
    assert reply.status_code == 200 and reply.json()["predictions"] == pytest.approx(scores, abs=1e-6)
    for bad, said in [({"prompt": [prompt] * 2, "response": [" they were late ."]}, "2 prompts but 1 responses"),
                      (pd.DataFrame({"prompt": [prompt], "response": [None]}), "'response' in row 0 is None"),
                      ({"prompt": [prompt]}, "response")]:
        with pytest.raises(MlflowException, match=said):
            reward.predict(bad)


def test_compare_rollback_and_manual_promotion_are_logged(finished_round, capsys):
    from flows.cli import main

    ws, _ = finished_round
    root = str(ws.root)
    assert main(["compare", "champion", "latest", "--json", "--workspace", root]) == 0
    cmp_ = json.loads(capsys.readouterr().out)
    assert cmp_["champion"]["version"] == "2" and cmp_["latest"]["version"] == "3"
    assert cmp_["champion"]["metrics"]["candidate/neutral_rate"] > 0 and cmp_["champion"]["measured_in"] == "round 1"
    # the base policy no round registered: its figures as the champion round 1 measured it against
    assert main(["compare", "champion", "1", "--json", "--workspace", root]) == 0
    base = json.loads(capsys.readouterr().out)["1"]
    first = mlflow.search_runs(experiment_names=["rlhf"], filter_string="tags.stage = 'evaluate' and tags.round = '1'",
                               order_by=["attributes.start_time ASC"], output_format="list")[0]
    assert base["measured_in"] == "round 1, as the champion" and base["round"] is None
    assert base["metrics"]["candidate/neutral_rate"] == pytest.approx(first.data.metrics["champion/neutral_rate"])
    assert base["metrics"]["candidate/kl_to_reference"] == 0  # the base policy is the reference
    assert "win_rate/rate" not in base["metrics"]
    assert main(["compare", "champion", "1", "--workspace", root]) == 0
    assert re.search(r"^measured in +round 1 +round 1, as the champion$", capsys.readouterr().out, re.M)
    # --evaluate: both evaluated now, on the same prompts and seeds, by the champion reward model
    assert main(["compare", "2", "1", "--evaluate", "--json", "--workspace", root]) == 0
    now = json.loads(capsys.readouterr().out)
    assert now["2"]["measured_in"] == now["1"]["measured_in"] == "now, judged by rlhf-reward v1"
    assert now["2"]["metrics"]["candidate/neutral_rate"] > now["1"]["metrics"]["candidate/neutral_rate"] + 0.3
    assert now["1"]["metrics"]["candidate/kl_to_reference"] == 0  # the base policy is the reference
    assert now["win_rate"]["low"] > 0.5 and set(now) == {"2", "1", "win_rate"}
    run = mlflow.search_runs(experiment_names=["rlhf"], filter_string="tags.stage = 'compare'", output_format="list")[0]
    assert run.data.params["a"] == "2" and run.data.params["b"] == "1" and len(run.data.params["prompts.heldout_sha256"]) == 16
    assert run.data.metrics["win_rate/rate"] == pytest.approx(now["win_rate"]["rate"])
    assert main(["compare", "1", "2", "--evaluate", "--workspace", root]) == 0
    assert re.search(r"^win-rate of v1 over v2: 0\.[0-4]\d\d \(95% interval 0\.\d+-0\.\d+; the reward model's "
                     r"preference probability, higher score in 0\.\d+ of the pairs\)$", capsys.readouterr().out, re.M)
    # evaluate.judge: here the registry's reward v1, the very model that judged above, read through
    # the judge's own path (its saved tokenizer, right padding): the same win-rate, always agreeing
    params = ws.params.read_text()
    ws.params.write_text(re.sub(r"^  judge:.*$", "  judge: models:/rlhf-reward/1", params, count=1, flags=re.M))
    try:
        assert main(["compare", "2", "1", "--evaluate", "--json", "--workspace", root]) == 0
        judged = json.loads(capsys.readouterr().out)
        assert judged["judge"]["model"] == "models:/rlhf-reward/1" and judged["judge"]["agreement"] == 1.0
        assert judged["judge"]["win_rate"]["rate"] == pytest.approx(now["win_rate"]["rate"], abs=1e-5)
        assert judged["2"]["metrics"]["candidate/judge_score"] == pytest.approx(
            judged["2"]["metrics"]["candidate/reward_mean"], abs=1e-5)
        assert main(["compare", "2", "1", "--evaluate", "--workspace", root]) == 0
        assert re.search(r"^by the judge models:/rlhf-reward/1: 0\.[5-9]\d\d \(95% interval 0\.\d+-0\.\d+\); it sides with "
                         r"the reward model on 100% of the pairs$", capsys.readouterr().out, re.M)
    finally:
        ws.params.write_text(params)
    assert main(["compare", "2", "9", "--evaluate", "--workspace", root]) == 2
    assert "has no version or alias '9'" in capsys.readouterr().err
    assert main(["compare", "champion", "2", "--evaluate", "--workspace", root]) == 2
    assert "'champion' and '2' are both rlhf-policy v2: name two different versions" in capsys.readouterr().err
    assert main(["rollback", "--reason", "bad outputs reported", "--workspace", root]) == 0
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("rlhf-policy", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("rlhf-policy", "previous").version) == "2"
    assert client.get_model_version("rlhf-policy", "2").tags["rolled_back"] == "bad outputs reported"
    assert main(["promote", "3", "--reason", "try it", "--workspace", root]) == 2
    assert "failed its gates" in capsys.readouterr().err
    assert main(["promote", "2", "--reason", "issue fixed upstream", "--workspace", root]) == 0
    assert str(client.get_model_version_by_alias("rlhf-policy", "champion").version) == "2"
    assert client.get_model_version("rlhf-policy", "2").tags["manual_promotion"] == "issue fixed upstream"
    runs = mlflow.search_runs(experiment_names=["rlhf"], filter_string="tags.stage = 'manual-promote'",
                              output_format="list")
    assert runs[0].data.params["reason"] == "issue fixed upstream"


def _champions(client):
    """(policy champion, policy previous, reward champion, reward previous)"""
    from tasks import tracking
    return tuple(tracking.alias_version(client, name, alias)
                 for name in ("rlhf-policy", "rlhf-reward") for alias in ("champion", "previous"))


def test_the_reward_champion_follows_the_policy_by_hand_and_a_round_never_overrides_a_hand(finished_round,
                                                                                               capsys):
    """The champion reward model is the one that trained the champion policy: a round moves both,
    and so do `rlhf promote` and `rlhf rollback`. A round whose champion was changed by hand while
    it ran does not promote: its gates compared the candidate with the champion it began from.
    Runs after the compare test (the champion is v2 again) and the worse candidate's (v3, reward v2)."""
    from flows.cli import main
    from tasks import tracking

    ws, _ = finished_round
    root = str(ws.root)
    client = MlflowClient()
    assert _champions(client) == ("2", "1", "1", None)
    assert client.get_model_version("rlhf-policy", "3").tags["reward_version"] == "2"
    # a manual promotion of v3 (its gates failed): reward v2 trained it, and becomes champion with it
    assert main(["promote", "3", "--reason", "judged better by hand", "--force", "--workspace", root]) == 0
    out = capsys.readouterr().out
    assert "rlhf-reward: champion v1 -> v2 (it trained this policy)" in out, out
    assert _champions(client) == ("3", "2", "2", "1")
    run = mlflow.search_runs(experiment_names=["rlhf"], filter_string="tags.stage = 'manual-promote'",
                             output_format="list")[0]
    assert run.data.params["reward.from"] == "1" and run.data.params["reward.to"] == "2"
    # rollback: v2 and the reward model that trained it (it swapped the policy only, or both blindly)
    assert main(["rollback", "--reason", "v3 rambles", "--json", "--workspace", root]) == 0
    assert json.loads(capsys.readouterr().out) == {"rlhf-policy": {"from": "3", "to": "2"},
                                                   "rlhf-reward": {"from": "2", "to": "1", "note": None}}
    assert _champions(client) == ("2", "3", "1", "2")
    assert client.get_model_version("rlhf-policy", "3").tags["rolled_back"] == "v3 rambles"
    # run again, it swaps them back, and says it would
    assert main(["rollback", "--reason", "v3 after all", "--workspace", root]) == 0
    out = capsys.readouterr().out
    assert "rlhf-policy: champion v2 -> v3 (previous: v2; `rlhf rollback` again swaps them back)" in out, out
    assert _champions(client) == ("3", "2", "2", "1")
    # a round that began from v1 (state.yaml: round 1) ends with v3 champion: its candidate beat v1
    # on every gate, but was never compared with v3
    assert yaml.safe_load(ws.state_file.read_text())["champion_policy_version"] == "1"
    passing = versioning.git(ws, "show", "HEAD:reports/evaluation.json").stdout  # round 1's, every gate passed
    ws.evaluation_report.write_text(passing)
    versioning.dvc(ws, "repro", "--force", "--single-item", "promote")
    decision = json.loads(ws.decision_report.read_text())
    assert decision["promoted"] is False and all(g["passed"] for g in decision["gates"]), decision["reasons"]
    assert ("the champion is v3, not v1, which this round began from and compared the candidate with: not promoted "
            "(`rlhf compare champion challenger --evaluate` compares it with v3)") in decision["reasons"]
    assert decision["champion_policy_after"] == "3" and _champions(client) == ("3", "2", "2", "1")
    candidate = client.get_model_version("rlhf-policy", decision["policy_version"])
    assert candidate.tags["promoted"] == "false" and "the champion is v3, not v1" in candidate.tags["gates"]
    assert tracking.alias_version(client, "rlhf-policy", tracking.CHALLENGER) == str(candidate.version)
    # back to v2 for the tests after this one; rolling back to the base policy, which no reward
    # model trained, leaves the reward champion where it is
    assert main(["rollback", "--workspace", root]) == 0
    assert _champions(client) == ("2", "3", "1", "2")
    assert main(["rollback", "--workspace", root]) == 0 and main(["rollback", "--workspace", root]) == 0
    capsys.readouterr()
    assert main(["promote", "1", "--reason", "the base", "--json", "--workspace", root]) == 0
    assert json.loads(capsys.readouterr().out)["reward"] == {
        "from": "1", "to": "1", "note": "no reward model trained rlhf-policy v1 (the base policy, or a version "
                                        "registered by hand): rlhf-reward champion stays v1"}
    assert _champions(client)[0] == "1"
    assert main(["promote", "2", "--reason", "back to v2", "--workspace", root]) == 0
    assert _champions(client)[:3] == ("2", "1", "1")
    capsys.readouterr()
    assert main(["promote", "2", "--reason", "again", "--workspace", root]) == 0
    assert "rlhf-policy: v2 is champion already (previous: v1)\nrlhf-reward: champion stays v1" in capsys.readouterr().out
    assert _champions(client)[:3] == ("2", "1", "1")
    # `rlhf compare` with no versions: the champion against the latest, or, when the latest is the
    # champion (a promoting round's usual end), against the one it replaced (it refused, "both v4")
    latest = str(candidate.version)
    assert main(["compare", "--json", "--workspace", root]) == 0
    assert {k: v["version"] for k, v in json.loads(capsys.readouterr().out).items()} == {"champion": "2",
                                                                                         "latest": latest}
    assert main(["promote", latest, "--reason", "r", "--force", "--workspace", root]) == 0
    capsys.readouterr()
    assert main(["compare", "--json", "--workspace", root]) == 0
    assert {k: v["version"] for k, v in json.loads(capsys.readouterr().out).items()} == {"champion": latest,
                                                                                         "previous": "2"}
    assert main(["compare", "3", "--json", "--workspace", root]) == 0  # one version: against the latest
    assert set(json.loads(capsys.readouterr().out)) == {"3", "latest"}
    assert main(["promote", "2", "--reason", "back to v2", "--workspace", root]) == 0
    assert _champions(client)[:3] == ("2", latest, "1")


def test_a_config_naming_another_base_model_is_refused_before_anything_changes(finished_round, tiny_model_dir,
                                                                              capsys, tmp_path):
    """A workspace trains one base model's policies: every version records its base, and a round
    whose config names another (your model after the demo's, another seed of the scenario's) stops
    before params.yaml, the base model or git change, from the CLI and from a flow run alike."""
    from flows.cli import main
    from flows.pipeline import rlhf_round
    from tasks.promote import BaseChanged, base_identity

    ws, _ = finished_round
    root, cfg = str(ws.root), load_config(ws.params)
    mlflow.set_tracking_uri(ws.tracking_uri)
    client = MlflowClient()
    for name, version in ((cfg.policy_name, "1"), (cfg.policy_name, "2"), (cfg.reward_name, "1")):
        assert json.loads(client.get_model_version(name, version).tags["base_model"]) == base_identity(cfg)
    champion = str(client.get_model_version_by_alias(cfg.policy_name, "champion").version)
    params, head = ws.params.read_text(), git(ws, "rev-parse", "HEAD")
    base_files = {p.name: p.stat().st_mtime_ns for p in ws.base_model.iterdir()}
    assert main(["run", "--policy-model", str(tiny_model_dir), "--workspace", root]) == 2
    err = capsys.readouterr().err
    assert f"the champion rlhf-policy v{champion} was trained from another base model" in err
    assert f"models.policy: None -> '{tiny_model_dir}'" in err and "--workspace DIR" in err
    changed = tmp_path / "params.yaml"
    changed.write_text(params.replace("seed: 0", "seed: 7", 1))
    assert main(["run", "--config", str(changed), "--workspace", root]) == 2
    assert "seed: 0 -> 7" in capsys.readouterr().err
    with pytest.raises(BaseChanged, match="models.policy: None -> 'gpt2'"):  # a run triggered from the UI
        rlhf_round(workspace=root, config=load_config(ws.params, {"models.policy": "gpt2"}))
    # a champion registered before versions carried the tag: its base is what dvc.lock says pretrain ran with
    client.delete_model_version_tag(cfg.policy_name, champion, "base_model")
    try:
        assert main(["run", "--policy-model", str(tiny_model_dir), "--workspace", root]) == 2
        assert f"models.policy: None -> '{tiny_model_dir}'" in capsys.readouterr().err
    finally:
        client.set_model_version_tag(cfg.policy_name, champion, "base_model", json.dumps(base_identity(cfg)))
    assert ws.params.read_text() == params and git(ws, "rev-parse", "HEAD") == head
    assert {p.name: p.stat().st_mtime_ns for p in ws.base_model.iterdir()} == base_files
    # nor are versions of another base evaluated against this one
    client.set_model_version_tag(cfg.policy_name, "1", "base_model", json.dumps({"models.policy": "gpt2"}))
    try:
        assert main(["compare", "2", "1", "--evaluate", "--workspace", root]) == 2
        assert "rlhf-policy v1 was trained from another base model than this workspace's (models.policy: 'gpt2' -> " \
               "None)" in capsys.readouterr().err
        assert main(["compare", "2", "1", "--workspace", root]) == 0  # each version's own round figures still show
        assert main(["promote", "1", "--reason", "try", "--workspace", root]) == 2
        assert "rlhf-policy v1 was trained from another base model" in capsys.readouterr().err
    finally:
        client.set_model_version_tag(cfg.policy_name, "1", "base_model", json.dumps(base_identity(cfg)))


def test_rlhf_run_while_a_round_holds_the_workspace_says_so(finished_round, capsys):
    from flows.cli import main

    ws, _ = finished_round
    head = git(ws, "rev-parse", "HEAD")
    with rounds.round_lock(ws):  # as a round started any other way would
        assert main(["run", "--workspace", str(ws.root)]) == 1
    assert f"error: another round is running in {ws.root}; at most one round runs at a time" in capsys.readouterr().err
    assert git(ws, "rev-parse", "HEAD") == head


def test_served_champion_answers_on_loopback(finished_round):
    import os
    import sys
    import time
    import urllib.request

    from flows.serve import free_port

    ws, _ = finished_round
    port = free_port()
    # as from an activated venv: mlflow starts `uvicorn` by name
    env = {**os.environ, "MLFLOW_TRACKING_URI": ws.tracking_uri,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/rlhf-policy@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": ["the ceo said"]}).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        assert answer["predictions"][0].startswith("the ceo said ")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_blocked_validation_stops_before_training_and_registers_nothing(finished_round, capsys):
    from flows.pipeline import rlhf_round

    ws, _ = finished_round
    cfg = load_config(ws.params)
    mlflow.set_tracking_uri(ws.tracking_uri)
    client = MlflowClient()
    versions_before = {n: len(client.search_model_versions(f"name='{n}'")) for n in (cfg.policy_name, cfg.reward_name)}
    reward_before = versioning.file_md5(ws.reward_model / "model.safetensors")
    strict = cfg.model_copy(update={"validate_": cfg.validate_.model_copy(update={"min_rows": 100_000})})
    state = rlhf_round(workspace=str(ws.root), config=strict, return_state=True)
    assert state.is_failed() and "validation blocked training" in state.message  # the reason, in the UI
    assert "min_rows" in state.message
    with pytest.raises(versioning.VersioningError, match="validation blocked training"):
        state.result()
    versions_after = {n: len(client.search_model_versions(f"name='{n}'")) for n in versions_before}
    assert versions_after == versions_before
    assert versioning.file_md5(ws.reward_model / "model.safetensors") == reward_before  # no training ran
    assert str(client.get_model_version_by_alias(cfg.policy_name, "champion").version) == "2"
    summary = json.loads(ws.validation_report.read_text())
    assert not summary["passed"] and "min_rows" in summary["blocking_failures"][0]
    # the round's feedback was still versioned: nothing is lost
    assert len(versioning.raw_files(ws)) == 2
    assert len(rounds.completed_rounds(ws)) == 1
    # `rlhf status` says why the last round stopped, until a round completes
    failed = rounds.last_failure(ws)
    assert (failed["round"], failed["stage"], failed["error"]) == (2, "validate", "VersioningError")
    assert failed["reason"].startswith("validation blocked training: only ") and "validate.min_rows=100000" in failed["reason"]
    from flows.cli import main

    assert main(["status", "--workspace", str(ws.root)]) == 0
    assert re.search(r"^last failure +round 2, stage validate, 20\d\d-\d\d-\d\dT[0-9:]+\+00:00: validation blocked "
                     r"training: only \d+ usable pairs", capsys.readouterr().out, re.M)
    history = ws.history_file.read_text()
    ws.history_file.write_text(history + json.dumps({**json.loads(history.splitlines()[-1]), "round": 2}) + "\n")
    try:
        assert rounds.last_failure(ws) is None and rounds.status(ws, cfg)["last_failure"] is None
    finally:
        ws.history_file.write_text(history)


def test_the_label_form_shows_every_text_verbatim():
    """Dialogue prompts (blank lines), backticks, Markdown and leading spaces in a pair reach the
    person as written: each text is a fenced block whose fence no run of backticks in it can close."""
    from markdown_it import MarkdownIt

    from flows.labelling import batch_markdown

    pair = {"prompt": "\n\nHuman: what does `x` do in ```python\nx = 1```?\n\nAssistant:",
            "A": " **bold** claim\n\n# not a heading", "B": " ````` five backticks"}
    tokens = MarkdownIt().parse(batch_markdown([pair, {"prompt": "the nurse said", "A": " they", "B": " she"}], 7))
    blocks = [t.content for t in tokens if t.type == "fence"]
    assert blocks == [pair["prompt"] + "\n", pair["A"] + "\n", pair["B"] + "\n",
                      "the nurse said\n", " they\n", " she\n"]
    assert [t.content for t in tokens if t.type == "inline" and t.content.startswith("Pair")] == ["Pair 7", "Pair 8"]


def test_a_prompt_answered_the_same_way_twice_gives_way_to_an_unused_one():
    """The label session shows as many pairs as asked when the policy answers some prompts the same
    way every time: each such prompt gives way to the pool's next unused one; once the pool is used
    up, it is sampled again with other seeds, three samplings at most, then left out."""
    from flows.labelling import TRIES, draw_pairs

    calls = []

    def policy(prompts, seed):  # sure of its answer to "stuck" prompts; to "once" only with the first seed
        calls.append((list(prompts), seed))
        same = lambda p: p.startswith("stuck") or (p.startswith("once") and seed == 10)  # noqa: E731
        return [(p, f"{p}/{seed}", f"{p}/{seed if same(p) else seed + 1}") for p in prompts]

    shown, left = draw_pairs(["stuck 1", "a", "stuck 2", "b", "c", "d"], 3, policy, seed=10)
    assert [s["prompt"] for s in shown] == ["a", "b", "c"] and left == []
    assert calls == [(["stuck 1", "a", "stuck 2"], 10), (["b", "c"], 12)]
    assert shown[0] == {"prompt": "a", "A": "a/10", "B": "a/11"}

    calls.clear()  # a short pool: "stuck 1" gives way to "e", "once" is shown when sampled again, "stuck 2" left out
    shown, left = draw_pairs(["stuck 1", "once", "stuck 2", "e"], 3, policy, seed=10)
    assert [s["prompt"] for s in shown] == ["e", "once"] and left == ["stuck 2"]
    assert calls == [(["stuck 1", "once", "stuck 2"], 10), (["e", "once", "stuck 2"], 12), (["stuck 2"], 14)]
    assert len(calls) == TRIES == 3


def test_label_flow_pauses_resumes_with_answers_and_keeps_them_on_timeout(finished_round):
    """A person's labels through the Prefect form: batch 1 answered from another thread, batch 2
    left unanswered until its timeout; the answers given land in DVC."""
    import threading
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    from flows.labelling import label

    ws, _ = finished_round
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        label(workspace=str(ws.root), pairs=4, batch_size=2, timeout_seconds=15, annotator="alice")))
    worker.start()
    paused_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    with get_client(sync_client=True) as client:
        deadline, runs = time.time() + 120, []
        while time.time() < deadline and not runs:
            runs = client.read_flow_runs(flow_run_filter=paused_filter)
            time.sleep(0.5)
        assert runs, "the label flow never paused for input"
        resume_flow_run(runs[0].id, run_input={"pair_1": "A", "comment_1": "clearer", "pair_2": "tie"})
    worker.join(timeout=180)
    assert not worker.is_alive()
    assert result["labelled"] == 2 and result["pairs"] == 1  # batch 2 timed out; batch 1 kept
    with get_client(sync_client=True) as client:  # a session ended by its timeout is not a failure
        assert client.read_flow_run(runs[0].id).state.type == StateType.COMPLETED
    recs = [json.loads(x) for x in open(result["raw_file"], encoding="utf-8")]
    assert [r["label"] for r in recs] == ["pair", "tie"]
    assert len({r["prompt"] for r in recs}) == 2 and {r["prompt"] for r in recs} <= set(scenario.feedback_prompts())
    assert recs[0]["source"] == "prefect-ui" and recs[0]["annotator"] == "alice" and recs[0]["comment"] == "clearer"
    assert recs[0]["shown_as_a"] == "chosen" and recs[0]["policy_version"] == "2"
    assert "prefect-ui, 2 records" in git(ws, "log", "-1", "--format=%s", "--", result["raw_file"] + ".dvc")
    # a second session shows other pairs (with the first one's seed they would be the same ones again,
    # and validation sets repeats of a labelled pair aside: the person's second session wasted)
    again = label(workspace=str(ws.root), pairs=4, batch_size=2, timeout_seconds=1)
    assert again["labelled"] == 0 and again["seed"] != result["seed"]
    # each pair shown, or said not to be: this converged champion may answer prompts the same way every time
    assert again["shown"] + again["not_shown"] == 4 and again["shown"] >= 2


def test_the_label_flow_shows_no_pair_of_two_equal_responses(finished_round, tmp_path):
    """Near-greedy sampling gives every prompt the same response twice: nothing to judge, so no
    such pair reaches a person (other prompts are tried, then each left sampled again, three samplings
    in all, then left out, with a warning)."""
    import shutil

    from flows.labelling import label

    ws, _ = finished_round
    greedy = init_workspace(tmp_path / "ws")
    shutil.copytree(ws.base_model, greedy.base_model)
    rounds.write_params(greedy, load_config(None, {**FAST, "collect.temperature": 1e-4}))
    summary = label(workspace=str(greedy.root), pairs=3, timeout_seconds=1, annotator="x")
    assert summary["shown"] == 0 and summary["labelled"] == 0 and summary["raw_file"] is None


def test_the_inbox_leaves_a_file_being_written_and_never_replaces_one_moved_before(prefect, tmp_path):
    """A file still being copied into the inbox is left for the next round (imported now, the rest
    of it would never be read); a file dropped again under a name already in done/ or failed/ is
    moved beside it, not over it."""
    import os
    import time

    from flows.refinement import import_inbox
    from tasks.records import PreferenceRecord

    def pairs(n, tag):
        return "".join(PreferenceRecord(prompt=f"the pilot said {i}", chosen=f" they were {tag} {i} .",
                                        rejected=f" he was {tag} {i} .", source="inbox", annotator="ann",
                                        round=0, created_at="2026-11-20T09:00:00+00:00").to_json() + "\n"
                       for i in range(n))

    def drop(name, text, age_s):
        (inbox / name).write_text(text)
        os.utime(inbox / name, (time.time() - age_s,) * 2)

    ws = init_workspace(tmp_path / "ws")
    inbox = ws.root / "inbox"
    inbox.mkdir()
    drop("reviews.jsonl", pairs(3, "late"), 60)
    drop("broken.jsonl", "not json at all\n", 60)
    drop("copying.jsonl", pairs(2, "early")[:-20], 0)  # half written, as a copy under way leaves it
    drop("from-the-future.jsonl", pairs(1, "odd"), -3600)  # stamped by a clock an hour ahead: not a copy now
    first = import_inbox(str(ws.root), "inbox")
    assert [(f["file"], f["kept"]) for f in first["imported"]] == [("from-the-future.jsonl", 1), ("reviews.jsonl", 3)]
    assert [f["file"] for f in first["failed"]] == ["broken.jsonl"] and first["waiting"] == ["copying.jsonl"]
    assert (inbox / "copying.jsonl").exists() and len(versioning.raw_files(ws)) == 2

    drop("copying.jsonl", pairs(2, "early"), 60)  # the copy finished
    drop("reviews.jsonl", pairs(4, "tired"), 60)  # the same name again, other labels
    drop("broken.jsonl", "still not json\n", 60)
    second = import_inbox(str(ws.root), "inbox")
    assert sorted((f["file"], f["moved_to"], f["kept"]) for f in second["imported"]) == [
        ("copying.jsonl", "done/copying.jsonl", 2), ("reviews.jsonl", "done/reviews-2.jsonl", 4)]
    assert second["failed"][0]["moved_to"] == "failed/broken-2.jsonl" and second["waiting"] == []
    assert (inbox / "done" / "reviews.jsonl").read_text() == pairs(3, "late")  # the first drop, kept
    assert (inbox / "done" / "reviews-2.jsonl").read_text() == pairs(4, "tired")
    assert (inbox / "failed" / "broken.jsonl").read_text() == "not json at all\n"
    assert "no line of it is a JSON object" in (inbox / "failed" / "broken-2.jsonl.reason.txt").read_text()
    assert len(versioning.raw_files(ws)) == 4 and not [p for p in inbox.iterdir() if p.is_file()]


def test_the_inbox_reads_a_labelling_sheets_export_through_refinement_inbox_map(prefect, tmp_path):
    """A nightly export of two responses and which won: failed without the map, saying which columns
    are missing; with `refinement.inbox_map` its pairs are imported the right way round. An HH-RLHF
    file dropped beside it is read by its own fields, the map not applied to it, and said."""
    import os
    import time

    from flows.refinement import import_inbox

    ws = init_workspace(tmp_path / "ws")
    inbox = ws.root / "inbox"
    inbox.mkdir()
    sheet = "question,left,right,better\n" + "".join(
        f"the pilot said {i}, they were late {i} ., he was late {i} .,{'AB'[i % 2]}\n" for i in range(3))
    sheet += "the pilot said 3,they were late 3 .,he was late 3 .,B\n"  # no space: a plain model reads it run together
    for attempt in range(2):
        (inbox / "nightly.csv").write_text(sheet)
        os.utime(inbox / "nightly.csv", (time.time() - 60,) * 2)
        if attempt:
            (inbox / "hh.jsonl").write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello",
                                                        "rejected": "\n\nHuman: hi\n\nAssistant: go"}) + "\n")
            os.utime(inbox / "hh.jsonl", (time.time() - 60,) * 2)
        result = import_inbox(str(ws.root), "inbox", mapping="prompt=question,a=left,b=right,choice=better"
                              if attempt else None)
        if not attempt:
            assert result["failed"][0]["file"] == "nightly.csv" and not result["imported"]
            assert "columns prompt, chosen, rejected not found" in (inbox / "failed" / "nightly.csv.reason.txt").read_text()
    assert [(f["file"], f["kept"], f["set_aside"], f["run_together"]) for f in result["imported"]] == [
        ("hh.jsonl", 1, 0, 0), ("nightly.csv", 4, 0, 1)]
    assert result["imported"][0]["map_not_applied"] == (
        "hh-rlhf names its own fields: the map (prompt=question,a=left,b=right,choice=better) is not applied to it")
    assert result["imported"][1]["map_not_applied"] is None
    raw = next(f for f in versioning.raw_files(ws) if "import-csv" in f.name)
    assert [json.loads(line)["chosen"] for line in raw.read_text().splitlines()] == [
        " they were late 0 .", " he was late 1 .", " they were late 2 .", "he was late 3 ."]


def test_gc_deletes_only_weights_nothing_points_at(finished_round, capsys):
    """`rlhf gc`: versions with an alias and the newest --keep keep their weights; the others lose
    them (their metrics and tags stay, and loading one names the prune); DVC drops unused cache;
    feedback is never dropped. Runs last in this module: it deletes."""
    from flows.cli import main
    from tasks import tracking
    from tasks.errors import ModelLoadError

    ws, _ = finished_round
    root = str(ws.root)
    cfg = load_config(ws.params)
    client = tracking.setup(ws, cfg.project)
    with mlflow.start_run(run_name="extra-versions"):  # two more policy versions, newer than any alias
        extra = [tracking.log_model(ws.policy_model, "policy", cfg.policy_name).version for _ in range(2)]
    versions = {str(v.version): client.get_model_version(cfg.policy_name, v.version)
                for v in client.search_model_versions(f"name='{cfg.policy_name}'")}
    unaliased = sorted((n for n, v in versions.items() if not v.aliases and n != extra[-1]), key=int)
    assert extra[0] in unaliased  # neither aliased nor the newest: pruned with --keep 1
    location = {n: client.get_model_version_download_uri(cfg.policy_name, n) for n in versions}
    folder = {n: Path(location[n].removeprefix("file://")) for n in versions}
    assert all(folder[n].is_dir() for n in versions)
    cache_before = sum(1 for f in (ws.root / ".dvc" / "cache").rglob("*") if f.is_file())

    assert main(["gc", "--keep", "1", "--dry-run", "--json", "--workspace", root]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sorted((p["version"] for p in plan["models"][cfg.policy_name]["pruned"]), key=int) == unaliased
    assert all(folder[n].is_dir() for n in versions)  # a dry run deletes nothing
    assert sum(1 for f in (ws.root / ".dvc" / "cache").rglob("*") if f.is_file()) == cache_before

    assert main(["gc", "--keep", "1", "--json", "--workspace", root]) == 0
    done = json.loads(capsys.readouterr().out)
    assert sorted((p["version"] for p in done["models"][cfg.policy_name]["pruned"]), key=int) == unaliased
    assert done["models"][cfg.policy_name]["pruned"][0]["bytes"] > 100_000
    assert done["bytes"]["models"] == plan["bytes"]["models"] > 0
    for n in versions:
        assert folder[n].exists() == (n not in unaliased), n
        assert (tracking.PRUNED in client.get_model_version(cfg.policy_name, n).tags) == (n in unaliased)
    assert Path(tracking.resolve_model(ws, f"models:/{cfg.policy_name}@champion"), "model.safetensors").exists()
    with pytest.raises(ModelLoadError, match=f"v{extra[0]}, pruned"):
        tracking.resolve_model(ws, f"models:/{cfg.policy_name}/{extra[0]}")
    assert main(["promote", extra[0], "--reason", "r", "--force", "--workspace", root]) == 2
    assert "was pruned" in capsys.readouterr().err
    assert main(["compare", "champion", unaliased[0], "--json", "--workspace", root]) == 0  # metrics remain
    capsys.readouterr()
    runs = mlflow.search_runs(experiment_names=[cfg.project], filter_string="tags.stage = 'gc'", output_format="list")
    assert runs and runs[0].data.metrics["bytes_freed"] == done["bytes"]["models"]
    # DVC: unused cache gone, the workspace's data intact, feedback untouched
    assert sum(1 for f in (ws.root / ".dvc" / "cache").rglob("*") if f.is_file()) < cache_before
    assert (ws.policy_model / "model.safetensors").exists() and (ws.reward_model / "model.safetensors").exists()
    assert all(len(f.read_bytes()) > 0 for f in versioning.raw_files(ws))
    # a second gc finds nothing new to prune
    assert main(["gc", "--keep", "1", "--json", "--workspace", root]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["models"][cfg.policy_name]["pruned"] == [] and \
        sorted(again["models"][cfg.policy_name]["already_pruned"], key=int) == unaliased
    # pruning the remote refuses while a feedback file of history is missing from the workspace
    pointer = next(p for p in (ws.root / "data" / "feedback" / "raw").glob("*.dvc"))
    versioning.git(ws, "rm", "-q", str(pointer.relative_to(ws.root)))
    versioning.git(ws, "commit", "-q", "-m", "drop a feedback file")
    assert main(["gc", "--remote", "--workspace", root]) == 1
    assert "pruning the remote would delete their only copy" in capsys.readouterr().err
    versioning.git(ws, "revert", "--no-edit", "HEAD")
    assert main(["gc", "--remote", "--json", "--workspace", root]) == 0
    assert json.loads(capsys.readouterr().out)["dvc"]["cloud"] is True
    versioning.dvc(ws, "pull", "-q", str(pointer.relative_to(ws.root)))  # its data is still on the remote


def test_rlhf_run_prunes_after_each_round_with_keep_versions(finished_round, tmp_path, capsys):
    """`rlhf run` with refinement.keep_versions prunes after its round as a scheduled run does,
    and says so under the round's line. Runs after the gc test: a round after pruning."""

    from flows.cli import main
    from tasks import tracking

    ws, _ = finished_round
    cfg = load_config(None, {**SMALL, "refinement.keep_versions": 1,  # (the blocked-validation test's params linger)
                             "reward.eval_file": str(ws.root.parent / "eval.jsonl")})
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump(cfg.to_params()))
    with mlflow.start_run(run_name="extra-version"):  # one more policy version, soon neither aliased nor newest
        extra = tracking.log_model(ws.policy_model, "policy", cfg.policy_name).version
    # with the DVC remote unreachable: the round goes on (its data committed and in the local cache),
    # said in a warning; it failed at its feedback's push before, after three tries
    versioning.dvc(ws, "remote", "modify", "local", "url", str(tmp_path / "unreachable" / "store"))
    (tmp_path / "unreachable").write_text("a file where the remote's parent folder should be")
    code = main(["run", "--workspace", str(ws.root), "--config", str(config)])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert re.search(r"^round \d+: .*\n  gc: freed [\d.]+ MiB", out, re.M), out
    assert re.search(r"^round \d+: .*, reward accuracy [\d.]+ \([\d.]+ on reward.eval_file\), win-rate", out, re.M), out
    assert re.search(r"^  warning: not pushed to the DVC remote \(ERROR: .*\); it is committed", err, re.M), err
    versioning.dvc(ws, "remote", "modify", "local", "url", str(ws.root / ".dvcstore"))
    assert versioning.push(ws) is None
    assert "in sync" in versioning.dvc(ws, "status", "--cloud").stdout
    client = MlflowClient()
    for name in (cfg.policy_name, cfg.reward_name):
        versions = [client.get_model_version(name, v.version)  # (search leaves out the aliases)
                    for v in client.search_model_versions(f"name='{name}'")]
        newest = max(int(v.version) for v in versions)
        for v in versions:
            kept = bool(v.aliases) or int(v.version) == newest
            assert (tracking.PRUNED in v.tags) != kept, (name, v.version)
    assert tracking.PRUNED in client.get_model_version(cfg.policy_name, extra).tags
    assert load_config(ws.params).refinement.keep_versions == 1  # the run's config, kept for the next rounds
