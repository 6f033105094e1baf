"""Bad input gets a clear error and loses nothing: configs, CLI arguments, feedback files, models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from tasks.config import ConfigError, load_config
from tasks.modeling import ModelLoadError, load_policy, load_tokenizer
from tasks.validate import ValidationFailed, load_rows, validate_files
from tasks.config import ValidateConfig


# ---- configs ------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("ppo: [1, 2\n", "not valid YAML"),
    ("- a list\n- not a mapping\n", "must hold a mapping"),
    ("ppo:\n  stepz: 3\n", "ppo.stepz"),
    ("ppo:\n  steps: many\n", "ppo.steps"),
    ("ppo:\n  lr: -1\n", "ppo.lr must be > 0"),
    ("ppo:\n  batch_size: 10\n  minibatches: 3\n", "multiple of"),
    ("ppo:\n  lora_rank: -8\n", "ppo.lora_rank must be >= 0"),
    ("ppo:\n  lora_rank: 8\n  lora_alpha: 0\n", "ppo.lora_alpha must be > 0"),
    ("ppo:\n  lora_rank: eight\n", "ppo.lora_rank"),
    ("ppo:\n  processes: 0\n", "ppo.processes must be >= 1"),
    ("ppo:\n  micro_batch_size: -4\n", "ppo.micro_batch_size must be >= 0"),
    ("ppo:\n  micro_batch_size: 2.5\n", "ppo.micro_batch_size"),
    ("ppo:\n  generation_batch_size: -2\n", "ppo.generation_batch_size must be >= 0"),
    ("ppo:\n  batch_size: 16\n  minibatches: 2\n  generation_batch_size: 5\n", "multiple of ppo.generation_batch_size"),
    ("ppo:\n  fsdp: true\n", "set ppo.processes to 2 or more"),
    ("ppo:\n  mixed_precision: fp16\n", "ppo.mixed_precision"),
    ("ppo:\n  mixed_precision: true\n", "ppo.mixed_precision"),
    ("ppo:\n  lr_schedule: cosine\n", "ppo.lr_schedule"),
    ("ppo:\n  lr_schedule: null\n", "ppo.lr_schedule"),
    ("ppo:\n  normalize_scores: maybe\n", "ppo.normalize_scores"),
    ("reward:\n  mixed_precision: fp16\n", "reward.mixed_precision"),
    ("gates:\n  min_win_rate: 1.5\n", "gates.min_win_rate"),
    ("project: 'has spaces'\n", "project"),
    ("collect:\n  pairs_per_prompt: 0\n", "collect.pairs_per_prompt"),
    ("unknown_section: {}\n", "unknown_section"),
    ("refinement:\n  cron: '61 * * * *'\n", "refinement.cron"),
    ("refinement:\n  cron: '0 3 * *'\n", "refinement.cron"),
    ("refinement:\n  cron: 'H 3 * * *'\n", "refinement.cron"),
    ("refinement:\n  timezone: Mars/Olympus\n", "refinement.timezone"),
    ("refinement:\n  keep_versions: 0\n", "refinement.keep_versions: Input should be greater than or equal to 1"),
    ("refinement:\n  keep_versions: two\n", "refinement.keep_versions"),
    ("refinement:\n  keep_versions: 1.5\n", "refinement.keep_versions"),
    ("refinement:\n  gc_remote: maybe\n", "refinement.gc_remote"),
    ("refinement:\n  inbox_map: prompt=q,a=l,b=r\n", "refinement.inbox_map: Value error, --map 'prompt=q,a=l,b=r': a=, b= and "
                                                      "choice= go together"),
    ("refinement:\n  inbox_map: winner=w\n", "refinement.inbox_map: Value error, bad --map entry 'winner=w'"),
    ("reward:\n  eval_map: winner=w\n  eval_file: eval.csv\n", "reward.eval_map: Value error, bad --map entry 'winner=w'"),
    ("reward:\n  eval_map: prompt=q,chosen=a,rejected=b\n", "reward.eval_map names the columns of reward.eval_file"),
    ("refinement:\n  gc_remote: true\n", "prunes only with refinement.keep_versions set"),
    ("prompts:\n  train: data/prompts/train.txt\n", "set prompts.train and prompts.heldout together"),
    ("chat:\n  template: true\n", "chat.template needs models.policy"),
    ("chat:\n  system_prompt: be brief\n", "set chat.template to true, or leave them out"),
    ("chat:\n  hh_dialogue: true\n", "set chat.template to true, or leave them out"),
    ("chat:\n  template_kwargs: [enable_thinking]\n", "chat.template_kwargs"),
    ("chat:\n  templat: true\n", "chat.templat"),
    ("prompts:\n  from_feedback: true\n", "with prompts.from_feedback set, set collect.simulate to false"),
    ("prompts:\n  from_feedback: true\n  train: data/prompts/t.txt\n  heldout: data/prompts/h.txt\n"
     "collect:\n  simulate: false\n", "set one or the other"),
    ("prompts:\n  heldout_fraction: 1\n", "prompts.heldout_fraction: Input should be less than 1"),
    ("evaluate:\n  max_prompts: 0\n", "evaluate.max_prompts: Input should be greater than 0"),
    ("evaluate:\n  samples_per_prompt: 0\n", "evaluate.samples_per_prompt: Input should be greater than 0"),
    ("evaluate:\n  samples_per_prompt: many\n", "evaluate.samples_per_prompt"),
    ("evaluate:\n  max_prompts: all\n", "evaluate.max_prompts"),
    ("evaluate:\n  max_prompts: 2.5\n", "evaluate.max_prompts"),
    ("evaluate:\n  interval: clustered\n", "evaluate.interval: Input should be 'auto', 'prompts' or 'pairs'"),
    ("reward:\n  split: prompts\n", "reward.split: Input should be 'pair' or 'prompt'"),
    ("reward:\n  split: [pair]\n", "reward.split"),
    ("evaluate:\n  judge: ''\n", "evaluate.judge: String should have at least 1 character"),
    ("evaluate:\n  judge: 3\n", "evaluate.judge: Input should be a valid string"),
    ("evaluate:\n  judge: [a, b]\n", "evaluate.judge"),
    ("gates:\n  min_judge_win_rate: 1.5\n", "gates.min_judge_win_rate: Input should be less than or equal to 1"),
    ("gates:\n  min_judge_win_rate: high\n", "gates.min_judge_win_rate"),
    ("prompts:\n  heldout_fraction: 0\n", "prompts.heldout_fraction: Input should be greater than 0"),
    ("chat:\n  template: sometimes\n", "chat.template"),
    ("prompts:\n  train: /home/me/train.txt\n  heldout: data/prompts/h.txt\ncollect:\n  simulate: false\n",
     "prompts.train: Value error, '/home/me/train.txt' is not a file under data/prompts/"),
    ("prompts:\n  train: data/prompts/../../x.txt\n  heldout: data/prompts/h.txt\ncollect:\n  simulate: false\n",
     "not a file under data/prompts/"),
    ("prompts:\n  train: data/prompts/t.csv\n  heldout: data/prompts/h.txt\ncollect:\n  simulate: false\n",
     "ends in .txt"),
    ("prompts:\n  train: data/prompts/t.txt\n  heldout: data/prompts/t.txt\ncollect:\n  simulate: false\n",
     "prompts.heldout is prompts.train"),
    ("prompts:\n  train: data/prompts/t.txt\n  heldout: data/prompts/h.txt\n",
     "with prompts.train set, set collect.simulate to false"),
])
def test_malformed_config_is_named(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("[", r"\[")):
        load_config(path)
    assert path.read_text() == text  # the user's file is left as it was


@pytest.mark.parametrize("cron", ["0 3 * * *", "*/5 * * * 1-5", "0 3 * * MON", "@daily", "0 0 31 2 *",
                                  "61 * * * *", "0 3 * *", "H * * * *", "R 1 * * *", "", "a b c d e"])
def test_cron_check_is_prefects_own(tmp_path, cron):
    """The config's cron check reads Prefect's parser without importing Prefect; it must say what
    Prefect says, and a Prefect without that parser's file is asked itself."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    from tasks.config import cron_check, valid_cron

    try:
        CronSchedule(cron=cron)
        prefect_takes_it = True
    except ValidationError:
        prefect_takes_it = False
    assert valid_cron(cron) == cron_check(tmp_path)(cron) == prefect_takes_it


