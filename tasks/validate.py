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
from tasks.config import PipelineConfig, ValidateConfig
from tasks.records import BadLine, read_jsonl, write_jsonl_atomic
from tasks.stage import StageError, stage_main
from tasks.workspace import RoundState, Workspace

TEXT_FIELDS = ("prompt", "chosen", "rejected")
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
SOURCE_PATTERN = r"^(simulated|prefect-ui|import:[a-z0-9-]+)$"
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

    @property
    def summary(self) -> dict:
        reasons: dict[str, int] = {}
        for q in self.quarantined:
            for r in q["reasons"]:
                reasons[r] = reasons.get(r, 0) + 1
        return {"accepted": len(self.accepted), "quarantined": len(self.quarantined),
                "not_pairs": self.not_pairs, "reasons": reasons,
                "failed_expectations": [e["name"] for e in self.expectations if not e["success"]],
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


def _suite(cfg: ValidateConfig) -> list:
    E = gx.expectations
    exps = [E.ExpectSelectColumnValuesToBeUniqueWithinRecord(column_list=["chosen", "rejected"]),
            E.ExpectColumnValuesToBeInSet(column="_repeat", value_set=[False]),
            E.ExpectColumnValuesToMatchRegex(column="source", regex=SOURCE_PATTERN),
            E.ExpectColumnValuesToMatchRegex(column="created_at", regex=ISO_UTC_PATTERN)]
    for col in TEXT_FIELDS:
        exps.append(E.ExpectColumnValueLengthsToBeBetween(column=col, min_value=1, max_value=cfg.max_chars))
        exps.append(E.ExpectColumnValuesToNotMatchRegex(column=col, regex=CONTROL_CHARS))
    return exps


REASONS = {
    "expect_select_column_values_to_be_unique_within_record": "chosen equals rejected",
    "expect_column_values_to_be_in_set": "duplicate of an earlier pair",
    "expect_column_value_lengths_to_be_between": "'{column}' longer than max_chars",
    "expect_column_values_to_not_match_regex": "control characters in '{column}'",
    "expect_column_values_to_match_regex": "'{column}' not valid",
}


def run_expectations(frame: pd.DataFrame, cfg: ValidateConfig, gx_root: Path):
    """Run the suite in a file context under `gx_root`; returns (per-row reasons, expectation results, docs)."""
    gx_root.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=str(gx_root))
    ctx.variables.progress_bars = {"globally": False}
    source = ctx.data_sources.add_or_update_pandas("preferences")
    asset = next((a for a in source.assets if a.name == "pairs"), None) or source.add_dataframe_asset("pairs")
    batch = next((b for b in asset.batch_definitions if b.name == "all"), None) or \
        asset.add_batch_definition_whole_dataframe("all")
    suite = gx.ExpectationSuite(name="preference_pairs")
    for e in _suite(cfg):
        suite.add_expectation(e)
    suite = ctx.suites.add_or_update(suite)
    definition = ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name="preference_pairs", data=batch, suite=suite))
    checkpoint = ctx.checkpoints.add_or_update(gx.Checkpoint(
        name="preference_pairs", validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")], result_format={"result_format": "COMPLETE"}))
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    row_reasons: dict[int, list[str]] = {}
    expectations = []
    for run_result in result.run_results.values():
        for r in run_result.results:
            kwargs = r.expectation_config.kwargs
            column = kwargs.get("column") or ",".join(kwargs.get("column_list", []))
            expectations.append({"name": f"{r.expectation_config.type}({column})", "success": bool(r.success),
                                 "unexpected": r.result.get("unexpected_count")})
            reason = REASONS.get(r.expectation_config.type, r.expectation_config.type).format(column=column)
            for idx in r.result.get("unexpected_index_list") or []:
                row_reasons.setdefault(int(idx), []).append(reason)
    docs = ctx.get_docs_sites_urls()
    return row_reasons, expectations, docs[0]["site_url"] if docs else None


def validate_files(files: list[Path], cfg: ValidateConfig, gx_root: Path) -> ValidationResult:
    rows, quarantined, not_pairs = load_rows(files)
    if not rows:
        return ValidationResult([], quarantined, not_pairs)
    frame = pd.DataFrame(rows)
    for col in ("source", "created_at"):
        frame[col] = frame[col].astype("string") if col in frame else pd.Series([""] * len(frame), dtype="string")
    frame["_repeat"] = frame.duplicated(subset=list(TEXT_FIELDS), keep="first")
    row_reasons, expectations, docs = run_expectations(frame, cfg, gx_root)
    accepted = []
    for i, row in enumerate(rows):
        record = {k: v for k, v in row.items() if not k.startswith("_")}
        if i in row_reasons:
            quarantined.append({"source_file": row["_source_file"], "line": row["_line"],
                                "reasons": row_reasons[i], "record": record})
        else:
            accepted.append(record)
    return ValidationResult(accepted, quarantined, not_pairs, expectations, docs)


def blocking_failures(result: ValidationResult, cfg: ValidateConfig) -> list[str]:
    total = len(result.accepted) + len(result.quarantined)
    failures = []
    if len(result.accepted) < cfg.min_rows:
        failures.append(f"only {len(result.accepted)} usable pairs, fewer than validate.min_rows={cfg.min_rows}")
    if total and len(result.quarantined) / total > cfg.max_quarantine_fraction:
        failures.append(f"{len(result.quarantined)} of {total} rows set aside, more than "
                        f"validate.max_quarantine_fraction={cfg.max_quarantine_fraction}")
    return failures


def run(ws: Workspace, cfg: PipelineConfig, state: RoundState) -> ValidationResult:
    files = input_files(ws)
    if not files:
        raise ValidationFailed(f"no feedback to validate: {ws.raw_dir} holds no .jsonl file and no round was "
                               "collected; run the collect stage or `rlhf import FILE`")
    with tracking.stage_run(ws, cfg.project, "validate", state):
        result = validate_files(files, cfg.validate_, ws.reports / "validation")
        failures = blocking_failures(result, cfg.validate_)
        write_jsonl_atomic(ws.accepted, (json.dumps(r, ensure_ascii=False) for r in result.accepted))
        write_jsonl_atomic(ws.quarantine, (json.dumps(q, ensure_ascii=False, default=str)
                                           for q in result.quarantined))
        summary = {**result.summary, "files": [f.name for f in files], "blocking_failures": failures,
                   "passed": not failures}
        ws.validation_report.parent.mkdir(parents=True, exist_ok=True)
        ws.validation_report.write_text(json.dumps(summary, indent=2))
        mlflow.log_metrics({"validate/accepted": len(result.accepted), "validate/quarantined": len(result.quarantined),
                            "validate/not_pairs": result.not_pairs})
        mlflow.log_dict(summary, "validation/summary.json")
        mlflow.set_tag("validation_passed", str(not failures).lower())
        if result.docs_index:
            mlflow.set_tag("validation_docs", result.docs_index)
    if failures:
        raise ValidationFailed("validation blocked training: " + "; ".join(failures) +
                               f". Report: {ws.validation_report}; set-aside rows: {ws.quarantine}")
    return result


if __name__ == "__main__":
    stage_main(run)
