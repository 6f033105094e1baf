"""`rlhf`: the command line of the pipeline.

    rlhf run [--rounds N] [--config FILE] [--workspace DIR] [--policy-model ID] [--reward-model ID] [--chat-template]
    rlhf status [--json] [--workspace DIR]
    rlhf gc [--keep N] [--remote] [--dry-run] [--json]
    rlhf import FILE [FILE ...] [--format auto|jsonl|conversational|csv|parquet|hh-rlhf|label-studio|argilla]
                [--map prompt=COL,...] [--json] [--dry-run]
    rlhf data history [--json]        rlhf validate [FILE ...] [--json]
    rlhf label [--pairs N] [--batch-size N] [--timeout S] [--seed N]
    rlhf compare [A B] [--evaluate] [--json]
    rlhf promote VERSION --reason TEXT [--force] [--json]       rlhf rollback [--reason TEXT] [--json]
    rlhf server [--host H] [--prefect-port P] [--mlflow-port P] [--mlflow-auth]
    rlhf serve [--workspace DIR] [--prefect-port P] [--mlflow-port P]

Bad arguments and bad configs end with one line that names the problem (exit 2), never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import signal
import sys
import time
from pathlib import Path

# what `rlhf import` and `rlhf validate` read: tasks.importers.FORMATS, not imported here (every command
# would pay for it)
FORMAT_CHOICES = ("jsonl", "conversational", "csv", "parquet", "hh-rlhf", "label-studio", "argilla")


def _defaults_for_local_run() -> None:
    # Prefect in local mode: an ephemeral server started by the flow itself, no analytics.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # weight-loading bars would fill flow-run logs


def _sigterm_exits() -> None:
    """SIGTERM (`timeout`, systemd, `docker stop`) ends the command through its cleanups, as Ctrl-C
    does: the running stage (in a process group of its own) and the temporary Prefect server are
    stopped, not left orphaned. In a flow, Prefect's engine records the crash first, then sends the
    signal again, to this handler."""
    def exit_(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, exit_)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no name
        return "prefect-ui"


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2147483647, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 1 and 65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="The RLHF loop: feedback, validation, "
                                     "reward model, PPO, evaluation, promotion.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run rounds of the loop (Prefect flow over the DVC stages)")
    run.add_argument("--rounds", type=_positive_int, default=1, help="rounds to run, one after another")
    run.add_argument("--config", type=Path, help="params file to use (default: the workspace's params.yaml)")
    run.add_argument("--workspace", type=Path, default=Path("."), help="git + DVC folder of the run (default: .)")
    run.add_argument("--policy-model", help="your causal LM: Hugging Face id or folder (skips pre-training)")
    run.add_argument("--reward-model", help="start the reward model from this Hugging Face id or folder")
    run.add_argument("--judge", help="evaluate.judge: a reward model PPO never saw (Hugging Face id, folder or "
                                     "models:/ URI) also judges candidate and champion, and gates promotion")
    run.add_argument("--chat-template", action="store_true",
                     help="a chat or instruct model: prompts become a user turn of its tokenizer's chat template")

    imp = sub.add_parser("import", help="import a preference file into the raw feedback (DVC-versioned)")
    imp.add_argument("files", type=Path, nargs="+", metavar="FILE",
                     help="preference files; several (a dataset's shards) are imported one by one")
    imp.add_argument("--format", default="auto", choices=["auto", *FORMAT_CHOICES])
    imp.add_argument("--map", dest="mapping", help="column map for CSV/Parquet/JSONL: prompt=COL,chosen=COL,rejected=COL, "
                                                   "or prompt=COL,a=COL,b=COL,choice=COL where a column says which of "
                                                   "two responses won (a/1, b/2, tie, skip; choice_a=VALUE,"
                                                   "choice_b=VALUE... where yours differ)")
    imp.add_argument("--max-bad-fraction", type=float, default=None,
                     help="exit non-zero when more than this share of rows is set aside (default 0.5, the bound "
                          "refinement rounds put on inbox files)")
    imp.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    imp.add_argument("--dry-run", action="store_true",
                     help="read and check the files, say what would be kept and set aside and show the first "
                          "pairs as they would be imported; write nothing (no workspace needed)")
    imp.add_argument("--workspace", type=Path, default=Path("."))

    lab = sub.add_parser("label", help="label response pairs in the Prefect UI (the run pauses for a form)")
    lab.add_argument("--pairs", type=_positive_int, default=8, help="pairs to label (default 8)")
    lab.add_argument("--batch-size", type=_positive_int, default=4, help="pairs per form (default 4)")
    lab.add_argument("--timeout", type=_positive_int, default=3600, help="seconds to wait for each form")
    lab.add_argument("--annotator", default=None,
                     help="name kept on every label (default: your login name; two people labelling under one "
                          "name read as one, and the second's same answer to a pair as a repeat)")
    lab.add_argument("--seed", type=_non_negative_int, default=None,
                     help="of the prompts and responses shown (default: a new one each session)")
    lab.add_argument("--workspace", type=Path, default=Path("."))

    val = sub.add_parser("validate", help="run the validation gate alone (exit 1 on a blocking failure)")
    val.add_argument("files", nargs="*", type=Path, help="preference files, in any format `rlhf import` reads "
                                                         "(default: the workspace's raw feedback)")
    val.add_argument("--format", default="auto", choices=["auto", *FORMAT_CHOICES],
                     help="the files' format, as `rlhf import` reads them (default: told from each file)")
    val.add_argument("--map", dest="mapping", help="the files' columns, as `rlhf import --map` takes them")
    val.add_argument("--version", dest="rev", help="validate the raw feedback as it was at this data version "
                                                  "(a commit from `rlhf data history`)")
    val.add_argument("--out", type=Path, help="folder for accepted, quarantine, report and Data Docs "
                                              "(default: <workspace>/reports/validate-cli)")
    val.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    val.add_argument("--workspace", type=Path, default=Path("."))

    data = sub.add_parser("data", help="data versions")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    hist = data_sub.add_parser("history", help="every version of the raw feedback, newest first")
    hist.add_argument("--json", action="store_true")
    hist.add_argument("--workspace", type=Path, default=Path("."))

    cmp_ = sub.add_parser("compare", help="two policy versions side by side (default: champion vs latest, "
                                          "or vs previous when the latest is the champion)")
    cmp_.add_argument("a", nargs="?", help="version number or alias (default: champion)")
    cmp_.add_argument("b", nargs="?", help="version number, alias or 'latest' (default: latest; previous when "
                                           "the latest is the champion)")
    cmp_.add_argument("--evaluate", action="store_true",
                      help="evaluate both now, on the same prompts, judged by the champion reward model")
    cmp_.add_argument("--json", action="store_true")
    cmp_.add_argument("--workspace", type=Path, default=Path("."))

    prom = sub.add_parser("promote", help="make a policy version champion by hand (logged with its reason)")
    prom.add_argument("version", help="version number or alias")
    prom.add_argument("--reason", required=True, help="why: kept on the version and the MLflow run")
    prom.add_argument("--force", action="store_true", help="promote even though its gates failed")
    prom.add_argument("--json", action="store_true")
    prom.add_argument("--workspace", type=Path, default=Path("."))

    rb = sub.add_parser("rollback", help="policy champion back to previous, the reward model that trained it with it")
    rb.add_argument("--reason", default="rollback requested", help="why: kept on the versions")
    rb.add_argument("--json", action="store_true")
    rb.add_argument("--workspace", type=Path, default=Path("."))

    gc = sub.add_parser("gc", help="free disk: delete the weights of old model versions and unused DVC cache")
    gc.add_argument("--keep", type=_positive_int, default=2,
                    help="newest versions of each model to keep besides those with an alias (default 2)")
    gc.add_argument("--remote", action="store_true", help="prune the DVC remote too (feedback is always kept)")
    gc.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    gc.add_argument("--json", action="store_true", help="print one JSON object")
    gc.add_argument("--workspace", type=Path, default=Path("."))

    srv = sub.add_parser("server", help="start the Prefect and MLflow servers with their UIs (loopback by default)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind; beyond loopback both servers need auth")
    srv.add_argument("--prefect-port", type=_port, default=4200, help="Prefect API and UI port (default 4200)")
    srv.add_argument("--mlflow-port", type=_port, default=5000, help="MLflow tracking and UI port (default 5000)")
    srv.add_argument("--mlflow-auth", action="store_true", help="MLflow's basic-auth app (needed beyond loopback)")
    srv.add_argument("--workspace", type=Path, default=Path("."), help="whose MLflow store the UI shows")

    serve = sub.add_parser("serve", help="serve the deployments (scheduled refinement, on-demand round and "
                                         "labelling) against PREFECT_API_URL, or servers started here")
    serve.add_argument("--workspace", type=Path, default=Path("."), help="git + DVC folder the rounds use")
    serve.add_argument("--prefect-port", type=_port, default=4200, help="port of the embedded Prefect server")
    serve.add_argument("--mlflow-port", type=_port, default=5000, help="port of the embedded MLflow server")

    status = sub.add_parser("status", help="champion versions and the last round's results")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--workspace", type=Path, default=Path("."))
    return parser


def cmd_run(args) -> int:
    from tasks.config import load_config

    ws_root = args.workspace.resolve()
    config_path = args.config if args.config else (ws_root / "params.yaml" if (ws_root / "params.yaml").exists() else None)
    overrides = {}
    if args.policy_model:
        overrides["models.policy"] = _check_model_arg(args.policy_model, "--policy-model")
    if args.reward_model:
        overrides["models.reward"] = _check_model_arg(args.reward_model, "--reward-model")
    if args.judge:
        overrides["evaluate.judge"] = _check_judge_arg(args.judge)
    if args.chat_template:
        overrides["chat.template"] = True
    cfg = load_config(config_path, overrides)  # fails here, before any work, on a bad config

    from flows.pipeline import rlhf_loop
    from flows.serve import prefect_api
    from tasks.promote import check_same_base
    from tasks.rounds import headline
    from tasks.workspace import init_workspace

    ws = init_workspace(ws_root)
    check_same_base(ws, cfg)  # as the flow does, said before a server starts
    _sigterm_exits()
    with prefect_api(ws):
        results = rlhf_loop(workspace=str(ws_root), rounds_=args.rounds, config=cfg)
    for line in results:
        on_file = line.get("reward_eval_file_accuracy")
        print(f"round {line['round']}: {headline(line)}, KL {line['kl']:.2f}, reward accuracy "
              f"{line['reward_accuracy']:.2f}{f' ({on_file:.2f} on reward.eval_file)' if on_file is not None else ''}, "
              f"win-rate {line['win_rate']:.2f}, {'PROMOTED' if line['promoted'] else 'not promoted'}")
        if "pruning" in line:
            print(f"  {line['pruning']}")
        if line.get("push_error"):
            print(f"  warning: {line['push_error']}", file=sys.stderr)
    return 0


def _check_model_arg(value: str, flag: str) -> str:
    """A folder must exist; anything else must look like a Hugging Face id (org/name or name)."""
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise SystemExit(f"error: {flag} {value}: the folder holds no config.json "
                             "(expected a save_pretrained folder)")
        return str(path.resolve())
    if value.startswith((".", "/", "~")) or value.count("/") > 1:
        raise SystemExit(f"error: {flag} {value}: no such folder")
    return value


def _check_judge_arg(value: str) -> str:
    """--judge: a models:/ URI as it is (the registry is read at validation); a folder is checked
    to be a reward model now, before any work."""
    if value.startswith("models:/"):
        return value
    value = _check_model_arg(value, "--judge")
    if Path(value).is_dir():
        from tasks.errors import ModelLoadError
        from tasks.judge import check

        try:
            check(value)
        except ModelLoadError as e:
            raise SystemExit(f"error: --judge: {e}") from None
    return value


def cmd_import(args) -> int:
    from tasks.importers import MAX_BAD_FRACTION, ImportError_, parse_mapping
    from tasks.workspace import Workspace, init_workspace

    if args.max_bad_fraction is None:
        args.max_bad_fraction = MAX_BAD_FRACTION
    if not 0 <= args.max_bad_fraction <= 1:
        raise SystemExit(f"error: --max-bad-fraction must be between 0 and 1, got {args.max_bad_fraction}")
    try:
        mapping = parse_mapping(args.mapping)
    except ImportError_ as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ws = Workspace(args.workspace) if args.dry_run else init_workspace(args.workspace)
    # several files (a dataset's shards, a shell glob): each imported on its own, the others still
    # when one cannot be; the exit code is the worst of theirs
    return max(import_one(ws, path, args, mapping) for path in args.files)


def import_one(ws, path: Path, args, mapping: dict) -> int:
    from tasks.importers import ImportError_, failed, import_file

    try:
        if path.is_dir():
            raise ImportError_(f"{path} is a folder: name its files (rlhf import {path}/*.jsonl)")
        summary = import_file(ws, path, args.format, mapping, dry_run=args.dry_run)
    except ImportError_ as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = failed(summary, args.max_bad_fraction)
    if args.json:
        print(json.dumps({**summary.as_dict(), "failed": problem}))
    else:
        would = "dry run, nothing imported: would keep" if args.dry_run else "kept"
        print(f"{summary.source_file}: format {summary.format}; {would} {summary.kept}, set aside {summary.set_aside}")
        for reason, n in summary.reasons.most_common():
            print(f"  {n:6d}  {reason}")
        for row in summary.set_aside_examples or []:
            print(f"  set aside: line {row['line']}: {'; '.join(row['reasons'])}")
        if summary.examples:
            print(f"the first {len(summary.examples)} kept, as they would be imported:")
            for record in summary.examples:
                print("  " + "  ".join(f"{k} {_clip(record[k])}" for k in ("prompt", "chosen", "rejected"))
                      + ("" if record.get("label", "pair") == "pair" else f"  ({record['label']})"))
        if summary.raw_file:
            print(f"versioned as {summary.raw_file}")
        if summary.quarantine_file:
            print(f"set-aside rows with their line numbers: {summary.quarantine_file}")
        hint = chat_hint(summary, ws) or join_hint(summary, ws)
        if hint:
            print(f"note: {hint}")
        if problem:
            print(f"error: {summary.source_file}: {problem}", file=sys.stderr)
    if summary.push_error:  # the import stands (committed, in the local cache): said, not failed
        print(f"warning: {summary.push_error}", file=sys.stderr)
    return 1 if problem else 0


def _clip(text: str, width: int = 60) -> str:
    """A text as Python writes it (quotes, \\n), its end cut to `width` characters."""
    return repr(text if len(text) <= width else text[:width - 3] + "...")


def chat_hint(summary, ws) -> str | None:
    """What to set so a chat model reads imported conversations and dialogues as their turns."""
    from tasks.config import load_config

    if not summary.kept or (summary.format != "conversational" and not summary.dialogues):
        return None
    chat = load_config(ws.params if ws.params.exists() else None).chat
    if chat.template and (chat.hh_dialogue or not summary.dialogues):
        return None
    n = summary.dialogues
    what = (f"{n} of the {summary.kept} prompts {'is a dialogue' if n == 1 else 'are dialogues'} (earlier turns or a system message), "
            "kept in HH-RLHF's form ('\\n\\nHuman: ...\\n\\nAssistant:'); ") if summary.dialogues else ""
    return (what + "to train a chat model on them as its turns, set chat.template: true"
            + (" and chat.hh_dialogue: true" if summary.dialogues else "") + " (with models.policy) in params.yaml")


def join_hint(summary, ws) -> str | None:
    """Pairs a plain language model would read run together, said where chat.template is false."""
    from tasks.config import load_config
    from tasks.importers import run_together_note

    if not summary.run_together or load_config(ws.params if ws.params.exists() else None).chat.template:
        return None
    return run_together_note(summary)


def cmd_validate(args) -> int:
    from tasks.config import load_config
    from tasks.validate import policy_tokenizer, round_problems, validate_files, write_outputs
    from tasks.versioning import raw_files
    from tasks.workspace import Workspace

    ws = Workspace(args.workspace)
    cfg = load_config(ws.params if ws.params.exists() else None)
    out = args.out or ws.reports / "validate-cli"
    if args.rev:
        from tasks.versioning import VersioningError, raw_files_at

        try:
            files = raw_files_at(ws, args.rev, out / f"version-{args.rev[:10]}")
        except VersioningError as e:
            raise SystemExit(f"error: {e}") from None
    else:
        files = args.files or raw_files(ws)
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"error: no such file: {', '.join(missing)}")
    if not files:
        raise SystemExit(f"error: nothing to validate: no files given and {ws.raw_dir} holds no feedback")
    from tasks.importers import ImportError_, check_mapping, convert, decompressed, detect_format, is_json_array, parse_mapping

    try:
        mapping = parse_mapping(args.mapping)
    except ImportError_ as e:
        raise SystemExit(f"error: {e}") from None
    tokenizer = policy_tokenizer(ws, cfg)
    to_check, converted_bad = [], []
    given = {}  # a checked file's name -> (the file given, the line there of each of its rows, or None: the same)
    with contextlib.ExitStack() as stack:
        # other formats (HH-RLHF, CSV, Parquet, JSON arrays) are converted to records first; compressed files unpacked
        for n, f in enumerate(map(Path, files), start=1):
            try:
                readable = stack.enter_context(decompressed(f))
                fmt = detect_format(readable, mapping) if args.format == "auto" else args.format
                check_mapping(mapping, fmt, f)
                if fmt == "jsonl" and not mapping and not is_json_array(readable):  # our records as they are
                    to_check.append(readable)
                    given[readable.name] = (f.name, None)
                    continue
                (out / "converted").mkdir(parents=True, exist_ok=True)
                kept = out / "converted" / f"{n}-{readable.stem}.jsonl"
                bad = out / "converted" / f"{n}-{readable.stem}.set-aside.jsonl"
                lines: list[int] = []
                convert(readable, fmt, mapping, 0, kept, bad, name=f.name, lines=lines)
            except ImportError_ as e:
                raise SystemExit(f"error: {e}") from None
            to_check.append(kept)
            given[kept.name] = (f.name, lines)
            converted_bad += [json.loads(line) for line in bad.read_text(encoding="utf-8").splitlines()]
        result = validate_files(to_check, cfg.validate_, out / "gx", tokenizer, chat=cfg.chat_format)
    for row in result.quarantined:  # named by the file given and its line there, not the converted copy's
        name, lines = given.get(row["source_file"], (row["source_file"], None))
        row["source_file"] = name
        if lines and isinstance(row.get("line"), int) and 0 < row["line"] <= len(lines):
            row["line"] = lines[row["line"] - 1]
    result.quarantined += converted_bad
    summary = write_outputs(result, cfg.validate_, [str(f) for f in files], out / "accepted.jsonl",
                            out / "quarantine.jsonl", out / "validation.json",
                            round_problems(ws, cfg, result.accepted), out=str(out))  # the stage's verdict
    failures = summary["blocking_failures"]
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print(f"accepted {summary['accepted']}, set aside {summary['quarantined']}, ties/skips {summary['not_pairs']}")
        for reason, n in summary["reasons"].items():
            print(f"  {n:6d}  {reason}")
        for c in summary["checks"]:
            print(f"  {'ok  ' if c['passed'] else 'FAIL'}  {c['name']} ({c['severity']}): {c['observed']}")
        print(f"report: {out / 'validation.json'}; Data Docs: {summary['docs']}")
        for f in failures:
            print(f"error: blocking: {f}", file=sys.stderr)
    return 1 if failures else 0


def cmd_label(args) -> int:
    from flows.labelling import NothingToLabel, label, policy_to_label
    from flows.serve import configured_api_url, prefect_api
    from tasks.config import load_config
    from tasks.workspace import init_workspace

    ws = init_workspace(args.workspace.resolve())
    try:  # before any server starts
        policy_to_label(ws, load_config(ws.params))
    except NothingToLabel as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _sigterm_exits()
    temporary = not configured_api_url()
    with prefect_api(ws, ui=True) as api:
        if temporary:  # the form's UI lives as long as this command
            print(f"Prefect UI {api.removesuffix('/api')} (a temporary server, stopped when labelling ends): "
                  "the form is on the paused rlhf-label run", flush=True)
        summary = label(workspace=str(ws.root), pairs=args.pairs, batch_size=args.batch_size,
                        timeout_seconds=args.timeout, annotator=args.annotator or _login_name(), seed=args.seed)
    print(json.dumps(summary))
    return 0


def cmd_data(args) -> int:
    from tasks.versioning import history
    from tasks.workspace import Workspace

    versions = history(Workspace(args.workspace))
    if args.json:
        print(json.dumps([v.__dict__ for v in versions], indent=2))
        return 0
    if not versions:
        print("no feedback versioned yet")
    for v in versions:
        print(f"{v.commit[:10]}  {v.date}  {v.message}")
        for f in v.files:
            print(f"            {f}")
    return 0


def _workspace_config(args):
    from tasks.config import load_config
    from tasks.workspace import Workspace

    ws = Workspace(args.workspace)
    if not ws.params.exists():
        raise SystemExit(f"error: {ws.root} is not a workspace (no params.yaml); run `rlhf run` first")
    return ws, load_config(ws.params)


def cmd_gc(args) -> int:
    from tasks import registry, rounds
    from tasks.gc import collect_garbage, describe
    from tasks.versioning import VersioningError

    ws, cfg = _workspace_config(args)
    try:
        out = collect_garbage(ws, cfg, args.keep, args.remote, args.dry_run)
    except (rounds.RoundBusy, registry.RegistryError, VersioningError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2) if args.json else "\n".join(describe(out)))
    return 0


def cmd_registry(args) -> int:
    from tasks import registry

    ws, cfg = _workspace_config(args)
    try:
        if args.command == "compare":
            a, b = registry.default_refs(ws, cfg) if args.a is None else (args.a, args.b or "latest")
            out = (registry.head_to_head if args.evaluate else registry.compare)(ws, cfg, a, b)
            if args.json:
                print(json.dumps(out, indent=2))
                return 0
            win, judge = out.pop("win_rate", None), out.pop("judge", None)
            (la, a), (lb, b) = out.items()
            print(f"{'':34}{la + ' v' + a['version']:>30}{lb + ' v' + b['version']:>30}")
            rows = [(key, str(a[key]), str(b[key])) for key in ("round", "promoted")]
            rows.append(("measured in", a["measured_in"] or "never evaluated", b["measured_in"] or "never evaluated"))
            for key in sorted(set(a["metrics"]) | set(b["metrics"])):
                fa, fb = a["metrics"].get(key), b["metrics"].get(key)
                rows.append((key, "-" if fa is None else f"{fa:.4g}", "-" if fb is None else f"{fb:.4g}"))
            for key, fa, fb in rows:
                print(f"{key:34}{fa:>30}{fb:>30}")
            if win is not None:
                print(f"win-rate of v{a['version']} over v{b['version']}: {win['rate']:.3f} "
                      f"(95% interval {win['low']:.3f}-{win['high']:.3f}; the reward model's preference "
                      f"probability, higher score in {win['hard']:.3f} of the pairs)")
            if judge is not None:
                jw = judge["win_rate"]
                sides = ("" if judge["agreement"] is None else
                         f"; it sides with the reward model on {judge['agreement']:.0%} of the pairs")
                print(f"by the judge {judge['model']}: {jw['rate']:.3f} (95% interval {jw['low']:.3f}-{jw['high']:.3f})"
                      + sides)
        elif args.command == "promote":
            out = registry.force_promote(ws, cfg, args.version, args.reason, args.force)
            if args.json:
                print(json.dumps(out, indent=2))
                return 0
            print(f"{cfg.policy_name}: " + (f"v{out['champion']} is champion already" if out["was_champion"] else
                                            f"champion is now v{out['champion']}") + f" (previous: v{out['previous']})")
            print(_reward_line(cfg.reward_name, out["reward"]))
        else:
            out = registry.rollback(ws, cfg, args.reason)
            if args.json:
                print(json.dumps(out, indent=2))
                return 0
            policy = out[cfg.policy_name]
            print(f"{cfg.policy_name}: champion v{policy['from']} -> v{policy['to']} (previous: v{policy['from']}; "
                  "`rlhf rollback` again swaps them back)")
            print(_reward_line(cfg.reward_name, out[cfg.reward_name]))
    except registry.RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _reward_line(name: str, change: dict) -> str:
    """What a manual promotion or a rollback did to the reward champion."""
    if change["note"]:
        return f"{name}: {change['note']}"
    if change["from"] == change["to"]:
        return f"{name}: champion stays v{change['to']} (it trained this policy)"
    return f"{name}: champion v{change['from']} -> v{change['to']} (it trained this policy)"


def cmd_status(args) -> int:
    from tasks.config import load_config
    from tasks.gc import describe_usage
    from tasks.promote import describe_base
    from tasks.rounds import headline, status
    from tasks.stage import clock
    from tasks.workspace import Workspace

    ws = Workspace(args.workspace)
    if not ws.params.exists():
        raise SystemExit(f"error: {ws.root} is not a workspace (no params.yaml); run `rlhf run` first")
    info = status(ws, load_config(ws.params))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"workspace      {info['workspace']}")
    def v(x):
        return "none" if x is None else f"v{x}"

    print(f"champion       policy {v(info['champion']['policy_version'])}, reward {v(info['champion']['reward_version'])}")
    print(f"previous       policy {v(info['previous']['policy_version'])}, reward {v(info['previous']['reward_version'])}")
    if info["champion"]["policy_version"] is not None:
        print(f"base model     {describe_base(info['base_model'])}")
    keep = info["disk"]["keep_versions"]
    print(f"disk           {describe_usage(info['disk'])}; "
          + (f"each round keeps the weights of each model's aliased and newest {keep} versions" if keep else
             "nothing is pruned by itself (`rlhf gc`, refinement.keep_versions)"))
    if info["running"]:
        now = info["running"]
        print(f"running        round {now['round']}: " + (f"stage {now['stage']} for {clock(now['stage_seconds'])}"
                                                         if now["stage"] else "between stages"))
        if now["line"]:
            print(f"               {clock(now['line_seconds'])} ago: {now['line']}")
    if info["last_failure"]:
        failed = info["last_failure"]
        print(f"last failure   round {failed['round']}" + (f", stage {failed['stage']}" if failed["stage"] else "")
              + f", {failed['at']}: {failed['reason']}")
    last = info["last_round"]
    if not last:
        print("no round completed yet")
        return 0
    print(f"last round     {last['round']}: {'PROMOTED' if last['promoted'] else 'not promoted'}")
    print(f"{'gold metric' if last.get('gold_after') is not None else 'result':<15}{headline(last)}")
    print(f"KL             {last['kl']:.3f} nats to the reference")
    on_file = last.get("reward_eval_file_accuracy")  # (None, or missing from rounds before 2026-12-04)
    print(f"reward model   held-out accuracy {last['reward_accuracy']:.3f}"
          + (f", {on_file:.3f} on reward.eval_file" if on_file is not None else ""))
    print(f"win-rate       {last['win_rate']:.3f} against the champion (reward model)")
    if last.get("judge_win_rate") is not None:
        print(f"               {last['judge_win_rate']:.3f} by the judge (evaluate.judge)")
    for reason in last["reasons"]:
        print(f"  - {reason}")
    return 0


def cmd_server(args) -> int:
    from flows.serve import ServerError, start_servers
    from tasks.workspace import init_workspace

    ws = init_workspace(args.workspace.resolve())
    _sigterm_exits()  # `kill`, `timeout`: the servers (process groups of their own) stop with this command
    try:
        servers = start_servers(ws, args.host, args.prefect_port, args.mlflow_port, args.mlflow_auth)
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # from here on a signal stops the servers, also one that lands as this is printed
        ui = servers.prefect_url.removesuffix("/api")
        print(f"Prefect UI  {ui}\nMLflow UI   {servers.mlflow_url}\n"
              f"Point flows at it: export PREFECT_API_URL={servers.prefect_url} "
              f"MLFLOW_TRACKING_URI={servers.mlflow_url}\nCtrl-C stops both.", flush=True)
        while servers.prefect.poll() is None and (servers.mlflow is None or servers.mlflow.poll() is None):
            time.sleep(1)
        print("error: a server stopped; see .cache/servers/*.log", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        servers.stop()


def cmd_serve(args) -> int:
    from tasks.config import load_config
    from tasks.workspace import init_workspace

    ws_root = args.workspace.resolve()
    params = ws_root / "params.yaml"  # what every round of the workspace reads, and the cron
    cfg = load_config(params if params.exists() else None)  # a bad cron or config fails here, before anything starts
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import configured_api_url, serve

    servers, settings = None, contextlib.nullcontext()
    if not configured_api_url():  # the embedded servers, started here and stopped with us
        from flows.serve import ServerError, start_servers

        ws = init_workspace(ws_root)
        try:
            servers = start_servers(ws, prefect_port=args.prefect_port, mlflow_port=args.mlflow_port)
        except ServerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        os.environ["PREFECT_API_URL"] = servers.prefect_url  # the flow runs' processes
        settings = temporary_settings({PREFECT_API_URL: servers.prefect_url})  # this one: Prefect read its settings
        print(f"Prefect UI {servers.prefect_url.removesuffix('/api')}, MLflow UI {servers.mlflow_url}", flush=True)
    try:
        with settings:
            serve(str(ws_root), cfg)
    finally:
        if servers is not None:
            servers.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    _defaults_for_local_run()
    args = build_parser().parse_args(argv)
    from tasks.config import ConfigError
    from tasks.errors import ModelLoadError
    from tasks.promote import BaseChanged
    from tasks.rounds import RoundBusy
    from tasks.versioning import VersioningError

    try:
        if args.command in ("run", "status", "compare", "promote", "rollback", "gc", "label", "serve"):
            from tasks.tracking import check_reachable
            from tasks.workspace import USER_TRACKING_URI

            check_reachable(USER_TRACKING_URI)  # in seconds, not after MLflow's four minutes of retries
        commands = {"run": cmd_run, "status": cmd_status, "import": cmd_import, "data": cmd_data,
                    "validate": cmd_validate, "label": cmd_label,
                    "compare": cmd_registry, "promote": cmd_registry, "rollback": cmd_registry,
                    "gc": cmd_gc, "server": cmd_server, "serve": cmd_serve}
        code = commands[args.command](args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
        return code
    except BrokenPipeError:  # `rlhf compare | head`: the reader left; no traceback (Python's own advice)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ConfigError, ModelLoadError, BaseChanged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except VersioningError as e:  # a stage failed: its own message is at the end of what DVC printed
        print(f"error: {'the round stopped.' if args.command == 'run' else 'git or DVC failed:'}\n{e}", file=sys.stderr)
        return 1
    except RoundBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: a running stage was stopped with everything it started
        print("\ninterrupted." + (" `rlhf run` again goes on with the same round: DVC skips the stages that "
                                  "finished and PPO resumes from its last checkpoint." if args.command == "run" else ""),
              file=sys.stderr)
        return 130
    except Exception as e:  # MLflow's own errors (an unreachable or refusing tracking server): said, not a traceback
        if not type(e).__module__.startswith("mlflow."):
            raise
        from tasks.workspace import USER_TRACKING_URI

        store = USER_TRACKING_URI or "the workspace's mlflow.db"
        print(f"error: MLflow ({store}): {str(e).splitlines()[0][:500]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
