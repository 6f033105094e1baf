"""Stages without Prefect: `dvc repro` runs the whole pipeline, here on a user's own model folder (a Qwen3)."""
import html
import json
import math
import random
import re

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from tasks import rounds, scenario, versioning
from tasks.config import load_config
from tasks.evaluate import held_out_feedback
from tasks.errors import ModelLoadError
from tasks.modeling import load_policy
from tasks.prompts import sample_prompts
from tasks.ppo import lora
from tasks.train_policy import build_policy
from tasks.workspace import Workspace, init_workspace

from conftest import FAST, another_tokenizer, command_line, still_running
from test_judge import bert_judge

pytestmark = pytest.mark.slow


def test_dvc_repro_runs_every_stage_on_a_users_model(tiny_qwen3_dir, tmp_path):
    """Without Prefect: `dvc repro` runs every stage on a user's model folder, and not a GPT-2: a
    Qwen3 (rotary positions, grouped-query attention, norms on each query and key head). Its reward
    model is a Qwen3 classifier started from it, PPO samples with the static decoder, and both
    registered models load and answer through MLflow. Then LoRA on two processes (FSDP), your own
    prompts and a judge of another tokenizer, and prompts from the validated feedback."""
    import pandas as pd
    from transformers import AutoConfig

    ws = init_workspace(tmp_path / "ws")
    rounds.write_params(ws, load_config(None, {**FAST, "models.policy": str(tiny_qwen3_dir)}))
    out = versioning.dvc(ws, "repro")
    for stage in ("pretrain", "collect", "validate", "train_reward", "train_policy", "evaluate", "promote"):
        assert f"Running stage '{stage}'" in out.stdout
    collected = [line for line in versioning.stage_lines(out.stdout) if line.startswith("sampled ")]
    pairs = sum(1 for _ in open(ws.collected))
    assert re.fullmatch(rf"sampled {pairs} pairs of responses in [0-9.]+s; the simulated annotator preferred one "
                        r"in \d+, called \d+ ties", collected[0])
    # pre-training was skipped: the base model is the user's model, loaded and saved as is
    mine, base = load_file(tiny_qwen3_dir / "model.safetensors"), load_file(ws.base_model / "model.safetensors")
    assert mine.keys() == base.keys() and all((mine[k] == base[k]).all() for k in mine)
    mlflow.set_tracking_uri(ws.tracking_uri)
    pretrain_run = mlflow.search_runs(experiment_names=["rlhf"], filter_string="tags.stage = 'pretrain'",
                                      output_format="list")[0]
    assert pretrain_run.data.params["base_model"] == str(tiny_qwen3_dir)
    assert "pretrain/loss" not in pretrain_run.data.metrics
    reward_run = mlflow.search_runs(experiment_names=["rlhf"], filter_string="tags.stage = 'train_reward'",
                                    output_format="list")[0]
    assert reward_run.data.params["reward.mixed_precision"] == "auto" and reward_run.data.params["reward.autocast"] == "off"
    decision = json.loads(ws.decision_report.read_text())
    client = MlflowClient()
    assert decision["policy_version"] == "1" and decision["reward_version"] == "1"  # no bootstrap without Prefect
    assert len(client.search_model_versions("name='rlhf-policy'")) == 1
    assert len(client.search_model_versions("name='rlhf-reward'")) == 1
    evaluation = json.loads(ws.evaluation_report.read_text())
    assert evaluation["candidate/neutral_rate"] > evaluation["champion/neutral_rate"]
    assert "dvc.lock" in {p.name for p in ws.root.iterdir()}
    assert AutoConfig.from_pretrained(ws.policy_model).architectures == ["Qwen3ForCausalLM"]
    assert AutoConfig.from_pretrained(ws.reward_model).architectures == ["Qwen3ForSequenceClassification"]
    ppo_run = mlflow.search_runs(experiment_names=["rlhf"], filter_string="tags.stage = 'train_policy'",
                                 output_format="list")[0]
    assert ppo_run.data.params["ppo.decoder"] == "static"
    assert float(ppo_run.data.params["ppo.score_std"]) > 0  # ppo.normalize_scores: the first rollout's
    policy = mlflow.pyfunc.load_model("models:/rlhf-policy/1")
    texts = policy.predict(["the ceo said", "the nurse said"], params={"max_new_tokens": 5, "temperature": 0})
    assert len(texts) == 2 and all(t.startswith(p) for t, p in zip(texts, ["the ceo said", "the nurse said"]))
    reward = mlflow.pyfunc.load_model("models:/rlhf-reward/1")
    scores = reward.predict(pd.DataFrame({"prompt": ["the ceo said"] * 2, "response": [" they left .", " he left ."]}))
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores) and scores[0] != scores[1]
    # a second repro with nothing changed does nothing
    assert "Running stage" not in versioning.dvc(ws, "repro").stdout
    # LoRA on 2 processes, FSDP-sharded (PPO alone: its upstream is unchanged): the stage starts itself
    # twice under torchrun (CPU, gloo), adapters on the base, the base (adapters off) as reference;
    # the value function a critic started from the round's reward model (a Qwen3 classifier), trained whole
    rounds.write_params(ws, load_config(None, {**FAST, "models.policy": str(tiny_qwen3_dir), "ppo.lora_rank": 4,
                                               "ppo.steps": 4, "ppo.processes": 2, "ppo.fsdp": True,
                                               "ppo.value_model": "reward"}))
    out = versioning.dvc(ws, "repro", "train_policy").stdout
    assert "PPO on 2 processes (FSDP, CPU)" in out and "Running stage 'train_reward'" not in out
    ppo_runs = mlflow.search_runs(experiment_names=["rlhf"], filter_string="tags.stage = 'train_policy'",
                                  order_by=["attributes.start_time DESC"], output_format="list")
    params = ppo_runs[0].data.params
    assert params["ppo.reference"] == "base model, adapters off" and ppo_runs[1].data.params["ppo.reference"] == "base model"
    assert params["ppo.processes"] == "2" and params["ppo.fsdp"] == "True" and params["ppo.value_model"] == "reward"
    # mixed precision: "auto" logged as set, and what it came to on these CPUs
    assert params["ppo.mixed_precision"] == "auto" and params["ppo.autocast"] == "off"
    steps = MlflowClient().get_metric_history(ppo_runs[0].info.run_id, "objective/scores")
    assert sorted(m.step for m in steps) == [1, 2, 3, 4]  # logged once, by the first process
    trained, base = load_file(ws.policy_model / "model.safetensors"), load_file(ws.base_model / "model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base)  # the merged adapters moved the weights
    # the round's policy holds its adapters (promote logs this folder whole); the next round continues them
    candidate = str(ws.policy_model)
    assert (ws.policy_model / "lora" / "adapter_config.json").is_file()
    lm, ref = build_policy(candidate, str(ws.base_model), 4, 16.0)  # rank 4, lora_alpha as configured
    assert ref is None and lora.is_lora(lm)
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = load_policy(candidate).eval()(input_ids=ids).logits
        assert torch.allclose(lm.eval()(input_ids=ids).logits, merged, atol=1e-5)
    # your own prompts: PPO trains on prompts.train, evaluation answers prompts.heldout; the
    # scenario's judge (gold metric, fluency) is left out of the report and the gates
    train = ["my friend the doctor said", "yesterday the nurse told me", "the pilot asked", "our teacher said"]
    heldout = [{"prompt": "the ceo told us"}, {"prompt": "a cashier said"}, {"prompt": "the surgeon\nsaid"}]
    (ws.root / "data" / "prompts" / "train.txt").write_text("\n".join(train) + "\n")
    (ws.root / "data" / "prompts" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    rounds.write_params(ws, load_config(None, {**FAST, "models.policy": str(tiny_qwen3_dir), "ppo.steps": 4,
                                               "evaluate.samples_per_prompt": 4, "collect.simulate": False,
                                               "evaluate.max_prompts": 2,  # of the 3: a sample of 2 answered
                                               "evaluate.judge": str(bert_judge(tmp_path / "judge")),
                                               "prompts.train": "data/prompts/train.txt",
                                               "prompts.heldout": "data/prompts/heldout.jsonl"}))
    out = versioning.dvc(ws, "repro", "-s", "train_policy", "evaluate", "promote").stdout
    assert all(f"Running stage '{stage}'" in out for stage in ("train_policy", "evaluate", "promote"))
    # what the stages printed, which a round's log relays (DVC shows it to no one): theirs alone
    printed = versioning.stage_lines(out)
    assert "evaluating 2 of the 3 held-out prompts (evaluate.max_prompts)" in printed
    steps = ["candidate: 8 responses to 2 prompts in ", "champion: 8 responses to 2 prompts in ",
             "reference: read both sides in ", "reward model: scored both sides in ",
             "judge: scored both sides and the held-out feedback in "]  # each as it ends, with its time
    at = [next(i for i, line in enumerate(printed) if line.startswith(step)) for step in steps]
    assert at == sorted(at)
    ppo_steps = [line for line in printed if line.startswith("ppo step ")]
    assert [line.split()[2] for line in ppo_steps] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(line.endswith(" left") for line in ppo_steps[:3]) and not ppo_steps[-1].endswith(" left")
    assert any(line.startswith(("PROMOTED policy v", "NOT promoted policy v")) for line in printed)
    assert not [line for line in printed if line.startswith(("Running stage", "> ", "Updating lock", "{'", "To "))]
    ppo_run = mlflow.search_runs(experiment_names=["rlhf"], filter_string="tags.stage = 'train_policy'",
                                 order_by=["attributes.start_time DESC"], output_format="list")[0]
    assert ppo_run.data.params["prompts.train"] == "data/prompts/train.txt"
    assert ppo_run.data.params["prompts.train_count"] == "4"
    evaluation = json.loads(ws.evaluation_report.read_text())
    assert (evaluation["n_prompts"], evaluation["n_samples"]) == (2, 2 * 4)
    # your held-out prompts are a sample of what will be asked: the gate reads the wider interval
    assert evaluation["win_rate/over_prompts"] == 1 and evaluation["win_rate/prompts"] == 2
    assert evaluation["win_rate/low"] == min(evaluation["win_rate/low_pairs"], evaluation["win_rate/low_prompts"])
    assert "candidate/perplexity_under_reference" in evaluation
    assert not [k for k in evaluation if "neutral" in k or "fluent" in k or "gold" in k]
    evaluate_run = mlflow.search_runs(experiment_names=["rlhf"], filter_string="tags.stage = 'evaluate'",
                                      order_by=["attributes.start_time DESC"], output_format="list")[0]
    assert (evaluate_run.data.params["prompts.heldout_count"], evaluate_run.data.params["prompts.evaluated"]) == ("3", "2")
    answered = sample_prompts([r["prompt"] for r in heldout], 2)
    page = (ws.reports / "evaluation.html").read_text()
    for p in heldout:  # the sample's prompts side by side, the third not
        assert (html.escape(p["prompt"]) in page) == (p["prompt"] in answered), p
    # evaluate.judge, another tokenizer and model: both sides scored, its win-rate over the same
    # prompts, its accuracy on the held-out feedback, a gate of its own, its column on the page
    assert evaluation["judge"] == str(tmp_path / "judge") and evaluation["judge_win_rate/prompts"] == 2
    assert evaluation["judge/pairs"] == len(held_out_feedback(ws, load_config(None, FAST))) > 0
    assert 0 <= evaluation["judge/agreement"] <= 1 and evaluation["judge/truncated"] == 0
    logged = mlflow.artifacts.download_artifacts(run_id=evaluate_run.info.run_id, dst_path=str(tmp_path / "table"),
                                                 artifact_path="samples_side_by_side.json")
    assert {"champion_judge", "candidate_judge"} <= set(json.loads(open(logged).read())["columns"])
    assert evaluate_run.data.metrics["judge_win_rate/low"] == evaluation["judge_win_rate/low"]
    assert "<th>judge</th>" in page
    decision = json.loads(ws.decision_report.read_text())
    judged = next(g for g in decision["gates"] if g["name"] == "judge_win_rate_lower_bound")
    assert judged["value"] == evaluation["judge_win_rate/low"] and judged["threshold"] == 0.5
    assert any(r.startswith(f"judge_win_rate_lower_bound {'passed' if judged['passed'] else 'FAILED'}: ")
               and f"judge {tmp_path / 'judge'}, win-rate" in r for r in decision["reasons"])
    assert "fluency_drop" not in {g["name"] for g in decision["gates"]}
    assert any(r.startswith("fluency_drop not checked") for r in decision["reasons"])
    # a changed prompts file reruns PPO and evaluation: data/prompts is their dependency
    (ws.root / "data" / "prompts" / "train.txt").write_text("\n".join(train[:2]) + "\n")
    out = versioning.dvc(ws, "status").stdout
    assert "train_policy" in out and "evaluate" in out and "train_reward" not in out
    # prompts from the validated feedback: each distinct prompt on one side, by a hash of its text
    rounds.write_params(ws, load_config(None, {**FAST, "models.policy": str(tiny_qwen3_dir), "ppo.steps": 4,
                                               "evaluate.samples_per_prompt": 4, "collect.simulate": False,
                                               "prompts.from_feedback": True, "prompts.heldout_fraction": 0.3}))
    out = versioning.dvc(ws, "repro", "-s", "train_policy", "evaluate").stdout
    assert "Running stage 'train_policy'" in out and "Running stage 'evaluate'" in out
    runs = {stage: mlflow.search_runs(experiment_names=["rlhf"], filter_string=f"tags.stage = '{stage}'",
                                      order_by=["attributes.start_time DESC"], output_format="list")[0].data.params
            for stage in ("train_policy", "evaluate")}
    assert runs["train_policy"]["prompts.train"] == "validated feedback (train, heldout_fraction 0.3)"
    assert runs["train_policy"]["prompts.train_count"] == "8" and runs["evaluate"]["prompts.heldout_count"] == "2"
    evaluation = json.loads(ws.evaluation_report.read_text())
    assert evaluation["n_samples"] == 2 * 4 and not [k for k in evaluation if "gold" in k]
    page = (ws.reports / "evaluation.html").read_text()
    assert "the nurse said" in page and "the programmer said" in page and "the doctor said" not in page


def test_gold_judge_and_simulated_annotator():
    assert scenario.judge(" they were late .") == scenario.Judgement(neutral=True, fluent=True, degenerate=False)
    assert not scenario.judge(" they was late .").fluent  # no agreement
    assert not scenario.judge(" he were late .").fluent
    assert scenario.judge(" they they were late .").degenerate
    assert scenario.judge("").degenerate
    rng = random.Random(0)
    votes = [scenario.simulated_preference(" they were late .", " he was late .", rng) for _ in range(2000)]
    assert 0.9 < votes.count("a") / len(votes) < 0.99  # prefers neutral, but disagrees sometimes
    assert scenario.simulated_preference(" he was late .", " she was late .", rng) == "tie"
    assert set(scenario.FEEDBACK_PROFESSIONS).isdisjoint(scenario.HELDOUT_PROFESSIONS)
    lines = scenario.corpus(2000, 0.1, seed=1)
    assert 0.07 < sum(" they " in line for line in lines) / len(lines) < 0.13


DRIVER = """
import sys
from prefect.utilities.engine import capture_sigterm  # what Prefect's flow engine arms in every flow run
from tasks import versioning
from tasks.workspace import Workspace
with capture_sigterm():  # as a round runs it (its lines relayed as they come), or not
    versioning.repro(Workspace(sys.argv[1]), "sleeper", print if sys.argv[2] == "relay" else None)
"""

SLEEPER = """
import os, subprocess, sys
open("stage.pid", "w").write(str(os.getpid()))
print("sleeping 300 s")
subprocess.run([sys.executable, "-c", "import os, time; open('child.pid', 'w').write(str(os.getpid())); time.sleep(300)"])
"""


@pytest.mark.parametrize("relay", ["relay", "quiet"])
def test_a_cancelled_round_stops_its_stage_and_what_the_stage_started(relay, tmp_path):
    """Prefect cancels a flow run (the UI's Cancel, `rlhf serve` stopping) with SIGTERM, which its
    engine raises in the flow. The DVC stage running then, and whatever that stage started, stop
    with it: a PPO stage running on, orphaned, would hold the GPU and race the next round."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil
    import yaml

    from tasks.workspace import Workspace

    root = tmp_path / "ws"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    versioning.dvc(Workspace(root), "init", "-q")
    (root / "sleeper.py").write_text(SLEEPER)  # a stage that starts a process of its own, as accelerate can
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"sleeper": {"cmd": "python sleeper.py"}}}))
    versioning.note_line(Workspace(root), "sleeper", "an earlier run's line")  # not this run's: never shown
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(root), relay], stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": "."})
    deadline = time.monotonic() + 120
    while not (root / "child.pid").exists() or not (root / "child.pid").read_text():
        assert driver.poll() is None and time.monotonic() < deadline, driver.stderr.read() if driver.poll() else "timeout"
        time.sleep(0.2)
    started = [psutil.Process(int((root / f).read_text())) for f in ("stage.pid", "child.pid")]
    # `rlhf status` of a workspace running a round names the round and its stage
    assert rounds.running(Workspace(root)) is None  # no round holds the workspace: a stage alone
    with rounds.round_lock(Workspace(root)).acquire():
        now = rounds.running(Workspace(root))
        while relay == "relay" and now["line"] is None and time.monotonic() < deadline:
            time.sleep(0.2)  # (the round relays the line as it reads it)
            now = rounds.running(Workspace(root))
    assert now["round"] == 1 and now["stage"] == "sleeper" and 0 <= now["stage_seconds"] < 120
    # and the last line the stage printed, when the round relays its lines (as every round does)
    assert now["line"] == ("sleeping 300 s" if relay == "relay" else None)
    assert (0 <= now["line_seconds"] <= now["stage_seconds"]) if relay == "relay" else now["line_seconds"] is None

    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=60) != 0
    alive = still_running(started, timeout=15)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


TALKER = """
import os, sys, time
print("warming up")  # not flushed: the stage's output reaches the round as it prints, not at its end
print("{'loss': 0.7}")  # a trainer's log of a dict, which MLflow holds
print("waiting for the round", file=sys.stderr)
for _ in range(600):
    if os.path.exists("seen"):
        print("the round saw my first line")
        break
    time.sleep(0.1)
else:
    print("nobody saw my first line for 60 s")
"""


def test_a_stages_lines_reach_the_round_as_it_prints_them(tmp_path, monkeypatch):
    """A round relays what its stages print (PPO's steps, warnings) while they run: a PPO stage of
    an hour must not be silent until its end. The stage here waits until the round has seen its
    first line; it could not go on if lines came only at its end."""
    import subprocess

    import yaml

    from tasks.workspace import Workspace

    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # as in a user's shell, not as in a CI's
    root = tmp_path / "ws"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    ws = Workspace(root)
    versioning.dvc(ws, "init", "-q")
    (root / "talker.py").write_text(TALKER)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"talker": {"cmd": "python talker.py"}}}))
    seen = []

    def echo(line):
        seen.append(line)
        (root / "seen").touch()

    warned = []
    assert versioning.repro(ws, "talker", echo, warned.append) is True
    assert seen == ["warming up", "the round saw my first line"]  # DVC's lines, the dict, stderr: not
    assert warned == ["waiting for the round"]  # its stderr, once it has succeeded


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_rlhf_run_ends_in_seconds_and_leaves_nothing_running(how, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) or SIGTERM (to the command alone: `timeout`,
    systemd) during `rlhf run` on a temporary Prefect server (no PREFECT_API_URL): the stage stops
    with what it started, the flow runs are recorded as crashed, the server stops, and the command
    ends at once (exit 130, saying how to go on; 143). Before, Ctrl-C also stopped the temporary
    server (it shared the terminal's process group) and the flow retried for minutes to report to
    it; SIGTERM, re-sent by Prefect to Python's default handler, left the stage and server running."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    root = tmp_path / "ws"
    rounds.write_params(init_workspace(root), load_config(None, FAST))
    # as from a terminal: SIGINT raises KeyboardInterrupt (a test worker's children may inherit it ignored)
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"from flows.cli import main; sys.exit(main(['run', '--workspace', {str(root)!r}]))")
    # the workspace's own MLflow (MLflow's set_tracking_uri in an earlier test exported another's)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    cli = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           cwd=Path(__file__).resolve().parents[1], env=env, start_new_session=True)
    deadline, started = time.monotonic() + 180, []
    while not any("tasks.pretrain" in command_line(p) for p in started):
        assert cli.poll() is None and time.monotonic() < deadline, cli.stdout.read()
        time.sleep(0.2)
        try:
            started = psutil.Process(cli.pid).children(recursive=True)  # the server, dvc, the stage
        except psutil.NoSuchProcess:
            started = []
        started = [p for p in started if p.is_running()]
    if how == "ctrl-c":
        os.killpg(cli.pid, signal.SIGINT)  # the terminal's process group: the command, not its servers and stages
    else:
        cli.send_signal(signal.SIGTERM)
    interrupted = time.monotonic()
    assert cli.wait(timeout=60) == (130 if how == "ctrl-c" else 143)
    out = cli.stdout.read()
    assert time.monotonic() - interrupted < 30, out
    assert "Crashed" in out, out[-3000:]
    assert ("interrupted. `rlhf run` again goes on with the same round" in out) == (how == "ctrl-c"), out[-3000:]
    alive = still_running(started, timeout=15)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    # `rlhf status` says why the round stopped, and in which stage
    failed = rounds.last_failure(Workspace(root))
    assert (failed["round"], failed["stage"]) == (1, "pretrain")
    assert failed["reason"] == ("interrupted (Ctrl-C)" if how == "ctrl-c" else "stopped by SIGTERM"), failed


def test_rlhf_server_stopped_with_sigterm_stops_both_servers(tmp_path):
    """`kill` or `timeout` on `rlhf server`: the Prefect and MLflow servers (process groups of their
    own) stop with it; before, Python's default SIGTERM handler left both running."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    from flows.serve import free_port

    cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "server", "--workspace", str(tmp_path / "ws"),
                            "--prefect-port", str(free_port()), "--mlflow-port", str(free_port())],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           cwd=Path(__file__).resolve().parents[1],
                           env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    deadline, lines = time.monotonic() + 180, []
    while not lines or "Ctrl-C stops both" not in lines[-1]:
        assert cli.poll() is None and time.monotonic() < deadline, "".join(lines) + cli.stdout.read()
        lines.append(cli.stdout.readline())
    servers = psutil.Process(cli.pid).children(recursive=True)
    assert len(servers) >= 2
    cli.send_signal(signal.SIGTERM)
    assert cli.wait(timeout=60) == 143
    alive = still_running(servers, timeout=15)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


@pytest.mark.parametrize("how", ["answered", "stopped"])
def test_rlhf_label_without_a_server_serves_its_form_in_a_temporary_ui(how, tiny_model_dir, tmp_path):
    """`rlhf label` with no PREFECT_API_URL: the form must be somewhere a person can open. It starts
    Prefect's UI on a temporary server, prints where, and each batch names its run's page; answers
    given there (here through the API, as the UI's Resume does) land in DVC, and the server stops
    with the command. Before, the temporary server had no UI: nobody could answer. An answer that
    misses a pair or names one not shown is refused on Resume (the form's schema). A session
    stopped after its first batch (SIGTERM; Ctrl-C alike) keeps that batch's labels."""
    import getpass
    import os
    import re
    import shutil
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    import psutil
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ws = init_workspace(tmp_path / "ws")
    if how == "answered":  # the base model a round made
        shutil.copytree(tiny_model_dir, ws.base_model)
    else:  # the user's own, before any round: people's labels can come first
        rounds.write_params(ws, load_config(None, {**FAST, "models.policy": str(tiny_model_dir)}))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    # what a person must read is said under either logging level: Prefect's default INFO (as log lines)
    # or WARNING (the suite's; before, it hid where to answer and `rlhf label` waited in silence)
    env["PREFECT_LOGGING_LEVEL"] = "INFO" if how == "answered" else "WARNING"
    who = ["--annotator", "carol"] if how == "answered" else []  # else the login name
    cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "label", "--workspace", str(ws.root), "--pairs", "3",
                            "--batch-size", "2", "--timeout", "120", *who],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           cwd=Path(__file__).resolve().parents[1], env=env)
    deadline, lines, answered = time.monotonic() + 240, [], 0
    while answered < 2:
        assert cli.poll() is None and time.monotonic() < deadline, "".join(lines) + cli.stdout.read()
        lines.append(cli.stdout.readline())
        started = re.search(r"Prefect UI (http://127\.0\.0\.1:\d+) \(a temporary server", lines[-1])
        if started:
            ui, server = started.group(1), psutil.Process(cli.pid).children(recursive=True)
        page = re.search(r"batch (\d) of 2 waits for your labels .* open (http://\S+/runs/flow-run/(\S+)) and press Resume",
                         lines[-1])
        if not page:
            continue
        if answered == 1 and how == "stopped":
            cli.send_signal(signal.SIGTERM)
            break
        assert page.group(2).startswith(ui)
        request = urllib.request.Request(page.group(2), headers={"Accept": "text/html"})  # as a browser asks
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 200 and "<!DOCTYPE html>" in r.read().decode()
        with temporary_settings({PREFECT_API_URL: ui + "/api"}):
            if answered == 0:  # an answer missing a pair, or naming one this batch does not show: refused
                with pytest.raises(RuntimeError, match="Cannot resume this run.*'pair_2' is a required property"):
                    resume_flow_run(page.group(3), run_input={"pair_1": "A"})
                with pytest.raises(RuntimeError, match="Cannot resume this run.*pair_3"):
                    resume_flow_run(page.group(3), run_input={"pair_1": "A", "pair_2": "B", "pair_3": "A"})
                resume_flow_run(page.group(3), run_input={"pair_1": "A", "pair_2": "B"})
            else:
                resume_flow_run(page.group(3), run_input={"pair_3": "A"})
        answered += 1
    assert cli.wait(timeout=120) == (0 if how == "answered" else 143)
    out = "".join(lines) + cli.stdout.read()
    saved = re.findall(r"(\d) labels saved \((\d) pairs\): (\S+)", out)
    assert len(saved) == 1, out[-3000:]
    labelled, pairs, raw_file = saved[0]
    assert (int(labelled), int(pairs)) == ((3, 3) if how == "answered" else (2, 2)), out[-3000:]
    if how == "answered":
        assert json.loads(out.strip().splitlines()[-1])["raw_file"] == raw_file
    recs = [json.loads(x) for x in open(raw_file, encoding="utf-8")]
    annotator = "carol" if how == "answered" else getpass.getuser()
    assert [r["annotator"] for r in recs] == [annotator] * len(recs) and recs[1]["shown_as_a"] == "rejected"
    assert "prefect-ui" in versioning.git(ws, "log", "-1", "--format=%s", "--", raw_file + ".dvc").stdout
    assert not still_running(server, timeout=15)  # the temporary server stopped with the command


