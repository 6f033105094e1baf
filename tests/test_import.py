"""Importers: HH-RLHF whole, round trips through every format (conversations too), malformed files,
DVC versioning."""
import bz2
import csv
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from tasks import rounds, versioning
from tasks.config import ChatConfig, ValidateConfig, load_config
from tasks.importers import (MAX_FIELD_CHARS, ImportError_, convert, decompressed, detect_format,
                             from_conversation, import_file, parse_mapping, split_dialogue)
from tasks.records import UTF8_BOM, PreferenceRecord
from tasks.validate import validate_files
from tasks.workspace import init_workspace

from conftest import FAST, HH_RLHF

needs_hh = pytest.mark.skipif(not HH_RLHF.exists(), reason=f"HH-RLHF sample not found at {HH_RLHF}")


@pytest.fixture(scope="module")
def new_workspace(tmp_path_factory):
    """A workspace as init_workspace leaves it (git, DVC, the local remote, the first commit)."""
    return init_workspace(tmp_path_factory.mktemp("new") / "ws").root


@pytest.fixture
def ws(new_workspace, tmp_path):
    """A copy of `new_workspace` for each test (a git and DVC repository copied is whole: its
    remote is relative to it); init_workspace finds it set up. Saves each test the 1.5 s that
    `git init`, `dvc init`, `dvc remote add` and the first commit take."""
    shutil.copytree(new_workspace, tmp_path / "ws", symlinks=True)
    return init_workspace(tmp_path / "ws")


def records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@needs_hh
def test_hh_rlhf_sample_imports_whole_with_prompts_split_right(ws):
    summary = import_file(ws, HH_RLHF)
    assert summary.format == "hh-rlhf"
    assert (summary.kept, summary.set_aside) == (1812, 0)
    source = [json.loads(line) for line in HH_RLHF.open(encoding="utf-8")]
    imported = records(summary.raw_file)
    last_turn_only = 0
    for rec, orig in zip(imported, source):
        assert rec["prompt"] + rec["chosen"] == orig["chosen"]
        assert rec["prompt"] + rec["rejected"] == orig["rejected"]
        # the prompt is the whole shared dialogue, up to its last Assistant turn
        common = os.path.commonprefix([orig["chosen"], orig["rejected"]])
        assert rec["prompt"] == common[:common.rfind("\n\nAssistant:") + len("\n\nAssistant:")]
        last_turn_only += "\n\nAssistant:" not in rec["chosen"] + rec["rejected"]
        assert rec["source"] == "import:hh-rlhf"
    assert last_turn_only > 0.9 * len(imported)  # most pairs differ only in the final answer
    # versioned: DVC pointer committed, data pushed, received file kept byte for byte
    assert (versioning.history(ws)[0].message.startswith("data: round 1 feedback (import-hh-rlhf, 1812 records)"))
    md5 = versioning.file_md5(summary.raw_file)
    assert (ws.root / ".dvcstore" / "files" / "md5" / md5[:2] / md5[2:]).exists()
    assert open(summary.received_file, "rb").read() == HH_RLHF.read_bytes()
    # importing the same file again adds nothing new
    again = import_file(ws, HH_RLHF)
    assert again.raw_file == summary.raw_file and len(versioning.history(ws)) == 1


def test_the_reward_eval_file_is_read_through_its_map_before_training(tiny_model_dir, tmp_path):
    """reward.eval_file in any format `rlhf import` reads, a sheet's columns through reward.eval_map;
    a file that cannot be read stops the stage before it trains, not after."""
    from tasks.stage import StageError
    from tasks.train_reward import eval_file_line, read_eval_file, train
    from tasks.versioning import file_md5

    sheet = tmp_path / "eval.csv"
    sheet.write_text("question,left,right,better\n" + "the nurse said, they left ., she left .,a\n"
                     "the chef said, he left ., they left .,B\n" + "the pilot said, x ., y .,tie\n"
                     "the ceo said, x ., y .,maybe\n")
    pairs, set_aside = read_eval_file(str(sheet), "prompt=question,a=left,b=right,choice=better")
    assert pairs == [{"prompt": "the nurse said", "chosen": " they left .", "rejected": " she left ."},
                     {"prompt": "the chef said", "chosen": " they left .", "rejected": " he left ."}]  # no tie
    assert list(set_aside.elements()) == ["'better' is 'maybe', not one of a/1 (a), b/2 (b), tie (tie), skip (skip)"]
    m = {"file": "eval.csv", "accuracy": 0.5, "n": 2, "too_long": 0, "set_aside": 1,
         "set_aside_reasons": dict(set_aside), "md5": file_md5(sheet)}
    assert m["md5"] == hashlib.md5(sheet.read_bytes()).hexdigest()
    assert eval_file_line(m) == (f"eval_file eval.csv (md5 {m['md5'][:12]}): accuracy 0.50 on 2 pairs (1 row "
                                 "could not be read: 'better' is 'maybe', not one of a/1 (a), b/2 (b), tie (tie), "
                                 "skip (skip) (1))")
    assert eval_file_line({**m, "accuracy": float("nan"), "n": 0, "too_long": 2, "set_aside": 0}) == (
        f"eval_file eval.csv (md5 {m['md5'][:12]}): no pair it could score, no accuracy (2 too long)")
    out = tmp_path / "reward"
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}))
    for overrides, error in [({"reward.eval_file": str(sheet)}, "columns prompt, chosen, rejected not found"),
                             ({"reward.eval_file": str(tmp_path / "gone.jsonl")}, "does not exist"),
                             ({"reward.eval_file": str(hh), "reward.eval_map": "prompt=question"}, "--map prompt=")]:
        cfg = load_config(None, {**FAST, **overrides})
        with pytest.raises(StageError, match=f"^reward.eval_file.*{error}"):
            train(str(tiny_model_dir), str(tiny_model_dir), [], cfg, out)
        assert not out.exists()  # stopped before anything was trained or written


def test_an_unreachable_dvc_remote_leaves_the_import_committed_and_said(ws, tmp_path, capsys):
    """A push that fails (the remote down, no credentials) stops nothing: the feedback is committed
    and in the local DVC cache, the import exits 0 with a warning that names DVC's error, and the
    next push sends it. Before, the import failed with "the round stopped" and no reason (DVC's -q
    hid its ERROR line), after committing the feedback but before keeping the received file."""
    good = tmp_path / "pairs.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"the nurse said {i}", "chosen": " they were late .",
                                        "rejected": " she was late ."}) + "\n" for i in range(6)))
    store = ws.root / ".dvcstore"
    versioning.dvc(ws, "remote", "modify", "local", "url", str(tmp_path / "missing" / "store"))
    (tmp_path / "missing").write_text("a file where the remote's parent folder should be")
    assert main(["import", str(good), "--json", "--workspace", str(ws.root)]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["pushed"] is False and summary["kept"] == 6
    assert "not pushed to the DVC remote (ERROR: " in summary["push_error"] and "Having any troubles" not in err
    assert err.startswith("warning: not pushed to the DVC remote (ERROR: ") and "`dvc push` in" in err
    assert [c.message.split(" (")[0] for c in versioning.history(ws)] == ["data: round 1 feedback"]
    assert "data: received pairs.jsonl" in versioning.git(ws, "log", "-1", "--format=%s").stdout
    md5 = versioning.file_md5(summary["raw_file"])
    assert (ws.root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).exists()  # in the local cache
    assert not (store / "files" / "md5" / md5[:2] / md5[2:]).exists()
    # the remote back: a push sends what the failed one left (a round ends with one of everything)
    versioning.dvc(ws, "remote", "modify", "local", "url", str(store))
    assert versioning.push(ws) is None
    assert (store / "files" / "md5" / md5[:2] / md5[2:]).exists()
    assert main(["import", str(good), "--workspace", str(ws.root)]) == 0  # the same file: nothing new, no warning
    assert "warning" not in capsys.readouterr().err


def test_a_remote_of_your_own_is_kept_and_a_broken_dvc_config_is_said(tmp_path, capsys):
    """A workspace whose DVC remote you set (in .dvc/config.local, where credentials go) keeps it:
    no `local` remote is added beside it, and imports push to yours. A .dvc/config DVC cannot parse
    stops the import before anything is copied, with DVC's reason."""
    root = tmp_path / "ws"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    mine = tmp_path / "my-store"
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "--local", "-d", "mine", str(mine)], cwd=root,
                   check=True)
    ws = init_workspace(root)
    assert versioning.remotes(ws) == ["mine"] and "remote" not in (root / ".dvc" / "config").read_text()
    good = tmp_path / "pairs.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"the cook said {i}", "chosen": " they left .",
                                        "rejected": " he left ."}) + "\n" for i in range(4)))
    assert main(["import", str(good), "--json", "--workspace", str(root)]) == 0
    summary = json.loads(capsys.readouterr().out)
    md5 = versioning.file_md5(summary["raw_file"])
    assert summary["pushed"] is True and (mine / "files" / "md5" / md5[:2] / md5[2:]).exists()
    (root / ".dvc" / "config").write_text("[core\nremote = mine\n")
    again = tmp_path / "more.jsonl"
    again.write_text(good.read_text().replace("cook", "pilot"))
    assert main(["import", str(again), "--workspace", str(root)]) == 1  # as any git or DVC failure
    err = capsys.readouterr().err
    assert err.startswith(f"error: git or DVC failed:\nDVC's configuration of {root} cannot be read: "
                          "config file error: Invalid line ('[core')")
    assert "Traceback" not in err and len(versioning.history(ws)) == 1
    assert not any("more" in p.name for p in (root / "data" / "feedback").rglob("*"))