def test_stages_that_load_no_model_import_no_torch_prefect_or_transformers():
    """Every stage is a process of its own: seconds of imports it never uses are paid every round."""
    code = ("import sys; import tasks.validate, tasks.promote; from tasks.config import load_config; "
            "load_config('params.yaml'); print(sorted({'torch', 'transformers', 'prefect'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("name,content,expected", [
    ("p.txt", "", "holds no prompts"),
    ("p.txt", "the doctor said\n\nthe nurse said\n", "line 2 is empty"),
    ("p.txt", "the doctor said\n   \n", "line 2 is empty"),
    ("p.jsonl", '{"prompt": "a"}\nnot json\n', "line 2 is not JSON"),
    ("p.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', 'line 2 has no "prompt" string'),
    ("p.jsonl", '{"prompt": 3}\n', 'line 1 has no "prompt" string'),
    ("p.jsonl", '["a list"]\n', 'line 1 has no "prompt" string'),
    ("p.jsonl", '{"prompt": "  "}\n', 'line 1 has no "prompt" string'),
    ("p.jsonl", '{"prompt": []}\n', "line 1: its \"prompt\" messages are not a prompt: field 'prompt' is not a list"),
    ("p.jsonl", '{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     "line 1: its \"prompt\" messages are not a prompt: the turns before the reply do not end with a user message"),
    ("p.jsonl", '{"prompt": [{"role": "tool", "content": "a"}]}\n', "has role 'tool'"),
    ("p.txt", b"caf\xe9 said\n", "not UTF-8"),
    ("p.csv", "prompt\nthe doctor said\n", "ends in .txt"),
    ("missing.txt", None, "does not exist"),
])
def test_malformed_prompts_files_are_named_by_line(tmp_path, name, content, expected):
    from tasks.prompts import PromptsError, load_prompts

    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(PromptsError, match=expected):
        load_prompts(path)


def test_prompts_files_are_read_as_written(tmp_path):
    """.txt: a prompt a line, spaces kept, Windows line ends taken off; .jsonl: the "prompt" field,
    prompts over several lines, other fields ignored (preference records serve as they are)."""
    from tasks.prompts import load_prompts

    (tmp_path / "a.txt").write_bytes(b"the doctor said\r\n  indented prompt \nlast line without newline")
    assert load_prompts(tmp_path / "a.txt") == ["the doctor said", "  indented prompt ", "last line without newline"]
    rows = [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": "x"}, {"prompt": "caf\u00e9 said", "id": 3}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert load_prompts(tmp_path / "b.jsonl") == ["\n\nHuman: hi\n\nAssistant:", "caf\u00e9 said"]
    # TRL's prompt-only conversational rows: as imports write conversations
    rows = [{"prompt": [{"role": "user", "content": "the doctor said"}]},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert load_prompts(tmp_path / "c.jsonl") == ["the doctor said", "\n\nSystem: Be brief.\n\nHuman: hi\n\nAssistant:"]


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_project_params_yaml_is_the_documented_default():
    """The project's params.yaml holds the defaults, and names every setting (each with its comment)."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    assert load_config(root / "params.yaml") == load_config(None)

    def missing(settings: dict, written: dict, prefix: str = "") -> list[str]:
        out = []
        for key, value in settings.items():
            if key not in written:
                out.append(prefix + key)
            elif isinstance(value, dict) and value and isinstance(written[key], dict):
                out += missing(value, written[key], f"{prefix}{key}.")
        return out

    written = yaml.safe_load((root / "params.yaml").read_text())
    assert missing(load_config(None).model_dump(by_alias=True), written) == []


# ---- CLI arguments ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv,expected", [
    (["run", "--rounds", "0"], "must be at least 1"),
    (["run", "--rounds", "three"], "expected a whole number"),
    (["frobnicate"], "invalid choice"),
    (["run", "--unknown-flag"], "unrecognized arguments"),
    (["gc", "--keep", "0"], "must be at least 1"),
    (["gc", "--keep", "all"], "expected a whole number"),
    (["import", "f.jsonl", "--format", "sharegpt"], "invalid choice: 'sharegpt'"),
    (["label", "--pairs", "0"], "must be at least 1"),
    (["label", "--batch-size", "two"], "expected a whole number"),
    (["label", "--timeout", "-5"], "must be at least 1"),
    (["label", "--seed", "-1"], "must be between 0 and 2147483647"),
    (["label", "--seed", "lucky"], "expected a whole number"),
])
def test_bad_cli_arguments_exit_2_with_a_message(capsys, argv, expected):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert expected in capsys.readouterr().err


def test_cli_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  steps: -4\n")
    assert main(["run", "--config", str(bad), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert "ppo.steps must be > 0" in err and "Traceback" not in err
    assert not (tmp_path / "ws").exists()  # nothing started
    # a chat template with the built-in scenario's model, which has none
    assert main(["run", "--chat-template", "--workspace", str(tmp_path / "ws")]) == 2
    assert "chat.template needs models.policy" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_cli_unknown_model_folder(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no such folder"):
        main(["run", "--policy-model", str(tmp_path / "missing-model"), "--workspace", str(tmp_path / "ws")])
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no config.json"):
        main(["run", "--reward-model", str(empty), "--workspace", str(tmp_path / "ws")])
    # --judge: a folder that is no reward model is named before any work
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "lm")
    for bad, said in [(str(tmp_path / "missing-judge"), "error: --judge .*missing-judge: no such folder"),
                      (str(empty), "error: --judge .*empty-folder: the folder holds no config.json"),
                      (str(tmp_path / "lm"), "error: --judge: judge '.*lm' is a GPT2LMHeadModel, not a reward model")]:
        with pytest.raises(SystemExit, match=said):
            main(["run", "--judge", bad, "--workspace", str(tmp_path / "ws")])
    assert not (tmp_path / "ws").exists()


def test_cli_status_outside_a_workspace(tmp_path):
    with pytest.raises(SystemExit, match="not a workspace"):
        main(["status", "--workspace", str(tmp_path)])


def test_registry_commands_refuse_what_they_cannot_do(tmp_path, capsys):
    """promote and rollback in a workspace with no round yet, and with malformed arguments: exit 2
    with the reason, and the registry unchanged."""
    from tasks.workspace import init_workspace

    root = str(init_workspace(tmp_path / "ws").root)
    for argv, said in [(["rollback"], "rlhf-policy has no previous champion to roll back to"),
                       (["compare"], "rlhf-policy has no versions yet; run a round first"),
                       (["promote", "1", "--reason", "r"], "rlhf-policy has no version or alias '1'"),
                       (["promote", "v3", "--reason", "r"], "rlhf-policy has no version or alias 'v3'"),
                       (["promote", "1", "--reason", "  "], "a manual promotion needs a reason (--reason)"),
                       (["compare", "champion", "latest"], "rlhf-policy has no version or alias 'champion'")]:
        assert main([*argv, "--workspace", root]) == 2, argv
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, (argv, err)
    with pytest.raises(SystemExit) as exit_:
        main(["promote", "1", "--workspace", root])  # --reason is required
    assert exit_.value.code == 2 and "--reason" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["rollback", "--to", "1", "--workspace", root])
    assert exit_.value.code == 2 and "unrecognized arguments: --to 1" in capsys.readouterr().err


def test_cli_entry_point_prints_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--rounds", "-1"], capture_output=True, text=True)
    assert out.returncode == 2 and "must be at least 1" in out.stderr and "Traceback" not in out.stderr


def test_a_reader_that_left_the_pipe_ends_the_command_without_a_traceback(tmp_path):
    # `rlhf status | head -1`: the reader is gone before everything is printed
    from tasks.workspace import init_workspace

    ws = init_workspace(tmp_path / "ws")
    read, write = os.pipe()
    os.close(read)
    try:
        out = subprocess.run([sys.executable, "-m", "flows.cli", "status", "--workspace", str(ws.root)],
                             stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


@pytest.mark.parametrize("command", [["status"], ["gc", "--dry-run"], ["compare"], ["compare", "--evaluate"],
                                     ["rollback", "--reason", "r"], ["promote", "1", "--reason", "r"], ["run"]])
def test_cli_names_an_unreachable_tracking_server_without_a_traceback(tmp_path, command):
    from flows.serve import free_port
    from tasks.workspace import init_workspace

    ws = init_workspace(tmp_path / "ws")
    url = f"http://127.0.0.1:{free_port()}"
    # MLflow's own retries as a user has them: about four minutes before its client gives up
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")} | {"MLFLOW_TRACKING_URI": url}
    out = subprocess.run([sys.executable, "-m", "flows.cli", *command, "--workspace", str(ws.root)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr == (f"error: MLflow ({url}): the server does not answer at {url}/health within 10 s "
                          "([Errno 111] Connection refused); start it, or unset MLFLOW_TRACKING_URI to use the "
                          "workspace's own mlflow.db\n")


def test_cli_names_a_tracking_server_that_never_answers_in_seconds(tmp_path):
    """A server that takes the connection and never answers (hung, or a firewall that drops):
    said after the 10 s probe, where MLflow's client would wait out its retries."""
    import socket
    import time

    from tasks.workspace import init_workspace

    ws = init_workspace(tmp_path / "ws")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel takes the connection; nobody ever reads or writes
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")} | {"MLFLOW_TRACKING_URI": url}
    started = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-m", "flows.cli", "status", "--workspace", str(ws.root)],
                             capture_output=True, text=True, env=env, timeout=120)
    finally:
        silent.close()
    assert out.returncode == 1 and time.monotonic() - started < 60, out.stderr[-2000:]
    assert out.stderr.startswith(f"error: MLflow ({url}): the server does not answer at {url}/health within 10 s "
                                 "(timed out)"), out.stderr


def test_rlhf_label_before_any_model_says_what_to_run_first(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "label", "--workspace", str(tmp_path / "ws")],
                         capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "error: no model to sample pairs from in " in out.stderr and "set models.policy to yours" in out.stderr
    assert "Traceback" not in out.stderr


def test_model_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_policy(str(tmp_path / "nope"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="junk"):
        load_tokenizer(str(tmp_path / "junk"))
    # a model saved without its tokenizer: transformers makes up an empty one, which reads every text as nothing
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "no-tokenizer")
    with pytest.raises(ModelLoadError, match=f"cannot load tokenizer '{tmp_path}/no-tokenizer': none is saved there "
                                             r"\(the one transformers makes up instead holds special tokens only\); "
                                             "save the model's tokenizer"):
        load_tokenizer(str(tmp_path / "no-tokenizer"))


# ---- feedback files ----------------------------------------------------------------------------
GOOD = {"prompt": "the doctor said", "chosen": " they were late .", "rejected": " he was late .",
        "source": "simulated", "annotator": "a", "round": 1, "created_at": "2026-11-22T10:00:00+00:00"}


def write_lines(path: Path, lines: list) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) if isinstance(line, dict) else line)
                    .encode("utf-8"))
            f.write(b"\n")
    return path


