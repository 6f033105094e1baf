"""The Great Expectations gate: each dataset check fails on data built to break it and passes on
clean data; severity decides whether a failure blocks; the HH-RLHF sample passes; Data Docs open."""
import dataclasses
import json
import random

import pytest

from flows.cli import main
from tasks import scenario
from tasks.config import ValidateConfig, load_config
from tasks.modeling import load_tokenizer
from tasks.records import PreferenceRecord
from tasks.validate import blocking_failures, validate_files

from conftest import HH_RLHF


def clean_records(n=60, annotator="ann-1", seed=0, chosen_longer=0.5):
    """Balanced, fluent, varied pairs: every check passes on these."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prof = rng.choice(list(scenario.FEEDBACK_PROFESSIONS))
        s, p = rng.choice(scenario.CONTINUATIONS)
        long_, short = f" they {p} today {i} .", f" he {s} {i} ."
        chosen, rejected = (long_, short) if rng.random() < chosen_longer else (short, long_)
        out.append(PreferenceRecord(prompt=scenario.prompt_for(prof), chosen=chosen, rejected=rejected,
                                    source="simulated", annotator=annotator, round=1))
    return out


def write(path, recs):
    path.write_text("".join(r.to_json() + "\n" for r in recs))
    return path


def check(result, name):
    return next(c for c in result.checks if c["name"] == name)


def test_clean_data_passes_every_check(tmp_path):
    result = validate_files([write(tmp_path / "a.jsonl", clean_records())], ValidateConfig(), tmp_path / "gx")
    assert len(result.accepted) == 60 and not result.quarantined
    assert all(c["passed"] for c in result.checks)
    assert blocking_failures(result, ValidateConfig()) == []


def test_row_count_bounds_block(tmp_path):
    f = write(tmp_path / "a.jsonl", clean_records(10))
    result = validate_files([f], ValidateConfig(min_rows=20), tmp_path / "gx")
    assert not check(result, "row_count")["passed"]
    assert any("min_rows" in x for x in blocking_failures(result, ValidateConfig(min_rows=20)))
    result = validate_files([f], ValidateConfig(max_rows=5, min_rows=1), tmp_path / "gx2")
    assert any("max_rows" in x for x in blocking_failures(result, ValidateConfig(max_rows=5, min_rows=1)))


def test_repeats_of_earlier_pairs_are_set_aside_but_do_not_block_while_bad_rows_do(tmp_path):
    """A converged policy shows the same pairs round after round: the repeats are set aside with
    their reason, but only bad rows count toward max_quarantine_fraction."""
    recs = clean_records(30)
    first = write(tmp_path / "round-1.jsonl", recs)
    again = write(tmp_path / "round-2.jsonl", recs + recs)  # 60 repeats: 2/3 of all rows
    result = validate_files([first, again], ValidateConfig(), tmp_path / "gx")
    assert len(result.accepted) == 30 and len(result.quarantined) == 60
    assert all(q["reasons"] == ["duplicate of an earlier pair"] for q in result.quarantined)
    assert blocking_failures(result, ValidateConfig()) == []
    bad = [dataclasses.replace(r, rejected=r.chosen) for r in clean_records(40, seed=1)]  # chosen == rejected
    result = validate_files([first, again, write(tmp_path / "bad.jsonl", bad)], ValidateConfig(), tmp_path / "gx2")
    (failure,) = blocking_failures(result, ValidateConfig())
    assert failure.startswith("40 of 70 rows set aside") and "besides 60 repeats" in failure


def test_length_bias_fails_label_balance_and_severity_decides(tmp_path):
    f = write(tmp_path / "a.jsonl", clean_records(chosen_longer=1.0))
    warn = ValidateConfig()
    result = validate_files([f], warn, tmp_path / "gx")
    c = check(result, "label_balance")
    assert not c["passed"] and c["observed"] == 1.0 and c["severity"] == "warning"
    assert blocking_failures(result, warn) == [] and "label_balance" in result.summary["warnings"][0]
    block = ValidateConfig(severity={"label_balance": "blocking"})
    result = validate_files([f], block, tmp_path / "gx2")
    assert any("label_balance failed (blocking)" in x for x in blocking_failures(result, block))


def test_annotator_who_disagrees_with_the_majority_fails_agreement(tmp_path):
    base = clean_records(40, "alice")
    agree = [PreferenceRecord(**{**r.__dict__, "annotator": "bob", "id": ""}) for r in base]
    contrarian = [PreferenceRecord(**{**r.__dict__, "annotator": "carol", "chosen": r.rejected,
                                      "rejected": r.chosen, "id": ""}) for r in base]
    result = validate_files([write(tmp_path / "a.jsonl", base + agree + contrarian)], ValidateConfig(),
                            tmp_path / "gx")
    c = check(result, "annotator_agreement")
    assert not c["passed"] and c["per_annotator"] == {"alice": 1.0, "bob": 1.0, "carol": 0.0}
    assert len(result.accepted) == 120  # the same pair from another annotator is a label, not a duplicate
    result = validate_files([write(tmp_path / "b.jsonl", base + agree)], ValidateConfig(), tmp_path / "gx2")
    assert check(result, "annotator_agreement")["passed"]


def test_drift_against_the_previous_version_warns(tmp_path):
    old = write(tmp_path / "round-1.jsonl", clean_records(40))
    same = write(tmp_path / "round-2.jsonl", clean_records(40, seed=1))
    result = validate_files([old, same], ValidateConfig(), tmp_path / "gx", previous_files={"round-1.jsonl"})
    assert check(result, "drift")["passed"]
    odd = [PreferenceRecord(prompt="quarterly revenue forecast", chosen=" synergy " * 30 + f"q{i}",
                            rejected=" paradigm " * 30 + f"q{i}", source="simulated", annotator="x", round=2)
           for i in range(40)]
    new = write(tmp_path / "round-3.jsonl", odd)
    result = validate_files([old, new], ValidateConfig(), tmp_path / "gx2", previous_files={"round-1.jsonl"})
    c = check(result, "drift")
    assert not c["passed"] and c["severity"] == "warning" and c["length_change"] > 0.5 and c["vocab_overlap"] < 0.5
    assert blocking_failures(result, ValidateConfig()) == []  # a warning: the round goes on


def test_token_bound_uses_the_policy_tokenizer(tmp_path, tiny_model_dir):
    recs = clean_records(30)
    long_one = PreferenceRecord(prompt="the pilot said", chosen=" they were late ." * 20, rejected=" he was late .",
                                source="simulated", annotator="a", round=1)
    cfg = ValidateConfig(max_tokens=24, min_rows=1)
    result = validate_files([write(tmp_path / "a.jsonl", recs + [long_one])], cfg, tmp_path / "gx",
                            tokenizer=load_tokenizer(tiny_model_dir))
    assert [q["reasons"] for q in result.quarantined] == [["longer than max_tokens"]]
    assert len(result.accepted) == 30


@pytest.mark.skipif(not HH_RLHF.exists(), reason="HH-RLHF sample not found")
def test_hh_rlhf_sample_passes_and_data_docs_open(tmp_path, capsys):
    assert main(["validate", str(HH_RLHF), "--json", "--out", str(tmp_path / "v"),
                 "--workspace", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["passed"] and summary["accepted"] == 1812 and summary["quarantined"] == 0
    docs = (tmp_path / "v" / "gx" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html").read_text()
    assert "preference_rows" in docs and "preference_dataset" in docs
    assert len((tmp_path / "v" / "accepted.jsonl").read_text().splitlines()) == 1812


def test_cli_validate_exits_1_on_a_blocking_failure(tmp_path, capsys):
    f = write(tmp_path / "few.jsonl", clean_records(5))
    assert main(["validate", str(f), "--workspace", str(tmp_path)]) == 1
    assert "min_rows" in capsys.readouterr().err


def test_cli_validate_missing_file(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        main(["validate", str(tmp_path / "missing.jsonl"), "--workspace", str(tmp_path)])


def test_cli_validates_a_sheet_through_its_map_naming_the_file_and_lines_given(tmp_path, capsys):
    """`rlhf validate` reads what `rlhf import` reads, --map and --format too, and names each row
    set aside by the file given and its line there: a compressed sheet's rows were named by the
    converted copy (sheet.jsonl, its own line numbers), and a sheet with columns of its own could
    not be checked before its import at all."""
    import gzip

    sheet = "question,left,right,better\n" + "".join(
        f"the pilot said {i},\" they were late {i} .\",\" he was late {i} .\",a\n" for i in range(30))
    sheet += "the nurse said,\" they left .\",\" she left .\",maybe\n"  # line 32: no choice it reads
    sheet += "the nurse said,\" a first\nline .\",\" she left .\",b\n"  # lines 33-34: a response of two lines
    sheet += "the chef said,\" they left .\",\" they left .\",a\n"  # line 35: the two responses are one
    path = tmp_path / "sheet.csv.gz"
    path.write_bytes(gzip.compress(sheet.encode()))
    out = tmp_path / "checked"
    with pytest.raises(SystemExit, match="columns prompt, chosen, rejected not found"):
        main(["validate", str(path), "--out", str(out), "--workspace", str(tmp_path)])
    main(["validate", str(path), "--map", "prompt=question,a=left,b=right,choice=better", "--json",
          "--out", str(out), "--workspace", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out)
    assert (summary["accepted"], summary["quarantined"]) == (31, 2)
    set_aside = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert sorted((q["source_file"], q["line"], q["reasons"][0][:24]) for q in set_aside) == [
        ("sheet.csv.gz", 32, "'better' is 'maybe', not"), ("sheet.csv.gz", 35, "chosen equals rejected")]
    for bad, error in [(["--map", "prompt=q,winner=w"], "bad --map entry 'winner=w'"),
                       (["--format", "hh-rlhf", "--map", "prompt=question"], "--map prompt=: .* is hh-rlhf"),
                       (["--format", "xml"], None)]:
        with pytest.raises(SystemExit, match=error):
            main(["validate", str(path), *bad, "--out", str(out), "--workspace", str(tmp_path)])


def test_severity_config_is_validated(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("validate:\n  severity:\n    drift: fatal\n")
    with pytest.raises(Exception, match="validate.severity.drift"):
        load_config(p)


def test_cli_validates_a_past_data_version(tmp_path, capsys):
    from tasks.importers import import_file
    from tasks.versioning import history
    from tasks.workspace import init_workspace

    ws = init_workspace(tmp_path / "ws")
    import_file(ws, write(tmp_path / "first.jsonl", clean_records(30)))
    first = history(ws)[0].commit
    import_file(ws, write(tmp_path / "second.jsonl", clean_records(30, seed=5)))
    assert main(["validate", "--version", first, "--json", "--workspace", str(ws.root)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["accepted"] == 30 and len(summary["files"]) == 1  # only what existed at that version
    with pytest.raises(SystemExit, match="unknown data version"):
        main(["validate", "--version", "not-a-commit", "--workspace", str(ws.root)])


def test_prompts_too_long_for_the_policy_stop_the_round_at_validation(tiny_model_dir, tmp_path, capsys):
    """With prompts.from_feedback, PPO's and evaluation's prompts are the accepted pairs': one too
    long for the model with ppo.max_new_tokens is a blocking failure of validation, before any
    training (found at PPO, it stopped a round after its reward model had trained). The fix it
    names, validate.max_tokens, sets those pairs aside and the round goes on."""
    import shutil

    from tasks import rounds, versioning
    from tasks import validate as validate_stage
    from tasks.stage import StageError
    from tasks.workspace import init_workspace

    from conftest import FAST

    ws = init_workspace(tmp_path / "ws")
    shutil.copytree(tiny_model_dir, ws.base_model)  # its 64 positions
    long_prompt = "the doctor said" + " the nurse said" * 20  # 63 tokens of this tokenizer or so
    records = clean_records(60) + [dataclasses.replace(r, prompt=long_prompt + f" {i}")
                                   for i, r in enumerate(clean_records(12, seed=1))]
    (ws.raw_dir / "round-0001-import-jsonl-x.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    overrides = {**FAST, "collect.simulate": False, "prompts.from_feedback": True, "prompts.heldout_fraction": 0.3}
    cfg = load_config(None, overrides)
    rounds.write_params(ws, cfg)
    with pytest.raises(StageError, match=r"validation blocked training: prompt \d+ of the validated feedback's "
                                         r"(training|held-out) prompts is \d+ tokens \(\d+ of the \d+ are too long\): "
                                         r"with ppo.max_new_tokens 10 that exceeds the model's 64 positions; set "
                                         r"validate.max_tokens to 54 to set aside longer pairs"):
        validate_stage.run(ws, cfg, ws.read_state())
    report = json.loads(ws.validation_report.read_text())
    assert report["passed"] is False and report["accepted"] == 72  # the pairs are fine; their prompts are not
    assert any("exceeds the model's 64 positions" in f for f in report["blocking_failures"])
    assert main(["validate", "--json", "--workspace", str(ws.root)]) == 1  # the gate alone: the same verdict
    assert json.loads(capsys.readouterr().out)["blocking_failures"] == report["blocking_failures"]
    # through DVC, as a round runs it: the error alone, without DVC's warnings that the round's
    # collected pairs (none, with collect.simulate false) are empty
    (ws.root / "data" / "collected").mkdir(parents=True)
    (ws.root / "data" / "collected" / "round.jsonl").write_text("")
    with pytest.raises(versioning.VersioningError) as failed:
        versioning.repro(ws, "validate")
    assert "exceeds the model's 64 positions" in str(failed.value) and "is empty" not in str(failed.value)
    # the fix it names: those pairs set aside with their reason, the rest go on
    cfg = load_config(None, {**overrides, "validate.max_tokens": 54})
    rounds.write_params(ws, cfg)
    validate_stage.run(ws, cfg, ws.read_state())
    report = json.loads(ws.validation_report.read_text())
    assert report["passed"] is True and (report["accepted"], report["quarantined"]) == (60, 12)
    assert report["reasons"] == {"longer than max_tokens": 12}
