"""Stage `validate`: the gate before any training, with Great Expectations.

Reads every raw feedback file (and the round's collected file if it is not versioned yet),
sets aside each bad row with its reasons and source line, writes the accepted pairs, the
quarantine, a summary and a Data Docs site, and fails when what remains cannot be trained on.

Row-level checks run as GE expectations with COMPLETE results, so GE names the failing rows;
table-level checks (row count) are blocking. Ties and skips are kept in the raw labels but are
not pairs: they are counted, not quarantined.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import great_expectations as gx
import mlflow
import pandas as pd

from tasks import tracking, versioning
from tasks.config import ChatConfig, PipelineConfig, ValidateConfig
from tasks.records import SOURCE_PATTERN, BadLine, read_jsonl, write_jsonl_atomic
from tasks.stage import StageError, stage_main
from tasks.workspace import RoundState, Workspace

TEXT_FIELDS = ("prompt", "chosen", "rejected")
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
ISO_UTC_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}"


class ValidationFailed(StageError):
    pass


@dataclass
class ValidationResult:
    accepted: list[dict]
    quarantined: list[dict]  # each: {"source_file", "line", "reasons", "record"}
    not_pairs: int  # ties and skips
    expectations: list[dict] = field(default_factory=list)  # one per GE expectation: type, column, success
    docs_index: str | None = None
    checks: list[dict] = field(default_factory=list)  # dataset checks: name, severity, passed, observed

    @property
    def summary(self) -> dict:
        reasons: dict[str, int] = {}
        for q in self.quarantined:
            for r in q["reasons"]:
                reasons[r] = reasons.get(r, 0) + 1
        return {"accepted": len(self.accepted), "quarantined": len(self.quarantined),
                "not_pairs": self.not_pairs, "reasons": reasons,
                "failed_expectations": [e["name"] for e in self.expectations if not e["success"]],
                "checks": self.checks,
                "warnings": [f"{c['name']}: {c['observed']}" for c in self.checks
                             if not c["passed"] and c["severity"] == "warning"],
                "docs": self.docs_index}


def input_files(ws: Workspace) -> list[Path]:
    """All versioned raw feedback, plus the round's collected file unless it is versioned already."""
    files = versioning.raw_files(ws)
    if ws.collected.exists():
        digest = versioning.file_md5(ws.collected)[:12]
        if not any(f.stem.endswith(digest) for f in files):
            files.append(ws.collected)
    return files


def load_rows(files: list[Path]) -> tuple[list[dict], list[dict], int]:
    """Parse every line. Returns (candidate rows, quarantined rows, ties/skips)."""
    rows, quarantined, not_pairs = [], [], 0
    for path in files:
        for item in read_jsonl(path):
            if isinstance(item, BadLine):
                quarantined.append({"source_file": path.name, "line": item.line, "reasons": [item.reason],
                                    "record": item.raw})
                continue
            line, item = item
            problems = [f"missing or empty field '{k}'" for k in TEXT_FIELDS if item.get(k) in (None, "")]
            problems += [f"field '{k}' is not text" for k in TEXT_FIELDS
                         if item.get(k) is not None and not isinstance(item.get(k), str)]
            margin = item.get("margin")
            if margin is not None and (not isinstance(margin, (int, float)) or not math.isfinite(margin)):
                problems.append("field 'margin' is not a finite number")
            if problems:
                quarantined.append({"source_file": path.name, "line": line, "reasons": sorted(set(problems)),
                                    "record": item})
                continue
            if item.get("label", "pair") in ("tie", "skip"):
                not_pairs += 1
                continue
            rows.append({**item, "_source_file": path.name, "_line": line})
    return rows, quarantined, not_pairs