def test_rlhf_serve_uses_the_prefect_server_of_the_users_profile(tmp_path):
    """`prefect config set PREFECT_API_URL=...` keeps the server in Prefect's profile, not in the
    environment: `rlhf serve` must register its deployments there. Before, it looked at the
    environment alone, started servers of its own and served on them."""
    import asyncio
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil
    from prefect.client.orchestration import PrefectClient

    from flows.serve import free_port, start_servers
    from tasks.processes import stop_groups

    ws = init_workspace(tmp_path / "ws")
    rounds.write_params(ws, load_config(None, FAST))
    theirs = start_servers(ws, prefect_port=free_port(), mlflow_port=None)
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{theirs.prefect_url}"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["PREFECT_PROFILES_PATH"] = str(profiles)
    log = tmp_path / "serve.log"
    serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--workspace", str(ws.root),
                              "--prefect-port", str(free_port()), "--mlflow-port", str(free_port())],
                             stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
                             cwd=Path(__file__).resolve().parents[1])

    async def deployment_names():
        async with PrefectClient(api=theirs.prefect_url) as client:
            return {f"{d.name}" for d in await client.read_deployments()}
    try:
        deadline, names = time.monotonic() + 180, set()
        while names != {"scheduled", "on-demand"}:
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
            names = asyncio.run(deployment_names())
        started = [command_line(c) for c in psutil.Process(serve.pid).children(recursive=True)]
        assert not [c for c in started if " server start" in c or "mlflow server" in c], started  # none of its own
        assert "MLflow UI" not in log.read_text()
    finally:
        stop_groups(serve, timeout=60)
        theirs.stop()


