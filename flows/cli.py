"""`rlhf`: the command line of the pipeline.

    rlhf run [--rounds N] [--config FILE] [--workspace DIR] [--policy-model ID] [--reward-model ID]
    rlhf status [--json] [--workspace DIR]

Bad arguments and bad configs end with one line that names the problem (exit 2), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _defaults_for_local_run() -> None:
    # Prefect in local mode: an ephemeral server started by the flow itself, no analytics.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
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
    cfg = load_config(config_path, overrides)  # fails here, before any work, on a bad config

    from flows.pipeline import rlhf_loop

    results = rlhf_loop(workspace=str(ws_root), rounds_=args.rounds, config=cfg)
    for line in results:
        print(f"round {line['round']}: held-out neutral rate {line['gold_before']:.3f} -> {line['gold_after']:.3f}, "
              f"KL {line['kl']:.2f}, reward accuracy {line['reward_accuracy']:.2f}, win-rate {line['win_rate']:.2f}, "
              f"{'PROMOTED' if line['promoted'] else 'not promoted'}")
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


def cmd_status(args) -> int:
    from tasks.config import load_config
    from tasks.rounds import status
    from tasks.workspace import Workspace

    ws = Workspace(args.workspace)
    if not ws.params.exists():
        raise SystemExit(f"error: {ws.root} is not a workspace (no params.yaml); run `rlhf run` first")
    info = status(ws, load_config(ws.params))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"workspace      {info['workspace']}")
    print(f"champion       policy v{info['champion']['policy_version']}, reward v{info['champion']['reward_version']}")
    print(f"previous       policy v{info['previous']['policy_version']}, reward v{info['previous']['reward_version']}")
    last = info["last_round"]
    if not last:
        print("no round completed yet")
        return 0
    print(f"last round     {last['round']}: {'PROMOTED' if last['promoted'] else 'not promoted'}")
    print(f"gold metric    held-out neutral rate {last['gold_before']:.3f} -> {last['gold_after']:.3f}")
    print(f"KL             {last['kl']:.3f} nats to the reference")
    print(f"reward model   held-out accuracy {last['reward_accuracy']:.3f}")
    print(f"win-rate       {last['win_rate']:.3f} against the champion (reward model)")
    for reason in last["reasons"]:
        print(f"  - {reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    _defaults_for_local_run()
    args = build_parser().parse_args(argv)
    from tasks.config import ConfigError
    from tasks.modeling import ModelLoadError
    from tasks.versioning import VersioningError

    try:
        return {"run": cmd_run, "status": cmd_status}[args.command](args)
    except (ConfigError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except VersioningError as e:  # a stage failed: its own message is at the end of what DVC printed
        print(f"error: the round stopped.\n{e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