def _row_suite(cfg: ValidateConfig, with_tokens: bool) -> list:
    E = gx.expectations
    exps = [E.ExpectSelectColumnValuesToBeUniqueWithinRecord(column_list=["chosen", "rejected"]),
            E.ExpectColumnValuesToBeInSet(column="_repeat", value_set=[False]),
            E.ExpectColumnValuesToMatchRegex(column="source", regex=SOURCE_PATTERN),
            E.ExpectColumnValuesToMatchRegex(column="created_at", regex=ISO_UTC_PATTERN)]
    for col in TEXT_FIELDS:
        exps.append(E.ExpectColumnValueLengthsToBeBetween(column=col, min_value=1, max_value=cfg.max_chars))
        exps.append(E.ExpectColumnValuesToNotMatchRegex(column=col, regex=CONTROL_CHARS))
    if with_tokens:
        exps.append(E.ExpectColumnValuesToBeBetween(column="_tokens", min_value=1, max_value=cfg.max_tokens))
    return exps


def _dataset_suite(cfg: ValidateConfig, has_overlap: bool) -> list[tuple[str, object]]:
    """(check name, expectation) over the accepted pairs; severity comes from the check name."""
    E = gx.expectations
    checks = [("row_count", E.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows, max_value=cfg.max_rows)),
              ("label_balance", E.ExpectColumnMeanToBeBetween(column="_chosen_longer", min_value=cfg.chosen_longer_min,
                                                              max_value=cfg.chosen_longer_max))]
    if has_overlap:
        checks.append(("annotator_agreement", E.ExpectColumnMinToBeBetween(
            column="_annotator_agreement", min_value=cfg.min_annotator_agreement)))
    return checks


REASONS = {
    "expect_select_column_values_to_be_unique_within_record": "chosen equals rejected",
    "expect_column_values_to_be_in_set": "duplicate of an earlier pair",
    "expect_column_value_lengths_to_be_between": "'{column}' longer than max_chars",
    "expect_column_values_to_not_match_regex": "control characters in '{column}'",
    "expect_column_values_to_match_regex": "'{column}' not valid",
    "expect_column_values_to_be_between": "longer than max_tokens",
}


def _context(gx_root: Path):
    gx_root.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=str(gx_root))
    ctx.variables.progress_bars = {"globally": False}
    return ctx