def test_a_reward_model_of_another_tokenizer_is_refused_before_it_trains(tiny_model_dir, tmp_path):
    """models.reward must read the policy's tokens: one with another tokenizer is named at the start
    of train_reward, not after its training, where PPO first met it."""
    import shutil

    from tasks import train_reward
    from tasks.stage import StageError
    from tasks.workspace import RoundState

    other = another_tokenizer(tiny_model_dir, tmp_path / "other-reward")
    ws = init_workspace(tmp_path / "ws")
    shutil.copytree(tiny_model_dir, ws.base_model)
    ws.accepted.parent.mkdir(parents=True, exist_ok=True)
    ws.accepted.write_text(json.dumps({"prompt": "the ceo said", "chosen": " they left .", "rejected": " he left ."}) + "\n")
    with pytest.raises(StageError, match=f"models.reward {other} uses another tokenizer than the policy's base "
                                         "model \\(the built-in scenario's tiny model\\)"):
        train_reward.run(ws, load_config(None, {**FAST, "models.reward": str(other)}), RoundState())
    assert not ws.reward_model.exists()


def test_a_policy_no_reward_model_can_start_from_is_said_before_feedback_is_collected(tiny_model_dir, tmp_path):
    """TrOCR's causal LM (the decoder of an encoder-decoder model) has neither a sequence classifier
    in transformers nor a decoder trunk of its own to give a score head to, so the reward model
    cannot start from it: the round's first stage says so, and what to set, before any feedback is
    collected; a reward model loaded from such a folder says the same. With models.reward set, it goes on."""
    from transformers import TrOCRConfig, TrOCRForCausalLM

    from tasks import pretrain
    from tasks.modeling import load_reward, load_tokenizer, reward_head_problem, save
    from tasks.stage import StageError
    from tasks.workspace import RoundState

    tok = load_tokenizer(tiny_model_dir)
    decoder = TrOCRConfig(vocab_size=len(tok), d_model=32, decoder_layers=1, decoder_attention_heads=2,
                          decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    trocr = save(TrOCRForCausalLM(decoder), tok, tmp_path / "trocr")
    ws = init_workspace(tmp_path / "ws")
    with pytest.raises(StageError, match=f"models.policy {trocr}: transformers has no sequence-classification "
                                         "model for TrOCRConfig .* set models.reward to a model that has one"):
        pretrain.run(ws, load_config(None, {**FAST, "models.policy": str(trocr)}), RoundState())
    assert not ws.base_model.exists()
    with pytest.raises(ModelLoadError, match="cannot load reward model .*no sequence-classification model for TrOCR"):
        load_reward(trocr, tok.pad_token_id)
    assert reward_head_problem(load_policy(tiny_model_dir).config) is None  # GPT-2 has one
    pretrain.run(ws, load_config(None, {**FAST, "models.policy": str(trocr), "models.reward": str(tiny_model_dir)}),
                 RoundState())
    assert (ws.base_model / "config.json").is_file()


def image_text_model(family: str, vocab: int, pad_id: int):
    """A tiny random image-text model of `family` as its makers release them (vision tower, projector,
    language model), its special image tokens the vocabulary's last."""
    import transformers as T

    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=96, pad_token_id=pad_id)
    special = dict(image_token_index=vocab - 1)
    if family == "gemma3":
        config = T.Gemma3Config(text_config={**text, "sliding_window": 32}, mm_tokens_per_image=4,
                                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=28, patch_size=14),
                                boi_token_index=vocab - 2, eoi_token_index=vocab - 3, **special)
        return T.Gemma3ForConditionalGeneration(config)
    if family == "gemma4":  # per-layer inputs, a sliding and a global layer of their own head size
        config = T.Gemma4Config(
            text_config={**text, "global_head_dim": 32, "vocab_size_per_layer_input": vocab,
                         "hidden_size_per_layer_input": 16, "sliding_window": 32},
            vision_config=T.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2, head_dim=16).to_dict(),
            audio_config=None, image_token_id=vocab - 1, boi_token_id=vocab - 2, eoi_token_id=vocab - 3)
        return T.Gemma4ForConditionalGeneration(config)
    config = T.Mistral3Config(text_config={**text, "model_type": "mistral"}, **special,
                              vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64,
                                                 head_dim=16, num_hidden_layers=1, num_attention_heads=2,
                                                 image_size=28, patch_size=14))
    return T.Mistral3ForConditionalGeneration(config)