def variant(**kw):
    return {**GOOD, "chosen": f" they were late {len(kw)} {sorted(kw)} .", **kw}


def test_every_bad_row_is_set_aside_with_its_reason_and_line(tmp_path):
    rows = [
        GOOD,                                                  # 1 kept
        "{not json",                                           # 2
        b"\xff\xfe broken utf-8",                              # 3
        "[1, 2, 3]",                                           # 4 not an object
        variant(prompt=""),                                    # 5 empty field
        {k: v for k, v in GOOD.items() if k != "rejected"},    # 6 missing field
        variant(chosen=5),                                     # 7 wrong type
        variant(margin=float("nan")),                          # 8 NaN (json.dumps writes NaN)
        variant(chosen=" x" * 3000),                           # 9 gigantic field
        variant(rejected=" he was\x07 late ."),                # 10 control character
        {**GOOD, "chosen": " they were ready .", "rejected": " they were ready ."},  # 11 chosen == rejected
        GOOD,                                                  # 12 duplicate of line 1
        variant(source="spreadsheet"),                         # 13 unknown source
        variant(created_at="yesterday"),                       # 14 bad timestamp
        {**variant(), "label": "tie"},                          # 15 a tie: kept in raw, not a pair
    ]
    path = write_lines(tmp_path / "feedback.jsonl", rows)
    original = path.read_bytes()
    result = validate_files([path], ValidateConfig(min_rows=1, max_chars=4000), tmp_path / "gx")
    assert [r["prompt"] for r in result.accepted] == [GOOD["prompt"]]
    by_line = {q["line"]: " | ".join(q["reasons"]) for q in result.quarantined}
    expected = {2: "not JSON", 3: "not UTF-8", 4: "not a JSON object", 5: "missing or empty field 'prompt'",
                6: "missing or empty field 'rejected'", 7: "field 'chosen' is not text",
                8: "'margin' is not a finite number", 9: "'chosen' longer than max_chars",
                10: "control characters in 'rejected'", 11: "chosen equals rejected",
                12: "duplicate of an earlier pair", 13: "'source' not valid", 14: "'created_at' not valid"}
    for line, reason in expected.items():
        assert reason in by_line.get(line, ""), (line, by_line.get(line))
    assert set(by_line) == set(expected)
    assert result.not_pairs == 1
    assert len(result.accepted) + len(result.quarantined) + result.not_pairs == len(rows)  # nothing lost
    assert path.read_bytes() == original  # the raw file is preserved as received
    assert (tmp_path / "gx" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html").exists()


def test_empty_and_binary_files_give_no_rows_and_a_clear_block(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    rows, quarantined, _ = load_rows([empty, binary])
    assert rows == [] and quarantined and all(q["source_file"] == "binary.jsonl" for q in quarantined)


def test_missing_or_empty_feedback_stops_validation_with_a_clear_error(tmp_path):
    from tasks import validate
    from tasks.workspace import init_workspace

    ws = init_workspace(tmp_path / "ws")
    cfg = load_config(ws.params)
    with pytest.raises(ValidationFailed, match="no feedback to validate"):
        validate.run(ws, cfg, ws.read_state())
    (ws.raw_dir / "round-0001-import-empty.jsonl").write_bytes(b"")
    with pytest.raises(ValidationFailed, match="only 0 usable pairs"):
        validate.run(ws, cfg, ws.read_state())
    assert json.loads(ws.validation_report.read_text())["passed"] is False
    assert (ws.raw_dir / "round-0001-import-empty.jsonl").exists()


def test_a_prompt_too_long_for_the_model_is_named_before_ppo_starts():
    from transformers import GPT2Config, LlamaConfig

    from tasks.prompts import PromptsError, check_lengths

    prompts = [[1] * 5, [1] * 12, [1] * 7]
    check_lengths(prompts, 4, GPT2Config(n_positions=16))  # 12 + 4 fits exactly
    with pytest.raises(PromptsError, match="prompt 2 of data/prompts/t.txt is 12 tokens: with ppo.max_new_tokens 5 "
                                           "that exceeds the model's 16 positions"):
        check_lengths(prompts, 5, GPT2Config(n_positions=16), " of data/prompts/t.txt")
    with pytest.raises(PromptsError, match="model's 10 positions"):
        check_lengths(prompts, 1, LlamaConfig(max_position_embeddings=10))
    with pytest.raises(PromptsError, match="set validate.max_tokens to 11 to set aside longer pairs"):
        check_lengths(prompts, 5, GPT2Config(n_positions=16), " of the validated feedback's training prompts")
    with pytest.raises(PromptsError, match=r"prompt 2 is 12 tokens \(2 of the 3 are too long\): with ppo.max_new_tokens 10"):
        check_lengths(prompts, 10, GPT2Config(n_positions=16))
    check_lengths([], 10, GPT2Config(n_positions=16))  # no prompts: nothing too long
    with pytest.raises(PromptsError, match="shorten the prompts"):  # a file named so is still a file
        check_lengths(prompts, 5, GPT2Config(n_positions=16), " of data/prompts/feedback.txt")


def test_prompts_from_feedback_split_by_their_text(tmp_path):
    """Distinct prompts in first order, each on one side by a hash of its text: the same side
    whatever else the feedback holds; no feedback, or a side left empty, is named."""
    from tasks.prompts import PromptsError, feedback_prompts, held_out

    accepted = tmp_path / "accepted.jsonl"
    with pytest.raises(PromptsError, match="no validated feedback yet"):
        feedback_prompts(accepted, 0.3)
    prompts = [f"prompt {i}" for i in range(40)]
    rows = [{"prompt": p, "chosen": "a", "rejected": "b"} for p in prompts for _ in range(3)]  # 3 pairs each
    accepted.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    train, heldout = feedback_prompts(accepted, 0.3)
    assert train + heldout == sorted(prompts, key=lambda p: (held_out(p, 0.3), prompts.index(p)))
    assert 4 <= len(heldout) <= 20 and set(heldout) == {p for p in prompts if held_out(p, 0.3)}
    accepted.write_text("".join(json.dumps(r) + "\n" for r in rows[::-1][:60]))  # half of them, other order
    train2, heldout2 = feedback_prompts(accepted, 0.3)
    assert set(train2) <= set(train) and set(heldout2) <= set(heldout)
    one_side = [p for p in prompts if not held_out(p, 0.3)][:3]
    accepted.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in one_side))
    with pytest.raises(PromptsError, match="3 distinct prompts, 0 of them held out"):
        feedback_prompts(accepted, 0.3)