HOLDER = """
import os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # as git takes its lock
print("holding", flush=True)
sys.stdin.read()  # until the test closes our stdin
os.close(fd)
os.unlink(sys.argv[1])
"""


def hold(lock):
    """A live process holding `lock` as git does (open, created exclusively) until its stdin closes."""
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "holding\n"
    return holder


def test_a_git_lock_left_by_a_killed_git_is_removed_and_the_import_committed(ws, tmp_path, capsys):
    """A git killed half way (SIGKILL, a crash) leaves .git/index.lock, and git refuses every later
    commit until someone deletes it: a scheduled loop would fail round after round, or a round on
    imported feedback at its very end. No process holds it: removed, said, and the import goes on."""
    good = tmp_path / "pairs.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"the pilot said {i}", "chosen": " they were late .",
                                        "rejected": " he was late ."}) + "\n" for i in range(4)))
    lock = ws.root / ".git" / "index.lock"
    lock.write_bytes(b"DIRC")  # what a killed `git add` leaves: part of an index
    os.utime(lock, (lock.stat().st_mtime - 3600,) * 2)
    assert main(["import", str(good), "--workspace", str(ws.root)]) == 0
    assert f"removed {lock}, left 60 min ago by a git that was stopped half way" in capsys.readouterr().err
    assert [c.message for c in versioning.history(ws)] == ["data: round 1 feedback (import-jsonl, 4 records)"]
    assert not lock.exists()
    assert versioning.free_index(ws) is None  # nothing to do