@pytest.mark.parametrize("family", ["gemma3", "gemma4", "mistral3"])
def test_an_image_text_model_is_the_base_as_its_language_model(family, tiny_model_dir, tmp_path, capsys):
    """Gemma 3 from 4B, Gemma 4 and Mistral 3 are released as image-text models. As models.policy,
    their language model alone is the base (pretrain says so): on text, the same logits as the whole
    model; saved and loaded back as that text model, its LM head tied as it was, the vision tower
    left out; the reward model starts from it. An image-text model with no text-only causal LM for
    its language model (Qwen2.5-VL) is refused with what to set; positions are the text config's."""
    import transformers as T

    from tasks import pretrain
    from tasks.modeling import load_reward, load_tokenizer, max_positions, save
    from tasks.workspace import RoundState

    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    whole = image_text_model(family, len(tok), tok.pad_token_id).eval()
    folder = save(whole, tok, tmp_path / family)
    assert max_positions(whole.config) == 96
    ws = init_workspace(tmp_path / "ws")
    pretrain.run(ws, load_config(None, {**FAST, "models.policy": str(folder)}), RoundState())
    text_lm = {"gemma3": "Gemma3ForCausalLM", "gemma4": "Gemma4ForCausalLM", "mistral3": "MistralForCausalLM"}[family]
    assert (f"models.policy {folder} is an image-text model ({family}): its language model ({text_lm}) is the base"
            in capsys.readouterr().out)
    base = T.AutoModelForCausalLM.from_pretrained(ws.base_model).eval()
    assert type(base).__name__ == text_lm and not any("vision" in k for k in base.state_dict())
    assert T.AutoConfig.from_pretrained(ws.base_model).architectures == [text_lm]
    ids = torch.randint(3, len(tok) - 4, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, whole(input_ids=ids).logits)
        assert torch.equal(load_policy(folder)(input_ids=ids).logits, whole(input_ids=ids).logits)
    tied = whole.get_output_embeddings().weight is whole.get_input_embeddings().weight
    assert (base.get_output_embeddings().weight is base.get_input_embeddings().weight) == tied
    reward = load_reward(ws.base_model, tok.pad_token_id)
    assert max_positions(reward.config) == 96
    vl = T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e4}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
        image_token_id=len(tok) - 1, video_token_id=len(tok) - 2, vision_start_token_id=len(tok) - 3))
    with pytest.raises(ModelLoadError, match=r"cannot load .*qwen-vl.* as a causal language model: it is a "
                                             r"Qwen2_5_VLForConditionalGeneration, .*set models.policy to a text model"):
        load_policy(save(vl, tok, tmp_path / "qwen-vl"))