def run_suite(ctx, name: str, expectations: list, frame: pd.DataFrame) -> list:
    """Run one named suite on a dataframe in the file context; returns GE's expectation results."""
    source = ctx.data_sources.add_or_update_pandas("preferences")
    asset = next((a for a in source.assets if a.name == name), None) or source.add_dataframe_asset(name)
    batch = next((b for b in asset.batch_definitions if b.name == "all"), None) or \
        asset.add_batch_definition_whole_dataframe("all")
    suite = gx.ExpectationSuite(name=name)
    for e in expectations:
        suite.add_expectation(e)
    suite = ctx.suites.add_or_update(suite)
    definition = ctx.validation_definitions.add_or_update(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    checkpoint = ctx.checkpoints.add_or_update(gx.Checkpoint(
        name=name, validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")], result_format={"result_format": "COMPLETE"}))
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    return [r for run_result in result.run_results.values() for r in run_result.results]


def row_reasons_from(results: list) -> tuple[dict[int, list[str]], list[dict]]:
    row_reasons: dict[int, list[str]] = {}
    expectations = []
    for r in results:
        kwargs = r.expectation_config.kwargs
        column = kwargs.get("column") or ",".join(kwargs.get("column_list", []))
        expectations.append({"name": f"{r.expectation_config.type}({column})", "success": bool(r.success),
                             "unexpected": r.result.get("unexpected_count")})
        reason = REASONS.get(r.expectation_config.type, r.expectation_config.type).format(column=column)
        for idx in r.result.get("unexpected_index_list") or []:
            row_reasons.setdefault(int(idx), []).append(reason)
    return row_reasons, expectations


def annotator_agreement(frame: pd.DataFrame) -> pd.Series:
    """Per row: its annotator's agreement with the majority over pairs labelled more than once
    (NaN where the annotator labelled no such pair). A pair is its prompt and its two responses,
    in either order; the majority is the response chosen most often."""
    key = frame["prompt"] + "\0" + frame[["chosen", "rejected"]].apply(lambda r: "\0".join(sorted(r)), axis=1)
    counts = key.map(key.value_counts())
    overlap = frame[counts > 1]
    if overlap.empty:
        return pd.Series(float("nan"), index=frame.index)
    majority = overlap.groupby(key[counts > 1])["chosen"].agg(lambda c: c.mode().iloc[0])
    agrees = (overlap["chosen"] == key[counts > 1].map(majority)).astype(float)
    per_annotator = agrees.groupby(overlap["annotator"].astype(str)).mean()
    return frame["annotator"].astype(str).map(per_annotator)


def drift(frame: pd.DataFrame, new_files: set[str], cfg: ValidateConfig) -> dict:
    """This round's rows (from new files) against the previous version's rows."""
    new = frame[frame["_source_file"].isin(new_files)]
    old = frame[~frame["_source_file"].isin(new_files)]
    if new.empty or old.empty:
        return {"checked": False, "passed": True, "detail": "no previous version to compare with"}
    def mean_len(f):
        return float((f["chosen"].str.len() + f["rejected"].str.len()).mean() / 2)
    def words(f):
        return set(" ".join(pd.concat([f["prompt"], f["chosen"], f["rejected"]])).lower().split())
    old_len, new_len = mean_len(old), mean_len(new)
    change = abs(new_len - old_len) / max(old_len, 1e-9)
    new_words = words(new)
    overlap = len(new_words & words(old)) / max(len(new_words), 1)
    passed = change <= cfg.max_length_drift and overlap >= cfg.min_vocab_overlap
    return {"checked": True, "passed": passed, "mean_length_previous": old_len, "mean_length_new": new_len,
            "length_change": change, "vocab_overlap": overlap,
            "detail": f"mean response length {old_len:.1f} -> {new_len:.1f} chars ({change:.0%} change, "
                      f"limit {cfg.max_length_drift:.0%}); {overlap:.0%} of this round's words seen before "
                      f"(floor {cfg.min_vocab_overlap:.0%})"}


def validate_files(files: list[Path], cfg: ValidateConfig, gx_root: Path, tokenizer=None,
                   previous_files: set[str] | None = None, chat: ChatConfig | None = None) -> ValidationResult:
    """Row checks (bad rows set aside), then dataset checks on what is left.
    `previous_files`: the files of the previous version, for the drift check. `chat`: tokens are
    counted with the prompt in the tokenizer's chat template (params.yaml `chat`)."""
    rows, quarantined, not_pairs = load_rows(files)
    if not rows:
        return ValidationResult([], quarantined, not_pairs)
    frame = pd.DataFrame(rows)
    for col in ("source", "created_at", "annotator"):
        frame[col] = frame[col].astype("string") if col in frame else pd.Series([""] * len(frame), dtype="string")
    frame["_repeat"] = frame.duplicated(subset=[*TEXT_FIELDS, "annotator"], keep="first")
    with_tokens = tokenizer is not None and cfg.max_tokens is not None
    if with_tokens:
        from tasks.modeling import pair_token_length  # transformers: only when a token bound is set

        frame["_tokens"] = [pair_token_length(tokenizer, p, c, r, chat)
                            for p, c, r in zip(frame["prompt"], frame["chosen"], frame["rejected"])]
    ctx = _context(gx_root)
    row_reasons, expectations = row_reasons_from(run_suite(ctx, "preference_rows", _row_suite(cfg, with_tokens), frame))
    accepted = []
    for i, row in enumerate(rows):
        record = {k: v for k, v in row.items() if not k.startswith("_")}
        if i in row_reasons:
            quarantined.append({"source_file": row["_source_file"], "line": row["_line"],
                                "reasons": row_reasons[i], "record": record})
        else:
            accepted.append(record)
    good = frame[~frame.index.isin(list(row_reasons))].reset_index(drop=True)
    good["_chosen_longer"] = (good["chosen"].str.len() > good["rejected"].str.len()).astype(float)
    good["_annotator_agreement"] = annotator_agreement(good)
    has_overlap = bool(good["_annotator_agreement"].notna().any())
    checks = []
    dataset = _dataset_suite(cfg, has_overlap) if len(good) else []
    results = run_suite(ctx, "preference_dataset", [e for _, e in dataset], good) if dataset else []
    by_type = {r.expectation_config.type: r for r in results}
    for name, expectation in dataset:
        r = by_type[expectation.expectation_type]  # one expectation of each type: results come back unordered
        checks.append({"name": name, "severity": "blocking" if name == "row_count" else getattr(cfg.severity, name),
                       "passed": bool(r.success), "observed": r.result.get("observed_value")})
        expectations.append({"name": f"{r.expectation_config.type}", "success": bool(r.success), "unexpected": None})
    if has_overlap:
        per = good.groupby(good["annotator"].astype(str))["_annotator_agreement"].first().dropna()
        checks[-1]["per_annotator"] = {k: float(v) for k, v in per.items()}
    if previous_files is not None:
        new_files = {f.name for f in files} - previous_files
        d = drift(good, new_files, cfg)
        if d["checked"]:
            checks.append({"name": "drift", "severity": cfg.severity.drift, "passed": d["passed"],
                           "observed": d["detail"], **{k: v for k, v in d.items() if k not in ("checked", "detail")}})
    docs = ctx.get_docs_sites_urls()
    return ValidationResult(accepted, quarantined, not_pairs, expectations, docs[0]["site_url"] if docs else None,
                            checks)


DUPLICATE = REASONS["expect_column_values_to_be_in_set"]


def blocking_failures(result: ValidationResult, cfg: ValidateConfig) -> list[str]:
    # A row set aside only because it repeats an earlier pair is not bad data: a converged policy
    # shows annotators the same pairs again, round after round. Such rows stay in the quarantine
    # file with their reason but do not count toward max_quarantine_fraction.
    bad = [q for q in result.quarantined if q["reasons"] != [DUPLICATE]]
    total = len(result.accepted) + len(bad)
    failures = []
    if len(result.accepted) < cfg.min_rows:
        failures.append(f"only {len(result.accepted)} usable pairs, fewer than validate.min_rows={cfg.min_rows}")
    if len(result.accepted) > cfg.max_rows:
        failures.append(f"{len(result.accepted)} pairs, more than validate.max_rows={cfg.max_rows}")
    if total and len(bad) / total > cfg.max_quarantine_fraction:
        repeats = len(result.quarantined) - len(bad)
        failures.append(f"{len(bad)} of {total} rows set aside, more than validate.max_quarantine_fraction="
                        f"{cfg.max_quarantine_fraction}" + (f" (besides {repeats} repeats of earlier pairs)"
                                                            if repeats else ""))
    failures += [f"{c['name']} failed (blocking): {c['observed']}" for c in result.checks
                 if not c["passed"] and c["severity"] == "blocking" and c["name"] != "row_count"]
    return failures


def policy_tokenizer(ws: Workspace, cfg: PipelineConfig):
    """The tokenizer `max_tokens` counts in (the base policy's), or None when no bound is set or no base exists."""
    if cfg.validate_.max_tokens is None or not (ws.base_model / "tokenizer_config.json").exists():
        return None
    from tasks.modeling import load_tokenizer  # transformers: only when a token bound is set

    return load_tokenizer(ws.base_model, cfg.chat_format)


def prompt_problems(ws: Workspace, cfg: PipelineConfig, accepted: list[dict]) -> list[str]:
    """PPO's and evaluation's prompts (your files, or these accepted pairs' with prompts.from_feedback)
    against the policy's positions, here, before any training: found at PPO, they stopped a round
    after its reward model had trained. [] with the built-in scenario's prompts or no base yet."""
    if cfg.scenario_prompts or not (ws.base_model / "config.json").exists():
        return []
    from transformers import AutoConfig  # (only with your prompts)

    from tasks import prompts as prompts_
    from tasks.modeling import encode_prompt, load_tokenizer

    try:
        if cfg.prompts.from_feedback:
            train, heldout = prompts_.split_prompts((r["prompt"] for r in accepted), cfg.prompts.heldout_fraction)
        else:
            train, heldout = prompts_.training_prompts(ws, cfg), prompts_.heldout_prompts(ws, cfg)
    except prompts_.PromptsError as e:  # a prompts file that cannot be read, a side left empty
        return [str(e)]
    tokenizer, config = load_tokenizer(ws.base_model, cfg.chat_format), AutoConfig.from_pretrained(ws.base_model)
    problems = []
    for side, prompts in (("train", train), ("heldout", prompts_.sample_prompts(heldout, cfg.evaluate.max_prompts))):
        try:
            prompts_.check_lengths([encode_prompt(tokenizer, p, cfg.chat_format) for p in prompts],
                                   cfg.ppo.max_new_tokens, config, prompts_.where(cfg, side))
        except prompts_.PromptsError as e:
            problems.append(str(e))
    return problems


def judge_problems(ws: Workspace, cfg: PipelineConfig) -> list[str]:
    """evaluate.judge, here before any training, from its config alone: found at evaluation, a judge
    that cannot be loaded or is no reward model would stop the round after PPO."""
    if cfg.evaluate.judge is None:
        return []
    from tasks import judge, tracking
    from tasks.errors import ModelLoadError

    try:
        judge.check(tracking.resolve_model(ws, cfg.evaluate.judge))
    except ModelLoadError as e:
        return [f"evaluate.judge: {e}"]
    except Exception as e:  # a models:/ URI the registry does not hold
        return [f"evaluate.judge: cannot resolve {cfg.evaluate.judge!r} ({type(e).__name__}: {str(e)[:300]})"]
    return []


def round_problems(ws: Workspace, cfg: PipelineConfig, accepted: list[dict]) -> list[str]:
    """What would stop the round after training, found now: prompts too long, a judge that is none."""
    return prompt_problems(ws, cfg, accepted) + judge_problems(ws, cfg)


def write_outputs(result: ValidationResult, cfg: ValidateConfig, files: list[str], accepted: Path,
                  quarantine: Path, report: Path, problems: list[str] = (), **extra) -> dict:
    """Accepted pairs, set-aside rows and the summary report; returns the summary. `problems`:
    blocking failures found outside the pairs themselves (round_problems)."""
    failures = blocking_failures(result, cfg) + list(problems)
    write_jsonl_atomic(accepted, (json.dumps(r, ensure_ascii=False) for r in result.accepted))
    write_jsonl_atomic(quarantine, (json.dumps(q, ensure_ascii=False, default=str) for q in result.quarantined))
    summary = {**result.summary, "files": files, "blocking_failures": failures, "passed": not failures, **extra}
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def run(ws: Workspace, cfg: PipelineConfig, state: RoundState) -> ValidationResult:
    files = input_files(ws)
    if not files:
        raise ValidationFailed(f"no feedback to validate: {ws.raw_dir} holds no .jsonl file and no round was "
                               "collected; run the collect stage or `rlhf import FILE`")
    previous = json.loads(ws.validation_report.read_text()) if ws.validation_report.exists() else None
    previous_files = set(previous["files"]) if previous and previous.get("passed") else None
    tokenizer = policy_tokenizer(ws, cfg)
    with tracking.stage_run(ws, cfg.project, "validate", state):
        result = validate_files(files, cfg.validate_, ws.reports / "validation", tokenizer, previous_files,
                                cfg.chat_format)
        summary = write_outputs(result, cfg.validate_, [f.name for f in files], ws.accepted, ws.quarantine,
                                ws.validation_report, round_problems(ws, cfg, result.accepted))
        failures = summary["blocking_failures"]
        mlflow.log_metrics({"validate/accepted": len(result.accepted), "validate/quarantined": len(result.quarantined),
                            "validate/not_pairs": result.not_pairs})
        mlflow.log_dict(summary, "validation/summary.json")
        mlflow.set_tag("validation_passed", str(not failures).lower())
        mlflow.log_metric("validate/warnings", len(summary["warnings"]))
        for warning in summary["warnings"]:
            print(f"warning: {warning}")
        if result.docs_index:
            mlflow.set_tag("validation_docs", result.docs_index)
    if failures:
        raise ValidationFailed("validation blocked training: " + "; ".join(failures) +
                               f". Report: {ws.validation_report}; set-aside rows: {ws.quarantine}")
    return result


if __name__ == "__main__":
    stage_main(run)