def test_evaluation_answers_a_fixed_sample_of_many_held_out_prompts():
    """evaluate.max_prompts: exactly that many, in their order, the same whatever the order given;
    as prompts are added, one enters the sample only by displacing one; null or few: all."""
    from tasks.prompts import sample_prompts

    prompts = [f"held-out prompt {i}" for i in range(300)]
    sample = sample_prompts(prompts, 50)
    assert len(sample) == 50 and sample == [p for p in prompts if p in set(sample)]
    assert set(sample_prompts(prompts[::-1], 50)) == set(sample)
    assert 0 < sum(int(p.split()[-1]) < 150 for p in sample) < 50  # spread, not the first 50
    grown = sample_prompts(prompts + [f"new prompt {i}" for i in range(30)], 50)
    assert len(grown) == 50 and len(set(grown) - set(sample)) == len({p for p in grown if p.startswith("new")})
    assert sample_prompts(prompts, None) == prompts and sample_prompts(prompts[:7], 50) == prompts[:7]
    # samples a prompt: as set, or about 1,024 pairs, at most 32 a prompt (the scenario's 6 prompts: 32)
    from tasks.config import EvaluateConfig
    assert [EvaluateConfig().samples_for(k) for k in (1, 6, 32, 33, 64, 180, 256, 5000)] == [32, 32, 32, 32, 16, 6, 4, 1]
    assert EvaluateConfig(samples_per_prompt=8).samples_for(256) == 8