@pytest.mark.parametrize("family", ["granite", "cohere2", "olmoe", "gemma4_text", "lfm2", "codegen"])
def test_a_reward_model_starts_from_a_policy_transformers_has_no_classifier_for(family, tiny_model_dir, tmp_path):
    """IBM's Granite, Cohere's Command R7B, OLMoE, Gemma 4, LFM2, CodeGen: transformers ships no
    sequence classifier for them, so transformers' generic one is made for each (their trunk and a
    score head). The causal LM's trunk loads into it weight for weight (CodeGen's under its own
    name, `transformer`), only the score head starts new; it scores at the last real token, as the
    critic reads it; saved, it loads again with the same scores."""
    import transformers as T

    from tasks.modeling import load_reward, load_tokenizer, save
    from tasks.ppo.rollout import Critic, position_ids_from_mask

    tok = load_tokenizer(tiny_model_dir)
    small = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    config = {"granite": lambda: T.GraniteConfig(**small), "cohere2": lambda: T.Cohere2Config(**small),
              "olmoe": lambda: T.OlmoeConfig(**small, num_experts=4, num_experts_per_tok=2),
              "gemma4_text": lambda: T.Gemma4TextConfig(**small, head_dim=8, vocab_size_per_layer_input=len(tok),
                                                       hidden_size_per_layer_input=8),
              "lfm2": lambda: T.Lfm2Config(**small),
              "codegen": lambda: T.CodeGenConfig(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                 n_positions=64, pad_token_id=tok.pad_token_id)}[family]()
    torch.manual_seed(0)
    lm = T.AutoModelForCausalLM.from_config(config)
    rm = load_reward(save(lm, tok, tmp_path / "policy"), tok.pad_token_id).eval()
    assert type(rm).__name__.endswith("ForSequenceClassification")
    lm_weights, rm_weights = lm.state_dict(), rm.state_dict()
    assert set(rm_weights) - set(lm_weights) == {"score.weight"}
    assert all(torch.equal(v, lm_weights[k]) for k, v in rm_weights.items() if k != "score.weight")
    ids = torch.tensor([[tok.pad_token_id, 5, 6, 7], [8, 9, 10, 11]])
    mask = (ids != tok.pad_token_id).long()
    positions = position_ids_from_mask(mask)
    with torch.no_grad():
        scores = rm(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, 0]
        assert torch.allclose(Critic(rm)(ids, mask, positions)[:, -1], scores, atol=1e-5)
        again = load_reward(save(rm, tok, tmp_path / "reward"), tok.pad_token_id).eval()
        assert torch.equal(again(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, 0], scores)