def test_a_git_lock_a_live_process_holds_is_waited_for_and_never_taken(ws, tmp_path, capsys, monkeypatch):
    """A live git (yours, your editor's) holding the lock is waited for; past the wait the import
    stops (exit 1) naming the process, and the lock stays its. Run again once it is gone, the same
    file is committed, also when a crash had left the received copy before its `dvc add`."""
    good = tmp_path / "pairs.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"the pilot said {i}", "chosen": " they were late .",
                                        "rejected": " he was late ."}) + "\n" for i in range(4)))
    lock = ws.root / ".git" / "index.lock"
    monkeypatch.setattr(versioning, "INDEX_WAIT_S", 1)
    holder = hold(lock)
    try:
        assert main(["import", str(good), "--workspace", str(ws.root)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: git or DVC failed:\n{lock} is held by {holder.pid} (") and "for over 1 s" in err
        assert lock.exists() and versioning.history(ws) == []
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not lock.exists()  # its holder removed it, as git does
    # the stopped import left the received file's copy, as a crash before its `dvc add` would
    received = ws.root / "data" / "feedback" / "received" / f"{versioning.file_md5(good)[:12]}-pairs.jsonl"
    assert received.read_bytes() == good.read_bytes() and not versioning.committed(ws, received)
    assert main(["import", str(good), "--json", "--workspace", str(ws.root)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [c.message for c in versioning.history(ws)] == ["data: round 1 feedback (import-jsonl, 4 records)"]
    assert versioning.git(ws, "status", "--porcelain", "--", "data").stdout == ""  # nothing left uncommitted
    assert summary["received_file"] == str(received)
    assert all(versioning.committed(ws, Path(summary[k])) for k in ("raw_file", "received_file"))


def test_a_running_git_commit_keeps_its_lock_and_the_pipelines_git_waits(ws, capsys):
    """A real `git commit -a` waiting on its editor holds the index lock (it does not keep it open):
    the pipeline's `git add` waits for it to end, then goes on; nothing is removed under it."""
    import threading

    (ws.root / "notes.txt").write_text("mine\n")
    versioning.git(ws, "add", "notes.txt")
    versioning.git(ws, "commit", "-q", "-m", "my notes")
    (ws.root / "notes.txt").write_text("mine, edited\n")
    env = {**os.environ, "GIT_EDITOR": "sleep 3; :", "GIT_AUTHOR_NAME": "me", "GIT_AUTHOR_EMAIL": "me@x",
           "GIT_COMMITTER_NAME": "me", "GIT_COMMITTER_EMAIL": "me@x"}
    commit = subprocess.Popen(["git", "commit", "-a"], cwd=ws.root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    lock = ws.root / ".git" / "index.lock"
    while not lock.exists():
        assert commit.poll() is None, commit.stderr.read()
    (ws.root / "more.txt").write_text("more\n")
    threading.Timer(10, commit.kill).start()  # never hangs the suite
    versioning.git(ws, "add", "more.txt")
    assert commit.wait() == 1 and "Aborting commit due to empty commit message" in commit.stderr.read()
    assert "removed" not in capsys.readouterr().err
    assert versioning.git(ws, "diff", "--cached", "--name-only").stdout.split() == ["more.txt"]


@needs_hh
def test_imported_hh_pairs_train_the_reward_model(ws, tmp_path):
    """The reward stage trains on real human feedback (a tokenizer and tiny model sized for dialogues)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from tasks.config import load_config
    from tasks.modeling import save
    from tasks.train_reward import train

    summary = import_file(ws, HH_RLHF)
    pairs = records(summary.raw_file)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([p["prompt"] + p["chosen"] for p in pairs], vocab_size=2000,
                            special_tokens=["<|endoftext|>", "<|pad|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=64, n_layer=2, n_head=2,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    base = save(model, tok, tmp_path / "hh-base")
    # an HH-RLHF file of its own (the sample's last 300 lines, untouched) for "when configured"
    eval_file = tmp_path / "hh-eval.jsonl"
    eval_file.write_bytes(b"\n".join(HH_RLHF.read_bytes().rstrip(b"\n").split(b"\n")[-300:]) + b"\n"
                          + b"{broken\n" + json.dumps({"chosen": "no turns", "rejected": "at all"}).encode() + b"\n")
    cfg = load_config(None, {"reward.epochs": 1, "reward.max_length": 512, "reward.batch_size": 16,
                             "reward.eval_file": str(eval_file)})
    metrics = train(str(base), str(base), pairs[:240], cfg, tmp_path / "hh-reward")
    # accuracy on that file, read straight from HH-RLHF's own format, every pair counted, the rows
    # that could not be read too (they were dropped without a word)
    assert metrics["eval_file"]["n"] + metrics["eval_file"]["too_long"] == 300
    assert metrics["eval_file"]["set_aside"] == 2 and metrics["eval_file"]["set_aside_reasons"] == {
        "not JSON (Expecting property name enclosed in double quotes)": 1, "no '\\n\\nAssistant:' turn in 'chosen'": 1}
    assert 0 <= metrics["eval_file"]["accuracy"] <= 1
    assert metrics["eval_file"]["md5"] == hashlib.md5(eval_file.read_bytes()).hexdigest()  # which version
    import mlflow
    assert mlflow.active_run() is None  # outside a stage, training logs nowhere and leaves no run open
    assert metrics["train"]["n"] + metrics["held_out"]["n"] + metrics["too_long"] == 240  # none lost silently
    assert metrics["too_long"] < 240 and 0 <= metrics["held_out"]["accuracy"] <= 1
    assert (tmp_path / "hh-reward" / "model.safetensors").exists()


def sample_records(n=5):
    return [PreferenceRecord(prompt=f"the pilot said {i}", chosen=f" they were late {i} .",
                             rejected=f" he was late {i} .", source="simulated", annotator="bob", round=2,
                             created_at="2026-11-01T00:00:00+00:00") for i in range(n)]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_each_format_round_trips(ws, tmp_path, fmt):
    recs = sample_records()
    rows = [json.loads(r.to_json()) for r in recs]
    path = tmp_path / f"prefs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["question", "good", "bad"])
            w.writeheader()
            w.writerows({"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows)
    else:
        pq.write_table(pa.Table.from_pylist([{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}
                                             for r in rows]), path)
    mapping = {} if fmt == "jsonl" else {"prompt": "question", "chosen": "good", "rejected": "bad"}
    summary = import_file(ws, path, "auto", mapping)
    assert summary.format == fmt and (summary.kept, summary.set_aside) == (5, 0)
    back = records(summary.raw_file)
    assert [r["id"] for r in back] == [r.id for r in recs]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in back] == \
        [(r.prompt, r.chosen, r.rejected) for r in recs]
    if fmt == "jsonl":  # our own format keeps every field
        assert back == rows


def test_a_foreign_source_becomes_the_importers_and_ours_is_kept(ws, tmp_path):
    """Another tool's `source` is not one of the contract's: kept as is, validation would set every
    row aside later; the importer's `import:jsonl` replaces it. Our own values round-trip."""
    rows = [json.loads(r.to_json()) for r in sample_records()]
    for row, source in zip(rows, ["labelbox-team", "prefect-ui", "", "import:csv", "Simulated"]):
        row["source"] = source
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = import_file(ws, path)
    assert [r["source"] for r in records(summary.raw_file)] == \
        ["import:jsonl", "prefect-ui", "import:jsonl", "import:csv", "import:jsonl"]
    result = validate_files([Path(summary.raw_file)], ValidateConfig(min_rows=1), tmp_path / "gx")
    assert len(result.accepted) == 5 and not result.quarantined


def test_bad_rows_are_set_aside_with_line_and_reason_and_cli_summarises(ws, tmp_path, capsys):
    good = [json.loads(r.to_json()) for r in sample_records(3)]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([json.dumps(good[0]).encode(), b"{broken", b"\xff\xfe\x00",
                                 json.dumps({**good[1], "chosen": None}).encode(),
                                 json.dumps({**good[1], "margin": "high"}).encode(),
                                 json.dumps(good[0]).encode(), json.dumps(good[2]).encode()]) + b"\n")
    code = main(["import", str(path), "--json", "--max-bad-fraction", "0.8", "--workspace", str(ws.root)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["failed"] is None  # 5 of 7 set aside: under the 0.8 threshold
    assert out["kept"] == 2 and out["set_aside"] == 5
    assert set(out["reasons"]) == {"not JSON (Expecting property name enclosed in double quotes)",
                                   "not UTF-8 (invalid start byte at byte 0)", "missing or empty field 'chosen'",
                                   "field 'margin' is not a finite number", "duplicate of an earlier pair in the file"}
    quarantined = records(out["quarantine_file"])
    assert sorted(q["line"] for q in quarantined) == [2, 3, 4, 5, 6]  # the duplicate's own line (it read 0)
    assert open(out["received_file"], "rb").read() == path.read_bytes()


def test_mostly_bad_file_exits_non_zero(ws, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    good = json.loads(sample_records(1)[0].to_json())
    path.write_text(json.dumps(good) + "\n" + "nope\n" * 5)
    assert main(["import", str(path), "--format", "jsonl", "--workspace", str(ws.root)]) == 1
    assert "more than --max-bad-fraction" in capsys.readouterr().err
    assert main(["import", str(path), "--format", "jsonl", "--max-bad-fraction", "0.9",
                 "--workspace", str(ws.root)]) == 0


@pytest.mark.parametrize("content,fmt,expected", [
    (b"", "auto", "is empty"),
    (bytes(range(256)), "auto", "looks binary"),
    (b'{"foo": 1}\n', "auto", "cannot tell the format"),
    (b"question,answer\nq,a\n", "csv", "columns prompt, chosen, rejected not found"),
    (b"not parquet at all", "parquet", "not a Parquet file"),
    (b"\xffprompt,chosen,rejected\nq,b,c\n", "csv", "header line is not UTF-8"),
    # mtime=0: gzip writes the time into its header, and a test id that differs between two xdist
    # workers (collecting a second apart) stops the whole run
    (gzip.compress(b'{"prompt": "p", "chosen": " a", "rejected": " b"}\n' * 50, mtime=0)[:40], "auto",
     "gzip-compressed but cannot be decompressed"),
    (b"PK\x03\x04" + bytes(40), "auto", "a zip archive: unpack it"),
    (b"[1, 2]", "auto", "a JSON array with no object in it"),
    (b"\x28\xb5\x2f\xfd" + bytes(40), "auto", "zstd-compressed: decompress it first"),
    (b'{"prompt": "p", "chosen": "\xff a", "rejected": " b"}\n', "auto",
     "no line of it is a JSON object (line 1: not UTF-8 (invalid start byte at byte 27))"),
    (b'[1, 2]\n{"prompt": "p", "chosen": " a", "rejected": " b"}\n', "auto",
     "not valid JSON (Extra data at line 2); if it is JSON lines, pass --format"),
    # its first object tells the format, the reader finds the rest is not one array
    (b'[{"prompt": "p", "chosen": " a", "rejected": " b"}]\n[{"prompt": "q", "chosen": " a", "rejected": " b"}]\n',
     "auto", "not valid JSON (Extra data at line 2)"),
])
def test_unreadable_files_give_a_clear_error_exit_2(ws, tmp_path, capsys, content, fmt, expected):
    path = tmp_path / ("f.parquet" if fmt == "parquet" else "f.csv" if fmt == "csv" else "f.jsonl")
    path.write_bytes(content)
    assert main(["import", str(path), "--format", fmt, "--workspace", str(ws.root)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert versioning.raw_files(ws) == []  # nothing half-imported


def test_bad_map_and_missing_file(ws, tmp_path, capsys):
    assert main(["import", str(tmp_path / "none.jsonl"), "--workspace", str(ws.root)]) == 2
    assert "does not exist" in capsys.readouterr().err
    path = tmp_path / "x.csv"
    path.write_text("a,b,c\n1,2,3\n")
    assert main(["import", str(path), "--map", "prompt", "--workspace", str(ws.root)]) == 2
    assert "bad --map entry" in capsys.readouterr().err
    for bad, expected in [("a=a,b=b", "a=, b= and choice= go together (the two responses and which won); missing choice"),
                          ("a=a,b=b,choice=c,chosen=c", "either chosen= and rejected=, or a=, b= and choice=, not both"),
                          ("a=a,b=b,choice=d", "columns prompt, d (for choice) not found; the file has a, b, c"),
                          ("winner=c", "bad --map entry 'winner=c'"),
                          ("a=a,b=b,choice=c,choice_a=0,choice_b=1|0",
                           "the choice value '0' is given for both choice_a and choice_b"),
                          ("prompt=a,chosen=b,rejected=c,choice_b=0",
                           "choice_b= give the values of the choice column: map it too")]:
        assert main(["import", str(path), "--map", bad, "--workspace", str(ws.root)]) == 2
        assert expected in capsys.readouterr().err
    with pytest.raises(SystemExit, match="max-bad-fraction"):
        main(["import", str(path), "--max-bad-fraction", "2", "--workspace", str(ws.root)])


def as_tools_write_it(rows: list[dict], variant: str) -> tuple[str, bytes]:
    """The same pairs as a file name and bytes, written the way some tool writes them."""
    jsonl = "".join(json.dumps(r) + "\n" for r in rows).encode()

    def table(sep: str) -> bytes:
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=["prompt", "chosen", "rejected"], delimiter=sep, extrasaction="ignore",
                           lineterminator="\r\n")
        w.writeheader()
        w.writerows(rows)
        return out.getvalue().encode()

    return {"jsonl with a byte order mark": ("prefs.jsonl", UTF8_BOM + jsonl),
            "a JSON array (json.dump)": ("prefs.json", json.dumps(rows, indent=2).encode()),
            "a JSON array, gzip": ("prefs.json.gz", gzip.compress(json.dumps(rows).encode())),
            "Excel's CSV UTF-8": ("prefs.csv", UTF8_BOM + table(",")),
            "semicolons": ("prefs.csv", table(";")),
            "tabs, .tsv": ("prefs.tsv", table("\t")),
            "tabs, .csv": ("prefs.csv", table("\t")),
            "gzip": ("prefs.jsonl.gz", gzip.compress(jsonl)),
            "bzip2": ("prefs.jsonl.bz2", bz2.compress(jsonl)),
            "xz": ("prefs.jsonl.xz", lzma.compress(jsonl)),
            "gzip tsv": ("prefs.tsv.gz", gzip.compress(table("\t"))),
            "gzip, no suffix": ("prefs", gzip.compress(jsonl))}[variant]


@pytest.fixture(scope="module")
def one_ws(tmp_path_factory):
    return init_workspace(tmp_path_factory.mktemp("one") / "ws")


@pytest.mark.parametrize("variant", ["jsonl with a byte order mark", "a JSON array (json.dump)",
                                     "a JSON array, gzip", "Excel's CSV UTF-8", "semicolons", "tabs, .tsv",
                                     "tabs, .csv", "gzip", "bzip2", "xz", "gzip tsv", "gzip, no suffix"])
def test_files_as_tools_write_them_read_as_the_plain_file(one_ws, tmp_path, variant):
    """Byte order marks, other separators and compression: the same pairs as from the plain file.
    Three of them all the way (DVC, the file kept as it came, `rlhf validate`); the rest as far as
    the rows read (versioning is the same for every file)."""
    recs = sample_records()
    name, data = as_tools_write_it([json.loads(r.to_json()) for r in recs], variant)
    path = tmp_path / name
    path.write_bytes(data)
    fmt = "csv" if variant in ("Excel's CSV UTF-8", "semicolons") or "tabs" in variant or "tsv" in variant else "jsonl"
    if variant not in ("a JSON array, gzip", "Excel's CSV UTF-8", "gzip"):
        with decompressed(path, tmp_path) as readable:
            assert detect_format(readable) == fmt
            summary = convert(readable, fmt, {}, 1, tmp_path / "kept.jsonl", tmp_path / "bad.jsonl", name=path.name)
        assert (summary.kept, summary.set_aside) == (5, 0)
        assert [r["id"] for r in records(tmp_path / "kept.jsonl")] == [r.id for r in recs]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "kept.jsonl", "bad.jsonl"])  # no copy left
        return
    ws = one_ws
    summary = import_file(ws, path)
    assert (summary.kept, summary.set_aside) == (5, 0) and summary.source_file == str(path) and summary.format == fmt
    back = records(summary.raw_file)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in back] == [(r.prompt, r.chosen, r.rejected) for r in recs]
    assert [r["id"] for r in back] == [r.id for r in recs]
    assert open(summary.received_file, "rb").read() == data
    assert not list((ws.root / ".cache").iterdir())  # no decompressed copy left behind
    if variant != "gzip":  # `rlhf validate` converts CSV and JSON arrays to records and checks those
        assert main(["validate", str(path), "--workspace", str(ws.root), "--out", str(tmp_path / "v"), "--json"]) == 1
        assert validate_report(tmp_path / "v")["quarantined"] == 0  # only too few rows (5) block it


def validate_report(out: Path) -> dict:
    return json.loads((out / "validation.json").read_text())


@needs_hh
def test_hh_rlhf_as_published_gzip_imports_and_validates(ws, tmp_path, capsys):
    """Hugging Face's Anthropic/hh-rlhf ships train.jsonl.gz: imported and validated as the plain file."""
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(HH_RLHF.read_bytes()))
    summary = import_file(ws, path)
    assert summary.format == "hh-rlhf" and (summary.kept, summary.set_aside) == (1812, 0)
    first = json.loads(HH_RLHF.open(encoding="utf-8").readline())
    rec = records(summary.raw_file)[0]
    assert rec["prompt"] + rec["chosen"] == first["chosen"]
    assert main(["validate", str(path), "--workspace", str(ws.root), "--out", str(tmp_path / "v"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accepted"] == 1812


def test_csv_rows_too_long_or_not_utf8_are_set_aside_at_the_line_they_start(ws, tmp_path, capsys):
    """Python's csv stops a whole file at a 128 KiB field, and a file that is not UTF-8 at its first
    odd byte: each is one bad row here, set aside with the line it starts on, as in JSON lines."""
    path = tmp_path / "export.csv"
    path.write_bytes(b"prompt,chosen,rejected\n"
                     b"p1, a, b\n"
                     b'p2,"two\nlines", b\n'  # lines 3-4
                     b"p3, " + b"x" * 150_000 + b", b\n"  # line 5
                     b"p4, caf\xe9, b\n"  # line 6: Latin-1
                     b"p5, c, d\n")
    code = main(["import", str(path), "--json", "--workspace", str(ws.root)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and (out["kept"], out["set_aside"]) == (3, 2)
    quarantined = {q["line"]: q for q in records(out["quarantine_file"])}
    assert quarantined[5]["reasons"] == [f"field 'chosen' longer than {MAX_FIELD_CHARS} characters"]
    assert quarantined[6]["reasons"] == ["not UTF-8 text; re-export the file as UTF-8"]
    assert "caf\ufffd" in quarantined[6]["record"] and quarantined[6]["source_file"] == "export.csv"
    assert [r["prompt"] for r in records(out["raw_file"])] == ["p1", "p2", "p5"]


def test_a_json_array_sets_aside_its_items_that_are_not_objects_by_position(ws, tmp_path):
    rows = [json.loads(r.to_json()) for r in sample_records(3)]
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([rows[0], 5, rows[1], ["x"], rows[2]]))
    summary = import_file(ws, path)
    assert (summary.kept, summary.set_aside) == (3, 2)
    assert [(q["line"], q["reasons"], q["record"]) for q in records(summary.quarantine_file)] == \
        [(2, ["not a JSON object (a int)"], "5"), (4, ["not a JSON object (a list)"], '["x"]')]


def test_a_dry_run_shows_what_the_import_would_keep_and_writes_nothing(ws, tmp_path, capsys):
    """`rlhf import --dry-run` reads and checks a file as the import does and prints the same
    counts, the rows it would set aside by line, and the first pairs as they would be imported (to
    see which response a --map makes chosen), and writes nothing: not to a workspace that exists,
    and no workspace where none does. The import after it keeps the same records."""
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("question,resp_a,resp_b,winner\n"
                     "the nurse said, they were late ., she was late .,A\n"
                     "the pilot said, he left ., they left .,B\n"
                     "the cook said, they cooked ., he cooked .,tie\n"
                     "the judge said,, x,A\n")
    mapping = "prompt=question,a=resp_a,b=resp_b,choice=winner"

    def snapshot():
        return sorted((str(p.relative_to(ws.root)), p.stat().st_mtime_ns) for p in ws.root.rglob("*") if p.is_file())

    before = snapshot()
    assert main(["import", str(sheet), "--map", mapping, "--dry-run", "--workspace", str(ws.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:5] == [f"{sheet}: format csv; dry run, nothing imported: would keep 3, set aside 1",
                       "       1  missing or empty field 'chosen'",
                       "  set aside: line 5: missing or empty field 'chosen'",
                       "the first 3 kept, as they would be imported:",
                       "  prompt 'the nurse said'  chosen ' they were late .'  rejected ' she was late .'"]
    assert out[5] == "  prompt 'the pilot said'  chosen ' they left .'  rejected ' he left .'"  # B won
    assert out[6] == "  prompt 'the cook said'  chosen ' they cooked .'  rejected ' he cooked .'  (tie)"
    assert snapshot() == before and versioning.history(ws) == []
    # --json: the summary's fields, with the examples; a file mostly set aside fails as the import would
    assert main(["import", str(sheet), "--map", mapping, "--dry-run", "--json", "--max-bad-fraction", "0.2",
                 "--workspace", str(ws.root)]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["dry_run"] is True and summary["raw_file"] is None and summary["pushed"] is False
    assert summary["failed"] == "1 of 4 rows set aside, more than --max-bad-fraction=0.2"
    assert summary["set_aside_examples"] == [{"line": 5, "reasons": ["missing or empty field 'chosen'"]}]
    assert [(r["chosen"], r["label"]) for r in summary["examples"]] == [
        (" they were late .", "pair"), (" they left .", "pair"), (" they cooked .", "tie")]
    assert snapshot() == before
    # no workspace there: none is made; a file it cannot read is the import's error, exit 2
    nowhere = tmp_path / "no-workspace"
    assert main(["import", str(sheet), "--map", mapping, "--dry-run", "--workspace", str(nowhere)]) == 0
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main(["import", str(binary), "--dry-run", "--workspace", str(nowhere)]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not nowhere.exists()
    # the import itself keeps what the dry run showed
    assert main(["import", str(sheet), "--map", mapping, "--json", "--workspace", str(ws.root)]) == 0
    imported = json.loads(capsys.readouterr().out)
    assert imported["kept"] == 3 and [r["id"] for r in records(imported["raw_file"])] == [
        r["id"] for r in summary["examples"]]


def test_two_responses_and_a_column_saying_which_won_become_pairs(ws, tmp_path, capsys):
    """A spreadsheet's layout (prompt, response A, response B, which was better): --map a=,b=,choice=.
    The choice reads a/1, b/2, tie, skip in any case; anything else is set aside, saying so."""
    path = tmp_path / "sheet.csv"
    path.write_text("question,left,right,better,who\n"
                    "q1, l1, r1,A,ann\nq2, l2, r2,b,bo\nq3, l3, r3,2,ann\nq4, l4, r4,Tie,ann\nq5, l5, r5,skip,ann\n"
                    "q6, l6, r6,maybe,ann\nq7, l7, r7,,ann\n")
    mapping = "prompt=question,a=left,b=right,choice=better"
    assert main(["import", str(path), "--map", mapping + ",annotator=who", "--json", "--workspace", str(ws.root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["kept"], out["set_aside"]) == (5, 2)
    assert out["reasons"] == {"'better' is 'maybe', not one of a/1 (a), b/2 (b), tie (tie), skip (skip)": 1,
                              "'better' is '', not one of a/1 (a), b/2 (b), tie (tie), skip (skip)": 1}
    assert [(r["prompt"], r["chosen"], r["rejected"], r["label"]) for r in records(out["raw_file"])] == [
        ("q1", " l1", " r1", "pair"), ("q2", " r2", " l2", "pair"), ("q3", " r3", " l3", "pair"),
        ("q4", " l4", " r4", "tie"), ("q5", " l5", " r5", "skip")]
    assert [r["annotator"] for r in records(out["raw_file"])] == ["ann", "bo", "ann", "ann", "ann"]  # annotator=who
    assert out["run_together"] == 0  # every response starts with a space
    assert [q["line"] for q in records(out["quarantine_file"])] == [7, 8]
    # Parquet and JSON lines alike; numbers as a column of numbers store them (1, 2.0)
    rows = [{"question": f"p{i}", "left": f" l{i}", "right": f" r{i}", "better": w} for i, w in enumerate([1, 2.0, 2])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sheet.parquet")
    (tmp_path / "sheet.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("sheet.parquet", "sheet.jsonl"):
        summary = import_file(ws, tmp_path / name, "auto", parse_mapping(mapping))
        assert summary.format == name.split(".")[1] and (summary.kept, summary.set_aside) == (3, 0)
        assert [r["chosen"] for r in records(summary.raw_file)] == [" l0", " r1", " r2"]
    # a dataset's own values: SHP's labels (1: A preferred, 0: B), PKU-SafeRLHF's better_response_id (0, 1)
    shp, pku = tmp_path / "shp.csv", tmp_path / "pku.csv"
    shp.write_text("history,human_ref_A,human_ref_B,labels\nq1, a1, b1,1\nq2, a2, b2,0\nq3, a3, b3,2\n")
    pku.write_text("prompt,response_0,response_1,better_response_id\nq1, a1, b1,0\nq2, a2, b2,1\n")
    summary = import_file(ws, shp, "auto", parse_mapping("prompt=history,a=human_ref_A,b=human_ref_B,choice=labels,"
                                                         "choice_b=0"))
    assert [r["chosen"] for r in records(summary.raw_file)] == [" a1", " b2"]
    assert summary.reasons == {"'labels' is '2', not one of a/1 (a), 0 (b), tie (tie), skip (skip)": 1}
    summary = import_file(ws, pku, "auto", parse_mapping("a=response_0,b=response_1,choice=better_response_id,"
                                                         "choice_a=0,choice_b=1"))
    assert [r["chosen"] for r in records(summary.raw_file)] == [" a1", " b2"] and summary.set_aside == 0
    # Chatbot Arena: two conversations and the winner, as words; a multi-turn pair whose earlier
    # replies differ too is set aside with its reason (one reply must differ, after a shared prompt)
    def conv(*turns):
        return [{"role": role, "content": text} for pair in turns for role, text in zip(("user", "assistant"), pair)]
    arena = tmp_path / "arena.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"winner": "model_b", "conversation_a": conv(("2+2?", "5")), "conversation_b": conv(("2+2?", "4"))},
        {"winner": "tie (bothbad)", "conversation_a": conv(("x", "y")), "conversation_b": conv(("x", "z"))},
        {"winner": "model_a", "conversation_a": conv(("q", "a"), ("q2", "a2")),
         "conversation_b": conv(("q", "b"), ("q2", "b2"))}]), arena)
    summary = import_file(ws, arena, "auto", parse_mapping("a=conversation_a,b=conversation_b,choice=winner,"
                                                           "choice_a=model_a,choice_b=model_b,choice_tie=tie|tie (bothbad)"))
    assert [(r["prompt"], r["chosen"], r["rejected"], r["label"]) for r in records(summary.raw_file)] == [
        ("2+2?", "4", "5", "pair"), ("x", "y", "z", "tie")]
    assert summary.set_aside == 1 and "does not end in one assistant reply" in next(iter(summary.reasons))
    assert summary.run_together == 2  # "2+2?" + "4": turns of a chat, run together as plain text
    with pytest.raises(ImportError_, match="--map a=,b=,choice= reads jsonl, csv, parquet files; .* is argilla"):
        (tmp_path / "argilla.jsonl").write_text(json.dumps({"fields": {}, "responses": []}) + "\n")
        import_file(ws, tmp_path / "argilla.jsonl", "auto", parse_mapping(mapping))


def test_json_lines_with_their_own_field_names_are_told_apart_through_the_map(ws, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"question": r.prompt, "good": r.chosen, "bad": r.rejected}) + "\n"
                            for r in sample_records(3)))
    with pytest.raises(ImportError_, match="cannot tell the format"):
        import_file(ws, path)
    summary = import_file(ws, path, "auto", parse_mapping("prompt=question,chosen=good,rejected=bad"))
    assert summary.format == "jsonl" and summary.kept == 3
    assert {r["annotator"] for r in records(summary.raw_file)} == {"unknown"}
    with pytest.raises(ImportError_, match="--map annotator= reads jsonl, conversational, csv, parquet files; .* is hh-rlhf"):
        (tmp_path / "hh.jsonl").write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b",
                                                       "rejected": "\n\nHuman: a\n\nAssistant: c"}) + "\n")
        import_file(ws, tmp_path / "hh.jsonl", "auto", parse_mapping("annotator=who"))


def test_several_files_import_one_by_one_and_one_unreadable_stops_none_of_the_others(ws, tmp_path, capsys):
    rows = [json.loads(r.to_json()) for r in sample_records(6)]
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"train-{i:05d}-of-00003.parquet")
        pq.write_table(pa.Table.from_pylist(rows[2 * i:2 * i + 2]), shards[-1])
    (tmp_path / "empty.jsonl").write_text("")
    code = main(["import", str(shards[0]), str(tmp_path / "empty.jsonl"), str(tmp_path), *map(str, shards[1:]),
                 "--json", "--workspace", str(ws.root)])
    captured = capsys.readouterr()
    out = [json.loads(line) for line in captured.out.splitlines()]  # a line per file imported
    assert code == 2 and [(o["source_file"], o["kept"]) for o in out] == [(str(s), 2) for s in shards]
    assert "empty.jsonl is empty: nothing to import" in captured.err
    assert f"{tmp_path} is a folder: name its files (rlhf import {tmp_path}/*.jsonl)" in captured.err
    assert len(versioning.raw_files(ws)) == 3


def test_pairs_a_plain_model_would_read_run_together_are_said(ws, tmp_path, capsys):
    path = tmp_path / "sheet.csv"
    path.write_text("prompt,chosen,rejected\nthe pilot said,they were late .,he was late .\n"
                    "the nurse said, they are busy ., she is busy .\n")
    assert main(["import", str(path), "--workspace", str(ws.root)]) == 0
    assert ("note: in 1 of the 2 kept pairs the prompt and a response meet with no space or newline between them"
            in capsys.readouterr().out)
    rounds.write_params(ws, load_config(None, {"chat.template": True, "models.policy": "some/chat-model"}))
    path.write_text(path.read_text() + "the cook said,they were out .,he was out .\n")  # another file
    assert main(["import", str(path), "--workspace", str(ws.root)]) == 0
    assert "run together" not in capsys.readouterr().out  # a chat template keeps them apart


def test_csv_row_with_extra_cells_is_set_aside(ws, tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("prompt,chosen,rejected\np, a, b\np2, a2, b2, surplus\n")
    summary = import_file(ws, path)
    assert (summary.kept, summary.set_aside) == (1, 1)
    assert "more cells than the header" in next(iter(summary.reasons))


def test_split_dialogue_edge_cases():
    assert split_dialogue("\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hi\n\nAssistant: b") == \
        ("\n\nHuman: hi\n\nAssistant:", " a", " b")
    assert "no '\\n\\nAssistant:'" in split_dialogue("just text", "other")
    # rejected ends earlier: the prompt is the shared dialogue up to the last common Assistant turn
    p, c, r = split_dialogue("\n\nHuman: q\n\nAssistant: x\n\nHuman: more\n\nAssistant: y",
                             "\n\nHuman: q\n\nAssistant: z")
    assert p == "\n\nHuman: q\n\nAssistant:" and c.startswith(" x") and r == " z"


def test_data_history_lists_versions(ws, tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(r.to_json() + "\n" for r in sample_records(2)))
    import_file(ws, path)
    assert main(["data", "history", "--json", "--workspace", str(ws.root)]) == 0
    versions = json.loads(capsys.readouterr().out)
    assert len(versions) == 1 and versions[0]["files"][0].startswith("data/feedback/raw/round-0001-import-jsonl-")
    # and dvc can bring that version back after the working copy is lost
    raw = ws.root / versions[0]["files"][0]
    raw.unlink()
    subprocess.run(["rm", "-rf", str(ws.root / ".dvc" / "cache")], check=True)
    versioning.dvc(ws, "pull", "-q", versions[0]["files"][0] + ".dvc")
    assert len(records(raw)) == 2


def test_label_studio_pairwise_export(ws, tmp_path):
    tasks = [
        {"id": 1, "data": {"prompt": "the nurse said", "answer1": " they were late .", "answer2": " she was late ."},
         "annotations": [{"completed_by": 7, "created_at": "2026-11-20T10:00:00Z",
                          "result": [{"type": "pairwise", "value": {"selected": "left"}}]},
                         {"completed_by": 8, "result": [{"type": "pairwise", "value": {"selected": "right"}}]}]},
        {"id": 2, "data": {"prompt": "the pilot said", "answer1": " he was ready .", "answer2": " they were ready ."},
         "annotations": []},
        {"id": 3, "data": {"prompt": "the chef said", "answer1": " a .", "answer2": " b ."},
         "annotations": [{"completed_by": 7, "result": [{"type": "choices", "value": {"choices": ["x"]}}]}]},
    ]
    path = tmp_path / "label-studio-export.json"
    path.write_text(json.dumps(tasks))
    summary = import_file(ws, path)
    assert summary.format == "label-studio" and (summary.kept, summary.set_aside) == (2, 2)
    recs = records(summary.raw_file)
    assert (recs[0]["chosen"], recs[0]["annotator"]) == (" they were late .", "label-studio:7")
    assert recs[1]["chosen"] == " she was late ." and recs[0]["source"] == "import:label-studio"
    assert set(summary.reasons) == {"task has no annotation", "annotation has no pairwise choice (left or right)"}


def test_a_json_arrays_format_is_told_by_its_first_object_read_once(tmp_path):
    """The first object of a JSON array tells its format, read from the file's first 64 KiB where it
    ends there (the reader then parses the file, once), else from the whole file: a first task
    longer than that, or a first item that is not an object."""
    from tasks.importers import _first_item, _head, detect_format

    path = tmp_path / "export.json"
    task = {"id": 1, "data": {"prompt": "the nurse said", "answer1": " a .", "answer2": " b ."}, "annotations": []}
    for first_id in (1, 10):  # the head's end cuts a two-byte character in one of the two
        long = {**task, "id": 2, "data": {**task["data"], "prompt": "é" * 40_000}}
        path.write_text(json.dumps([{**task, "id": first_id}, long], ensure_ascii=False), encoding="utf-8")
        assert _first_item(_head(path)) == {**task, "id": first_id} and detect_format(path) == "label-studio"
    path.write_text(json.dumps([{**task, "data": {**task["data"], "prompt": "é" * 40_000}}], ensure_ascii=False))
    assert _first_item(_head(path)) is None and detect_format(path) == "label-studio"
    path.write_text(json.dumps([1, {"prompt": "p", "chosen": " a", "rejected": " b"}]))
    assert _first_item(_head(path)) == 1 and detect_format(path) == "jsonl"


def test_argilla_ranking_export(ws, tmp_path):
    rows = [
        {"fields": {"prompt": "the ceo said", "response1": " he was late .", "response2": " they were late .",
                    "response3": " they was late ."},
         "responses": [{"user_id": "u1", "status": "submitted", "values": {"ranking": {"value": [
             {"value": "response2", "rank": 1}, {"value": "response1", "rank": 2}, {"value": "response3", "rank": 3}]}}},
             {"user_id": "u2", "status": "discarded", "values": {}}]},
        {"fields": {"prompt": "the cashier said"}, "responses": []},
    ]
    path = tmp_path / "argilla.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = import_file(ws, path)
    assert summary.format == "argilla" and (summary.kept, summary.set_aside) == (2, 1)
    recs = records(summary.raw_file)
    assert [(r["chosen"], r["rejected"]) for r in recs] == [(" they were late .", " he was late ."),
                                                             (" they were late .", " they was late .")]
    assert recs[0]["annotator"] == "argilla:u1"
    bad = tmp_path / "bad.json"
    bad.write_text('[{"neither": 1}]')
    with pytest.raises(ImportError_, match=r"cannot tell the format from keys \['neither'\]; pass --format"):
        import_file(ws, bad)


def test_a_map_key_the_format_does_not_read_is_refused_and_hh_dialogues_renamed_are_read(ws, tmp_path, capsys):
    """HH-RLHF, Label Studio and Argilla name their own fields: a --map key one of them does not
    read is refused, naming what it reads; it was ignored, the file imported as if unmapped.
    HH-RLHF's two dialogues under names of their own (a copy with its columns renamed) are read
    through chosen= and rejected=."""
    from flows.cli import FORMAT_CHOICES, main
    from tasks.importers import FORMATS, OWN_FIELDS_FORMATS

    assert FORMAT_CHOICES == FORMATS  # the CLI's copy (importers is not imported to build the parser)
    assert OWN_FIELDS_FORMATS == ("hh-rlhf", "label-studio", "argilla")
    hh = tmp_path / "hh-renamed.jsonl"
    hh.write_text("".join(json.dumps({"better": f"\n\nHuman: q{i}\n\nAssistant: good {i}",
                                      "worse": f"\n\nHuman: q{i}\n\nAssistant: bad {i}"}) + "\n" for i in range(3)))
    with pytest.raises(ImportError_, match="cannot tell the format"):
        import_file(ws, hh)
    summary = import_file(ws, hh, "auto", parse_mapping("chosen=better,rejected=worse"))
    assert summary.format == "hh-rlhf" and (summary.kept, summary.set_aside) == (3, 0)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in records(summary.raw_file)][1] == (
        "\n\nHuman: q1\n\nAssistant:", " good 1", " bad 1")
    with pytest.raises(ImportError_, match=r"^--map prompt=: .*hh-renamed.jsonl is hh-rlhf, which has no such field "
                                           r"to name; hh-rlhf files read chosen=, rejected= from --map$"):
        import_file(ws, hh, "auto", parse_mapping("prompt=question,chosen=better,rejected=worse"))
    argilla = tmp_path / "argilla.jsonl"
    argilla.write_text(json.dumps({"fields": {"q": "the ceo said", "r1": " a .", "r2": " b ."}, "responses": []}) + "\n")
    with pytest.raises(ImportError_, match=r"--map chosen=, rejected=: .* is argilla, .*; argilla files read prompt= "):
        import_file(ws, argilla, "auto", parse_mapping("prompt=q,chosen=r1,rejected=r2"))
    capsys.readouterr()
    assert main(["import", str(hh), "--map", "prompt=question,chosen=better,rejected=worse",
                 "--workspace", str(ws.root)]) == 2
    out, err = capsys.readouterr()
    assert "--map prompt=:" in err and "Traceback" not in out + err
    assert len(versioning.history(ws)) == 1  # the refused imports wrote nothing


def test_concurrent_imports_never_clobber_each_other(ws, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    paths = []
    for i in range(4):
        p = tmp_path / f"batch-{i}.jsonl"
        p.write_text("".join(r.to_json() + "\n" for r in sample_records(3 + i)))
        paths.append(p)
    with ThreadPoolExecutor(4) as pool:
        summaries = list(pool.map(lambda p: import_file(ws, p), paths))
    assert len({s.raw_file for s in summaries}) == 4
    assert [len(records(s.raw_file)) for s in summaries] == [3, 4, 5, 6]
    assert len(versioning.history(ws)) == 4
    assert git_clean(ws)


def git_clean(ws):
    return subprocess.run(["git", "status", "--porcelain"], cwd=ws.root, capture_output=True, text=True).stdout == ""


# ---- conversations (TRL's conversational preference format, ShareGPT) ---------------------------
def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Answer in one sentence."}
DIALOGUE = [SYSTEM, user("What is DVC?"), bot("A data version control tool."), user("And MLflow?")]


@pytest.mark.parametrize("row,prompt", [
    # implicit prompt (trl-lib/hh-rlhf-helpful-base): two whole conversations, the last reply differs
    ({"chosen": [user("hi"), bot("Hello!")], "rejected": [user("hi"), bot("go away")]}, "hi"),
    # explicit prompt (TRL's documented form)
    ({"prompt": [user("hi")], "chosen": [bot("Hello!")], "rejected": [bot("go away")]}, "hi"),
    # explicit prompt repeated in front of each reply
    ({"prompt": [user("hi")], "chosen": [user("hi"), bot("Hello!")], "rejected": [user("hi"), bot("go away")]}, "hi"),
    # UltraFeedback binarized: the prompt as text too
    ({"prompt": "hi", "chosen": [user("hi"), bot("Hello!")], "rejected": [user("hi"), bot("go away")]}, "hi"),
    # the prompt as text, bare replies as messages; a single message written as an object
    ({"prompt": "hi", "chosen": bot("Hello!"), "rejected": [bot("go away")]}, "hi"),
    # ShareGPT's keys, content as text parts
    ({"chosen": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "Hello!"}],
      "rejected": [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "go away"}]}]}, "hi"),
    # earlier turns and a system message: a dialogue in HH-RLHF's form
    ({"chosen": DIALOGUE + [bot("Experiment tracking.")], "rejected": DIALOGUE + [bot("go away")]},
     "\n\nSystem: Answer in one sentence.\n\nHuman: What is DVC?\n\nAssistant: A data version control tool."
     "\n\nHuman: And MLflow?\n\nAssistant:"),
], ids=["implicit", "explicit", "explicit-repeated", "ultrafeedback", "bare-replies", "sharegpt-parts", "dialogue"])
def test_conversation_layouts_become_records(row, prompt):
    texts = from_conversation(row.get("prompt"), row["chosen"], row["rejected"])
    assert texts["prompt"] == prompt and texts["rejected"] == "go away"
    assert texts["chosen"] in ("Hello!", "Experiment tracking.")


def test_an_imported_dialogue_renders_as_the_conversation_it_came_from():
    """What the chat template gets from the record equals the original conversation, system turn included;
    the record's own system turn replaces chat.system_prompt."""
    texts = from_conversation(None, DIALOGUE + [bot("Experiment tracking.")], DIALOGUE + [bot("go away")])
    chat = ChatConfig(template=True, hh_dialogue=True)
    assert chat.messages(texts["prompt"], texts["chosen"]) == DIALOGUE + [bot("Experiment tracking.")]
    with_system = ChatConfig(template=True, hh_dialogue=True, system_prompt="Be terse.")
    assert with_system.messages(texts["prompt"]) == DIALOGUE
    assert with_system.messages("hi") == [{"role": "system", "content": "Be terse."}, user("hi")]
    # an HH-RLHF prompt that merely mentions "System:" later is read as before
    assert chat.messages("\n\nHuman: a\n\nSystem: b\n\nAssistant:") == [user("a\n\nSystem: b")]


BAD_CONVERSATIONS = [
    ({"chosen": [user("q"), bot("x")], "rejected": [user("q"), bot("x")]}, "'chosen' and 'rejected' are the same"),
    ({"chosen": [user("q"), bot("x"), user("more"), bot("y")], "rejected": [user("q"), bot("z")]},
     "'chosen' does not end in one assistant reply after the turns it shares with the other side (3 messages"),
    ({"chosen": [user("q"), user("x")], "rejected": [user("q"), bot("z")]}, "'chosen' does not end in one assistant"),
    ({"chosen": [user("a"), bot("x")], "rejected": [user("b"), bot("z")]}, "(2 messages after them: user, assistant)"),
    ({"chosen": [user("q"), SYSTEM, user("r"), bot("x")], "rejected": [user("q"), SYSTEM, user("r"), bot("z")]},
     "a system message after the first turn"),
    ({"prompt": [user("q"), bot("a")], "chosen": [bot("x")], "rejected": [bot("z")]},
     "do not end with a user message"),
    ({"prompt": "something else", "chosen": [user("q"), bot("x")], "rejected": [user("q"), bot("z")]},
     "field 'prompt' is not the conversation's last user message"),
    ({"chosen": [user("q\n\nAssistant: sneaky"), bot("a"), user("r"), bot("x")],
      "rejected": [user("q\n\nAssistant: sneaky"), bot("a"), user("r"), bot("z")]},
     "cannot be written as a dialogue that reads back the same"),
    ({"chosen": [bot("welcome"), user("r"), bot("x")], "rejected": [bot("welcome"), user("r"), bot("z")]},
     "it must open with a user message"),
    ({"chosen": [{"role": "tool", "content": "42"}, bot("x")], "rejected": [user("q"), bot("z")]},
     "message 0 of 'chosen' has role 'tool', not user, assistant or system"),
    ({"chosen": [{"role": "user", "content": [{"type": "image", "url": "cat.png"}]}, bot("x")],
      "rejected": [user("q"), bot("z")]}, "message 0 of 'chosen' has a content part that is not text"),
    ({"chosen": [user("q"), bot("")], "rejected": [user("q"), bot("z")]}, "missing or empty field 'chosen[1].content'"),
    ({"chosen": [user("q"), {"role": "assistant", "content": 3}], "rejected": [user("q"), bot("z")]},
     "field 'chosen[1].content' is not text"),
    ({"chosen": ["q", "x"], "rejected": [user("q"), bot("z")]}, "message 0 of 'chosen' is not an object"),
    ({"chosen": [], "rejected": [user("q"), bot("z")]}, "field 'chosen' is not a list of messages"),
    ({"chosen": [user("q"), bot("x")], "rejected": "z"},
     "field 'rejected' is text where another of prompt, chosen, rejected is a list of messages"),
    ({"prompt": "q", "chosen": "x", "rejected": "z"}, "not a conversation: no field holds messages"),
]


def test_malformed_conversations_are_set_aside_with_their_reason(ws, tmp_path, capsys):
    good = {"chosen": [user("q"), bot("good")], "rejected": [user("q"), bot("bad")]}
    path = tmp_path / "conversations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good] + [row for row, _ in BAD_CONVERSATIONS]))
    code = main(["import", str(path), "--json", "--max-bad-fraction", "1", "--workspace", str(ws.root)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["format"] == "conversational" and out["kept"] == 1
    assert out["set_aside"] == len(BAD_CONVERSATIONS)
    quarantined = {q["line"]: q["reasons"][0] for q in records(out["quarantine_file"])}
    for line, (_, reason) in enumerate(BAD_CONVERSATIONS, start=2):
        assert reason in quarantined[line], (line, quarantined[line])
    assert records(out["raw_file"])[0]["source"] == "import:conversational"


def test_conversations_import_from_jsonl_and_parquet_and_validate(ws, tmp_path, capsys):
    rows = [{"chosen": [user(f"question {i}"), bot(f"a helpful answer {i}")],
             "rejected": [user(f"question {i}"), bot(f"no {i}")]} for i in range(6)]
    rows.append({"chosen": DIALOGUE + [bot("Experiment tracking.")], "rejected": DIALOGUE + [bot("go away")]})
    jsonl = tmp_path / "prefs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["import", str(jsonl), "--workspace", str(ws.root)]) == 0
    out = capsys.readouterr().out
    assert "format conversational; kept 7, set aside 0" in out
    # the hint names the settings that render the dialogue as its turns
    assert "note: 1 of the 7 prompts is a dialogue" in out and "chat.hh_dialogue: true" in out
    kept = records(versioning.raw_files(ws)[0])
    assert [r["prompt"] for r in kept[:2]] == ["question 0", "question 1"] and kept[0]["chosen"] == "a helpful answer 0"
    assert kept[6]["prompt"].startswith("\n\nSystem: Answer in one sentence.\n\nHuman: What is DVC?")
    # Parquet as the Hugging Face Hub serves such datasets: list<struct<role, content>> columns, no prompt column
    parquet = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist([{"chosen": r["chosen"], "rejected": [user(f"question {i}"), bot(f"meh {i}")]}
                                         for i, r in enumerate(rows[:6])]), parquet)
    assert pa.types.is_list(pq.read_schema(parquet).field("chosen").type)
    summary = import_file(ws, parquet)
    assert (summary.format, summary.kept, summary.set_aside) == ("parquet", 6, 0)
    assert records(summary.raw_file)[0]["rejected"] == "meh 0"
    # `rlhf validate` converts the conversations before its checks: every row passes them, and the
    # dataset check stops 7 pairs (fewer than validate.min_rows)
    assert main(["validate", str(jsonl), "--json", "--workspace", str(ws.root), "--out", str(tmp_path / "v")]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["accepted"] == 7 and report["quarantined"] == 0
    assert report["blocking_failures"] == ["only 7 usable pairs, fewer than validate.min_rows=20"]


def test_the_pipelines_commits_leave_the_users_staged_work_alone(tmp_path):
    """A workspace can be the user's own project checkout: what they have staged there stays
    staged, and out of the workspace's, the feedback's and the round's commits."""
    root = tmp_path / "project"
    root.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=root, check=True, capture_output=True, text=True).stdout  # noqa: E731
    git("init", "-q")
    (root / "train.py").write_text("print('v1')\n")
    git("add", "train.py")
    git("-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qm", "my project")
    (root / "train.py").write_text("print('v2, not ready')\n")
    (root / "notes.md").write_text("half written\n")
    git("add", "train.py", "notes.md")
    staged = git("diff", "--cached")

    ws = init_workspace(root)  # dvc init and the pipeline definition: the workspace's first commit
    path = tmp_path / "p.jsonl"
    path.write_text("".join(r.to_json() + "\n" for r in sample_records(3)) + "not json\n")
    summary = import_file(ws, path)  # the feedback's commit, and the received file's with its set-aside row
    assert (summary.kept, summary.set_aside) == (3, 1)
    ws.state_file.write_text(ws.state_file.read_text() + "# touched\n")
    assert versioning.commit_round(ws, "round 1: test") is not None

    messages = git("log", "--format=%s").splitlines()
    assert messages[0] == "round 1: test" and messages[-1] == "my project" and len(messages) == 5, messages
    for commit in git("log", "--format=%H").splitlines()[:-1]:  # every commit of the pipeline
        changed = git("show", "--name-only", "--format=", commit).split()
        assert "train.py" not in changed and "notes.md" not in changed, changed
    assert git("diff", "--cached") == staged  # still staged, byte for byte
    assert git("show", "HEAD:train.py") == "print('v1')\n"
    # a round with nothing new of its own commits nothing, the user's staged work notwithstanding
    assert versioning.commit_round(ws, "round 2: test") is None
    assert git("diff", "--cached") == staged


def test_pairs_with_ids_of_your_own_are_split_like_ours(tmp_path):
    """An export's own ids ('row-17', UUIDs, numbers) are kept on import, and the reward model's
    split hashes them: it read them as hex and stopped the stage ("invalid literal for int()")."""
    import uuid

    from tasks.train_reward import id_hash, split

    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"id": f"row-{i}", "prompt": "the nurse said", "chosen": f" they left {i} .",
                                        "rejected": f" she left {i} ."}) + "\n" for i in range(3)))
    ws = init_workspace(tmp_path / "ws")
    import_file(ws, path)
    [raw] = versioning.raw_files(ws)
    assert [json.loads(line)["id"] for line in raw.read_text().splitlines()] == ["row-0", "row-1", "row-2"]
    ours = PreferenceRecord(prompt="p", chosen="a", rejected="b", source="simulated", annotator="x", round=1)
    assert id_hash(ours.id) == int(ours.id[:8], 16)  # our hashes split as before: a pair keeps its side
    for ids in ([f"row-{i}" for i in range(4000)], [str(uuid.UUID(int=i)) for i in range(4000)],
                [str(i) for i in range(4000)]):
        records = [{"id": i, "prompt": "p"} for i in ids]
        _, held = split(records, 0.2)
        assert 0.18 < len(held) / len(records) < 0.22  # the fraction asked for, whatever the ids look like
        assert held == split(records[::-1], 0.2)[1][::-1]  # each pair by its own id