def test_a_reward_model_whose_trunk_would_start_random_is_refused(tiny_model_dir, tmp_path):
    """A checkpoint whose weights are not under the names the classifier reads (renamed here) would
    give a reward model of random weights with a trained-looking name: refused, with the names."""
    from safetensors.torch import save_file

    from tasks.modeling import load_reward, load_tokenizer, save

    tok = load_tokenizer(tiny_model_dir)
    folder = save(load_policy(tiny_model_dir), tok, tmp_path / "renamed")
    weights = load_file(folder / "model.safetensors")
    save_file({k.replace("transformer.", "decoder."): v.contiguous() for k, v in weights.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"cannot load reward model .*renamed.*: \d+ of its trunk's weights are "
                                             r"not in the checkpoint .*transformer\.h\.0\..* would start random"):
        load_reward(folder, tok.pad_token_id)


def test_reward_model_trains_under_bf16_autocast_and_is_measured_in_float32(tiny_model_dir, tmp_path, capsys):
    """reward.mixed_precision: bf16 (a GPU's default; asked for here on the CPU): RewardTrainer trains
    under autocast, and the model it hands back is measured and saved in float32, without the
    autocast wrapper accelerate puts on its forward (its scores would be bf16-rounded otherwise)."""
    from tasks.collect import annotate, sample_pairs
    from tasks.modeling import load_reward, load_tokenizer
    from tasks.train_reward import bf16, pairwise_accuracy, split, train

    assert not bf16(load_config(None, FAST))  # auto, on this CPU
    cfg = load_config(None, {**FAST, "reward.mixed_precision": "bf16"})
    assert bf16(cfg)
    triples = sample_pairs(str(tiny_model_dir), scenario.feedback_prompts(), 96, 10, 1.0, seed=1)
    records = [json.loads(r.to_json()) for r in annotate(triples, 1, None, 3.0, seed=1) if r.label == "pair"]
    # three pairs longer than the tiny model's 64 positions (reward.max_length null: its positions)
    longer = [{**r, "id": f"ffffff{i:02x}" + r["id"][8:], "prompt": "the nurse said" + " the doctor said" * 20} for i, r in enumerate(records[:3])]
    # a batch size whose last step is not one the trainer logs (every 5): its progress still ends there
    n_train = len(split(records, cfg.reward.eval_fraction)[0])
    batch = next(b for b in range(cfg.reward.batch_size, 0, -1) if math.ceil(n_train / b) * cfg.reward.epochs % 5)
    cfg = load_config(None, {**FAST, "reward.mixed_precision": "bf16", "reward.batch_size": batch})
    metrics = train(str(tiny_model_dir), str(tiny_model_dir), records + longer, cfg, tmp_path / "reward")
    assert metrics["too_long"] == 3
    out = capsys.readouterr().out
    assert (f"warning: 3 of the {len(records) + 3} pairs are longer than the 64 tokens the reward model reads (its "
            "positions) and are neither trained on nor scored; raise reward.max_length (up to the model's positions), "
            "or set validate.max_tokens to 63 to set them aside at validation, with their reason") in out
    # its progress, which a round's log relays as it comes: about 20 lines, the last one at the end
    steps = [line for line in out.splitlines() if line.startswith("reward step ")]
    total = math.ceil(len(split(records, cfg.reward.eval_fraction)[0]) / cfg.reward.batch_size) * cfg.reward.epochs
    assert total % 5 and 1 < len(steps) <= 21
    assert steps[-1].startswith(f"reward step {total}/{total}  loss ")
    assert "left" in steps[0] and "left" not in steps[-1]
    assert metrics["held_out"]["accuracy"] > 0.7
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "reward" / "model.safetensors").values())
    # the figures it reports are the saved model's, loaded as anyone loads it (float32, no autocast)
    tok = load_tokenizer(tmp_path / "reward")
    saved = load_reward(tmp_path / "reward", tok.pad_token_id).eval()
    again = pairwise_accuracy(saved, tok, split(records, cfg.reward.eval_fraction)[1])
    assert again["n"] == metrics["held_out"]["n"] and again["loss"] == pytest.approx(metrics["held_out"]["loss"], abs=1e-6)
    # the same model as evaluate.judge (tasks.judge: its own tokenizer as saved, right padding, the
    # model's own pooling) scores as the round scores, and agrees with the annotators as often
    from tasks import judge as judging
    from tasks.modeling import score_texts

    held_out = split(records, cfg.reward.eval_fraction)[1]
    judge, judge_tok = judging.load_judge(str(tmp_path / "reward"))
    prompts, chosen = [r["prompt"] for r in held_out], [r["chosen"] for r in held_out]
    by_judge, cut = judging.scores(judge, judge_tok, prompts, chosen, batch_size=5)
    assert cut == 0 and torch.allclose(by_judge, score_texts(saved, tok, prompts, chosen), atol=1e-4)
    assert judging.accuracy(judge, judge_tok, held_out) == {"accuracy": again["accuracy"], "n": again["n"],
                                                            "truncated": 0}


def test_the_reward_models_held_out_accuracy_says_which_prompts_it_trained_on(tiny_model_dir, tmp_path, capsys):
    """Split by pair (the default), the scenario's held-out pairs share their prompts with pairs the
    model trained on, and the stage says so, with its accuracy on the pairs of prompts it never saw;
    reward.split: prompt holds out every pair of a prompt (by prompts.held_out, as from_feedback
    splits prompts), and a split that holds out nothing stops the stage before training."""
    from tasks.collect import annotate, sample_pairs
    from tasks.prompts import held_out as prompt_held_out
    from tasks.stage import StageError
    from tasks.train_reward import split, train

    triples = sample_pairs(str(tiny_model_dir), scenario.feedback_prompts(), 48, 10, 1.0, seed=2)
    records = [json.loads(r.to_json()) for r in annotate(triples, 1, None, 3.0, seed=2) if r.label == "pair"]
    # 40 pairs of prompts asked once each: those held out are prompts the model never saw; their ids
    # are an export's own (not hashes: they stopped the stage with "invalid literal for int()")
    once = [{**r, "id": f"row-{i}", "prompt": f"{r['prompt']} {i}"} for i, r in enumerate(records[:40])]
    data = records + once
    metrics = train(str(tiny_model_dir), str(tiny_model_dir), data, load_config(None, FAST), tmp_path / "by-pair")
    _, held = split(data, 0.2)
    unseen = [r for r in held if r["prompt"].split()[-1].isdigit()]
    assert unseen and len(unseen) < len(held)
    h = metrics["held_out"]
    assert (h["split"], h["n"], h["seen_prompt_pairs"], h["prompts"]) == ("pair", len(held), len(held) - len(unseen),
                                                                          len({r["prompt"] for r in held}))
    assert metrics["held_out_unseen_prompts"]["n"] == len(unseen)
    low, high = h["interval_pairs"]
    assert low < h["accuracy"] < high and h["interval_prompts"][0] <= h["accuracy"] <= h["interval_prompts"][1]
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("reward model: held-out accuracy"))
    assert line == (f"reward model: held-out accuracy {h['accuracy']:.2f} on {len(held)} pairs of {h['prompts']} "
                    f"prompts (95% interval {low:.2f}-{high:.2f} over pairs, {h['interval_prompts'][0]:.2f}-"
                    f"{h['interval_prompts'][1]:.2f} over prompts); {len(held) - len(unseen)} of them have a prompt it "
                    f"trained on, with other pairs of it (on the {len(unseen)} others: "
                    f"{metrics['held_out_unseen_prompts']['accuracy']:.2f}): reward.split: prompt holds out every "
                    "pair of a prompt")

    cfg = load_config(None, {**FAST, "reward.split": "prompt", "reward.eval_fraction": 0.5})
    metrics = train(str(tiny_model_dir), str(tiny_model_dir), data, cfg, tmp_path / "by-prompt")
    train_set, held = split(data, 0.5, "prompt")
    assert {r["prompt"] for r in held} == {r["prompt"] for r in data if prompt_held_out(r["prompt"], 0.5)}
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in train_set}
    # prompts.from_feedback (heldout_fraction up to eval_fraction): evaluation's prompts are among them
    from tasks.prompts import split_prompts

    evaluated = split_prompts([r["prompt"] for r in data], 0.3)[1]
    assert evaluated and set(evaluated) <= {r["prompt"] for r in held}
    assert (metrics["held_out"]["n"], metrics["held_out"]["seen_prompt_pairs"]) == (len(held), 0)
    assert "held_out_unseen_prompts" not in metrics
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("reward model: held-out accuracy"))
    assert line.endswith(" over prompts)")
    # the scenario's ten prompts, 20% held out by prompt: none is, and nothing would measure the model
    cfg = load_config(None, {**FAST, "reward.split": "prompt"})
    with pytest.raises(StageError, match=r"none of the \d+ trainable pairs is held out \(reward.eval_fraction 0.2, "
                                         r"reward.split prompt\): the reward model's accuracy, which gates promotion, "
                                         "would be measured on nothing"):
        train(str(tiny_model_dir), str(tiny_model_dir), records, cfg, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_a_judge_is_measured_on_the_held_out_pairs_the_reward_model_was(tiny_model_dir, tmp_path):
    """judge/accuracy sits beside the reward model's held-out accuracy: on the same pairs, those the
    reward model held out and could read whole (pairs longer than reward.max_length are not)."""
    import hashlib
    import shutil

    from tasks.collect import annotate, sample_pairs
    from tasks.train_reward import split

    ws = init_workspace(tmp_path / "ws")
    shutil.copytree(tiny_model_dir, ws.reward_model)  # its tokenizer and 64 positions are what count here
    triples = sample_pairs(str(tiny_model_dir), scenario.feedback_prompts(), 24, 10, 1.0, seed=1)
    records = [json.loads(r.to_json()) for r in annotate(triples, 1, None, 3.0, seed=1) if r.label == "pair"]
    longer = [{**r, "id": hashlib.sha256(f"longer {i}".encode()).hexdigest()[:16],
               "prompt": "the nurse said" + " the doctor said" * 20} for i, r in enumerate(records[:40])]
    ws.accepted.parent.mkdir(parents=True, exist_ok=True)
    ws.accepted.write_text("".join(json.dumps(r) + "\n" for r in records + longer))
    cfg = load_config(None, FAST)
    measured = held_out_feedback(ws, cfg)
    assert sorted(r["id"] for r in measured) == sorted(r["id"] for r in split(records, cfg.reward.eval_fraction)[1])
    assert any(r["id"] in {x["id"] for x in longer} for r in split(records + longer, cfg.reward.eval_fraction)[1])
    assert measured and len(measured) <= 1024


def test_rlhf_status_looking_never_makes_a_starting_round_fail(tmp_path):
    """`rlhf status` (round_in_progress) holds the round lock for an instant to look; a round that
    starts in that instant waits for it rather than failing as if another round ran."""
    import subprocess
    import sys
    import time

    ws = init_workspace(tmp_path / "ws")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"lock = FileLock({str(ws.root / '.cache' / 'round.lock')!r}); lock.acquire(); "
                               "print('held', flush=True); time.sleep(0.5)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    assert rounds.round_in_progress(ws)  # it looks without waiting
    started = time.monotonic()
    with rounds.round_lock(ws).acquire():  # as rlhf_round takes it
        assert time.monotonic() - started < 2
    holder.wait(timeout=10)


def test_progress_lines():
    from tasks.stage import time_left
    from tasks.train_reward import progress_line

    assert time_left(70.0, 40, 140) == "1m10s, about 4m05s left"
    assert time_left(3.2, 1, 0) == "3s"  # the last step: nothing left to say
    assert time_left(0.0, 0, 5) == "0s"  # no step done: no pace yet
    assert time_left(7322, 2, 3) == "2h02m, about 3h03m left"

    assert (progress_line(40, 180, 70.0, {"loss": 0.6523, "accuracy": 0.61, "margin": 0.2})
            == "reward step 40/180  loss 0.652  accuracy 0.61  1m10s, about 4m05s left")
    assert progress_line(180, 180, 9.4, {"loss": 0.5}) == "reward step 180/180  loss 0.500  9s"


def test_a_workspace_of_an_earlier_version_is_brought_to_this_versions_pipeline(tmp_path):
    """An upgrade reaches workspaces made before it: a round begins by making dvc.yaml this version's
    (its stages' dependencies change between versions) and adding to params.yaml the settings it
    lacks (this version's dvc.yaml over an old params.yaml stops DVC). Your values and comments stay;
    a dvc.yaml with changes git does not hold is left alone, and said so."""
    import re

    ws = init_workspace(tmp_path / "ws")
    template, params = ws.dvc_yaml.read_text(), ws.params.read_text()
    old_dvc = template.replace("params: [validate, chat, prompts, ppo.max_new_tokens, evaluate.max_prompts, "
                               "evaluate.judge]", "params: [validate, chat]")
    old_params = re.sub(r"^  (judge|min_judge_win_rate|max_prompts):.*\n", "", params, flags=re.M)
    old_params = re.sub(r"^seed: 0 ", "seed: 5 ", old_params, flags=re.M)
    assert old_dvc != template and "judge" not in old_params and "seed: 5 " in old_params
    ws.dvc_yaml.write_text(old_dvc), ws.params.write_text(old_params)
    versioning.git(ws, "commit", "-qam", "as an earlier version left it")
    ws.collected.parent.mkdir(parents=True), ws.collected.write_text("")  # validate's other dependencies
    ws.base_model.mkdir(parents=True), (ws.base_model / "config.json").write_text("{}")
    ws.dvc_yaml.write_text(template)  # this version's stages over the old params: DVC stops
    stopped = versioning.dvc(ws, "repro", "--dry", "-s", "validate", check=False)
    assert stopped.returncode != 0 and re.search(  # (DVC names them in no fixed order)
        r"Parameters '(evaluate\.max_prompts, evaluate\.judge|evaluate\.judge, evaluate\.max_prompts)' are missing "
        r"from 'params.yaml'", stopped.stdout + stopped.stderr)
    ws.dvc_yaml.write_text(old_dvc)
    assert rounds.upgrade_pipeline(ws) == [
        "params.yaml: added evaluate.max_prompts, evaluate.judge, gates.min_judge_win_rate (this version's defaults)",
        "dvc.yaml: brought to this version's pipeline (stages validate; the old one is in git: git show HEAD:dvc.yaml)"]
    assert ws.dvc_yaml.read_text() == template
    cfg = load_config(ws.params)
    assert cfg.seed == 5 and cfg.evaluate.judge is None and cfg.evaluate.max_prompts == 256
    assert cfg.gates.min_judge_win_rate == 0.5
    # each added where this version has it, with its comment and blank lines: the file reads as
    # this version's own, with your value; nulls stay `null`, quotes stay
    assert ws.params.read_text() == params.replace("seed: 0 ", "seed: 5 ", 1)
    assert rounds.write_params(ws, load_config(ws.params, {"seed": 7, "refinement.cron": "0 4 * * *"}))
    assert ws.params.read_text() == params.replace("seed: 0 ", "seed: 7 ", 1).replace('"0 3 * * *"', '"0 4 * * *"')
    assert not rounds.write_params(ws, load_config(ws.params))
    ws.params.write_text(params.replace("seed: 0 ", "seed: 5 ", 1))
    assert versioning.dvc(ws, "repro", "--dry", "-s", "validate", check=False).returncode == 0
    assert rounds.upgrade_pipeline(ws) == []  # once
    versioning.git(ws, "commit", "-qam", "this version's pipeline")
    ws.dvc_yaml.write_text(old_dvc + "# mine\n")  # yours, not committed: kept
    [said] = rounds.upgrade_pipeline(ws)
    assert said.startswith("dvc.yaml: left as it is, since it has changes git does not hold; this version's "
                           "pipeline differs in stages validate (")
    assert ws.dvc_yaml.read_text() == old_dvc + "# mine\n"
