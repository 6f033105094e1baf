"""Data versioning with DVC and git: immutable raw feedback files, stage runs, lineage.

We call the `dvc` and `git` command lines (the same commands a user types) rather than
DVC's Python internals: each call is its own process, so DVC's repository lock and state
never leak between stages or tests. The one exception only reads: which remotes are set
(`remotes`, DVC's own config reader, a tenth of the half second `dvc remote list` takes to start).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from tasks.processes import git_users, stop_groups
from tasks.records import write_jsonl_atomic
from tasks.workspace import Workspace

DEFAULT_REMOTE = ".dvcstore"  # <workspace>/.dvcstore (dvc stores it relative to .dvc/config)
# PYTHONUNBUFFERED: a stage's prints reach us as it prints them, not in blocks of 8 KiB at its end
_ENV = {"DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


STOP_TIMEOUT_S = 10  # a stopped stage gets this long to exit on SIGTERM; then SIGKILL


class VersioningError(RuntimeError):
    pass


def _run(args: list[str], cwd: Path, check: bool = True, env_extra: dict | None = None,
         on_line: Callable[[str], None] | None = None) -> subprocess.CompletedProcess:
    """Run a command to its end; `on_line` is given each line of its stdout as it comes."""
    env = {**os.environ, **_ENV, **(env_extra or {})}
    # Stage commands say `python`: make it this interpreter (the project's venv), as an activated venv would.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_SITE_CACHE_DIR", str(cwd / ".dvc" / "tmp" / "site-cache"))
    # Its own process group, stopped whole when this process is (a run cancelled in Prefect's UI gets
    # SIGTERM, which Prefect raises here; Ctrl-C): `dvc repro`'s stage must not run on, orphaned.
    with subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate() if on_line is None else _follow(popen, on_line)
        except BaseException:
            stop_groups(popen, timeout=STOP_TIMEOUT_S)
            raise
    proc = subprocess.CompletedProcess(args, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise failed(proc, cwd)
    return proc


def failed(proc: subprocess.CompletedProcess, cwd: Path) -> VersioningError:
    shown = " ".join(a if " " not in a else repr(a) for a in proc.args)
    return VersioningError(f"`{shown}` failed in {cwd} (exit {proc.returncode}):\n{failure(proc)}")


def _follow(popen: subprocess.Popen, on_line: Callable[[str], None]) -> tuple[str, str]:
    """popen.communicate(), handing each line of stdout to `on_line` as it is printed (stderr is
    read beside it, so that neither pipe fills and blocks the command)."""
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(popen.stderr.read()), daemon=True)
    reader.start()
    out = []
    for line in popen.stdout:
        out.append(line)
        on_line(line.rstrip("\n"))
    popen.wait()
    reader.join()
    return "".join(out), "".join(err)


# what DVC says of the collect stage's output with collect.simulate false: empty by design
EMPTY_COLLECTED = "WARNING: 'data/collected/round.jsonl' is empty."


def failure(proc: subprocess.CompletedProcess) -> str:
    """What a failed git or DVC command said, without DVC's "Having any troubles?" banner and its
    warnings that the round's collected pairs are empty (twice before every error of a round on
    people's feedback)."""
    text = "\n".join(line for line in (proc.stderr or proc.stdout or "").strip().splitlines()
                     if not line.startswith("Having any troubles?") and line.strip() != EMPTY_COLLECTED).strip()
    return text[-3000:] or f"no message (exit {proc.returncode})"


def dvc(ws: Workspace, *args: str, check: bool = True,
        on_line: Callable[[str], None] | None = None) -> subprocess.CompletedProcess:
    # stages log to this workspace's MLflow, whatever the parent process last pointed MLflow at
    return _run([sys.executable, "-m", "dvc", *args], ws.root, check, {"MLFLOW_TRACKING_URI": ws.tracking_uri},
                on_line)


def git(ws: Workspace, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    ident = ["-c", "user.name=rlhf-pipeline", "-c", "user.email=rlhf-pipeline@localhost"]
    has_ident = _run(["git", "config", "user.email"], ws.root, check=False).stdout.strip()
    command = ["git", *([] if has_ident else ident), *args]
    proc = _run(command, ws.root, check=False)
    if proc.returncode != 0 and "index.lock': File exists" in proc.stderr:
        note = free_index(ws)  # another git's lock: wait for it, or remove a dead one's, then once more
        if note:
            print(note, file=sys.stderr)
        proc = _run(command, ws.root, check=False)
    if check and proc.returncode != 0:
        raise failed(proc, ws.root)
    return proc


INDEX_WAIT_S = 60  # how long a git lock held by a live process is waited for


def free_index(ws: Workspace, wait_s: float | None = None) -> str | None:
    """Make sure git's `index.lock` will not stop the pipeline's next commit, which may come at
    the end of an hour of training. A git killed half way (SIGKILL, a crash, a full disk) leaves
    the lock behind, and every later `git add` fails until someone deletes it. A lock that no
    process may be writing (processes.git_users) is removed: returns a line saying so. One that a
    live git holds (yours, an editor's) is waited for up to `wait_s`; past that, an error that
    names it."""
    top, lock = _run(["git", "rev-parse", "--show-toplevel", "--git-path", "index.lock"], ws.root).stdout.split("\n")[:2]
    path = Path(lock) if Path(lock).is_absolute() else ws.root / lock
    wait_s = INDEX_WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    while path.exists():
        users = git_users(path, Path(top))
        if not users:
            try:
                age = time.time() - path.stat().st_mtime
                path.unlink()
            except FileNotFoundError:  # its git ended just now
                return None
            ago = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min" if age < 7200 else f"{age / 3600:.0f} h"
            return (f"removed {path}, left {ago} ago by a git that was stopped half way "
                    "(no process of this repository holds it)")
        if time.monotonic() > deadline:
            raise VersioningError(f"{path} is held by {', '.join(users)} for over {wait_s:.0f} s: git cannot "
                                  "commit in this workspace until it ends. If it is stuck, stop it")
        time.sleep(0.5)
    return None


def lock(ws: Workspace) -> FileLock:
    """Serialises every change to the data and git history of one workspace (imports, rounds)."""
    (ws.root / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    return FileLock(str(ws.root / ".dvc" / "tmp" / "rlhf-versioning.lock"), timeout=600)


def ensure_repos(ws: Workspace) -> None:
    """git init, dvc init and a default local remote, each only if missing; a fresh set-up is
    committed as the workspace's first commit."""
    fresh = False
    top = _run(["git", "rev-parse", "--show-toplevel"], ws.root, check=False)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ws.root:
        git(ws, "init", "-q")
        fresh = True
    if not (ws.root / ".dvc").is_dir():
        dvc(ws, "init", "-q")
        fresh = True
    if not remotes(ws):
        dvc(ws, "remote", "add", "-d", "local", DEFAULT_REMOTE)
        fresh = True
    gitignore = ws.root / ".gitignore"
    wanted = ["/.dvcstore/", "/mlruns/", "/mlflow.db", "/.cache/", "/reports/validation/", "/.prefect/"]
    present = gitignore.read_text().splitlines() if gitignore.exists() else []
    missing = [w for w in wanted if w not in present]
    if missing:
        gitignore.write_text("\n".join(present + missing) + "\n")
    if fresh:
        setup = [p for p in (".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore", "dvc.yaml",
                             "params.yaml", "state.yaml", "data/feedback/raw/.gitkeep",
                             "data/prompts/.gitkeep") if (ws.root / p).exists()]
        git(ws, "add", *setup)
        commit_paths(ws, "workspace: pipeline definition, DVC repository and local remote", setup)


def remotes(ws: Workspace) -> list[str]:
    """The DVC remotes set for the workspace, at every level `dvc remote list` reads (the
    repository's config, its config.local, your global and system configs)."""
    from dvc.config import Config, ConfigError

    try:
        return sorted(Config(dvc_dir=str(ws.root / ".dvc"))["remote"])
    except ConfigError as e:
        raise VersioningError(f"DVC's configuration of {ws.root} cannot be read: {e}") from None


def commit_paths(ws: Workspace, message: str, paths: list[str]) -> bool:
    """Commit the staged changes of `paths` alone (git commit --only); False if they have none.

    What else is staged in the repository (the user's own work, where the workspace is their
    project's checkout) stays staged and out of the pipeline's commit.
    """
    if git(ws, "diff", "--cached", "--quiet", "--", *paths, check=False).returncode == 0:
        return False
    git(ws, "commit", "-q", "-m", message, "--", *paths)
    return True


def file_md5(path: str | Path) -> str:
    """The hash DVC 3 gives a file (md5 of its bytes): the training-data hash on MLflow runs."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def add_raw_feedback(ws: Workspace, src: str | Path, round_: int, source: str, n_records: int,
                     digest: str | None = None, also: tuple[str, list[Path]] | None = None) -> Path:
    """Copy `src` into data/feedback/raw/ under a new immutable name, `dvc add` it and commit the
    pointer to git. The same bytes twice give the same file (nothing is added twice); two writers
    never clobber each other (lock + unique name). `also`: (a commit message, files): other files
    to version in the same `dvc add` (DVC takes half a second to start), committed after it."""
    digest = (digest or file_md5(src))[:12]  # an import passes the hash of the file as received
    safe_source = "".join(c if c.isalnum() or c in "-_" else "-" for c in source)
    dest = ws.raw_dir / f"round-{round_:04d}-{safe_source}-{digest}.jsonl"
    message, others = also or ("", [])
    with lock(ws):
        if not dest.exists():
            ws.raw_dir.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(".tmp")
            shutil.copyfile(src, tmp)
            tmp.replace(dest)
        pointer = dest.with_name(dest.name + ".dvc")
        to_add = ([] if pointer.exists() else [dest]) + list(others)
        if to_add:
            dvc(ws, "add", *(str(Path(f).relative_to(ws.root)) for f in to_add))
        # committed unless it is already: an attempt that stopped between `dvc add` and the commit
        # (git's index.lock left by a crash) left the pointer uncommitted, and the same file again
        # said "versioned" and committed nothing
        _commit_pointers(ws, [dest], f"data: round {round_} feedback ({source}, {n_records} records)")
        if others:
            _commit_pointers(ws, others, message)
    return dest


def _commit_pointers(ws: Workspace, files: list[Path], message: str) -> list[Path]:
    """Commit the DVC pointers of `files` (and the .gitignore files `dvc add` wrote beside them)."""
    rel = [str(Path(f).relative_to(ws.root)) for f in files]
    paths = [r + ".dvc" for r in rel] + sorted({str(Path(r).parent / ".gitignore") for r in rel})
    git(ws, "add", *paths)
    commit_paths(ws, message, paths)
    return [ws.root / (r + ".dvc") for r in rel]


def committed(ws: Workspace, data: Path) -> bool:
    """Whether `data`'s DVC pointer is committed as it is: an attempt stopped half way (a crash,
    git's index.lock) can leave the data copied and its pointer missing or uncommitted."""
    pointer = str(data.with_name(data.name + ".dvc").relative_to(ws.root))
    return (git(ws, "ls-files", "--error-unmatch", "--", pointer, check=False).returncode == 0
            and not git(ws, "status", "--porcelain", "--", pointer).stdout.strip())


def add_files(ws: Workspace, files: list[Path], message: str) -> list[Path]:
    """`dvc add` each file and commit the pointers (files stay where they are); returns the pointers."""
    with lock(ws):
        dvc(ws, "add", *(str(Path(f).relative_to(ws.root)) for f in files))
        return _commit_pointers(ws, files, message)


def push(ws: Workspace, *data: Path) -> str | None:
    """Push `data` (files DVC tracks; none: everything) to the workspace's DVC remote. Returns why
    it failed, or None. A failed push loses nothing: the data is committed and in the local DVC
    cache, and the next push (every round's ends with one of everything) sends it; so it is
    reported, and never stops an import, a label session or a round."""
    targets = [str(Path(d).relative_to(ws.root)) + ("" if str(d).endswith(".dvc") else ".dvc") for d in data]
    with lock(ws):
        out = dvc(ws, "push", *targets, check=False)
    if out.returncode == 0:
        return None
    said = failure(out).splitlines()
    reason = "; ".join(line for line in said if line.startswith("ERROR")) or said[-1]
    return (f"not pushed to the DVC remote ({reason}); it is committed and in the "
            f"local cache: `dvc push` in {ws.root} sends it once the remote is reachable, as the next round's push does")


def repro(ws: Workspace, stage: str, echo: Callable[[str], None] | None = None,
          stderr: Callable[[str], None] | None = None) -> bool:
    """Run one stage through DVC. Returns False when DVC skipped it as unchanged. `echo` is given
    each line the stage prints, as it prints it (DVC passes a stage's output through and shows it
    to no one else: a round's log would otherwise never see a stage's warnings or PPO's steps).
    `stderr` is given, once the stage has succeeded, each line written to stderr (a library's
    note or warning): a failed stage's stderr is in the error it raises."""
    own = StageLines()

    def relay(line: str) -> None:
        if own(line):
            echo(line)
            note_line(ws, stage, line)

    out = dvc(ws, "repro", "--single-item", stage, on_line=relay if echo is not None else None)
    for line in (out.stderr or "").splitlines() if stderr is not None else []:
        if line.strip() and line.strip() != EMPTY_COLLECTED:  # (DVC's, expected on people's feedback)
            stderr(line.rstrip())
    return "didn't change, skipping" not in out.stdout


def stage_line_file(ws: Workspace) -> Path:
    return ws.root / ".cache" / "stage_line.json"  # git-ignored: the round's own state


def note_line(ws: Workspace, stage: str, line: str) -> None:
    """The last line a relayed stage printed, and when, for `rlhf status` (rounds.running): a
    terminal sees 'ppo step 312/1000 ... about 25m left' without opening the Prefect UI."""
    # written whole, then renamed: status never reads half a file
    write_jsonl_atomic(stage_line_file(ws), [json.dumps({"stage": stage, "line": line[:500], "at": time.time()})])


class StageLines:
    """Which lines of `dvc repro`'s output, read in order, the stages printed: those after each
    stage's command ('> python -m tasks...') up to DVC's own next line; blank lines and trainers'
    logs of dicts (MLflow holds those) left out."""

    def __init__(self) -> None:
        self.inside = False

    def __call__(self, line: str) -> bool:
        if line.startswith("> "):
            self.inside = True
        elif line.startswith(("Running stage '", "Updating lock file", "Generating lock file", "Stage '")):
            self.inside = False
        elif self.inside and line.strip() and not line.startswith("{'"):
            return True
        return False


def stage_lines(dvc_output: str) -> list[str]:
    """What the stages printed, out of a whole `dvc repro` output (StageLines)."""
    own = StageLines()
    return [line for line in dvc_output.splitlines() if own(line)]


def commit_round(ws: Workspace, message: str) -> str | None:
    """Commit the round's lineage (dvc.lock, state.yaml, params.yaml, the prompts files of
    data/prompts/, small and in git); returns the commit, or None."""
    with lock(ws):
        paths = [p for p in ("dvc.lock", "state.yaml", "params.yaml", "dvc.yaml", "data/prompts",
                             "reports/validation.json", "reports/evaluation.json", "reports/evaluation.html",
                             "reports/decision.json", "reports/history.jsonl")
                 if (ws.root / p).exists()]
        paths.append(":(glob)**/.gitignore")  # the .gitignore files DVC writes beside stage outputs
        git(ws, "add", *paths)
        if not commit_paths(ws, message, paths):
            return None
        return head_commit(ws)


def check_remote_prunable(ws: Workspace) -> None:
    """Refuse to prune the remote while git history holds a feedback file the workspace lacks:
    the remote holds its only copy."""
    ever = git(ws, "log", "--all", "--format=", "--name-only", "--", "data/feedback").stdout.split()
    lost = sorted({p for p in ever if p.endswith(".dvc") and not (ws.root / p).exists()})
    if lost:
        raise VersioningError(f"{len(lost)} feedback file(s) in history are not in the workspace "
                              f"({', '.join(lost[:5])}): pruning the remote would delete their only copy. "
                              "Restore them (git checkout COMMIT -- FILE.dvc; dvc pull), or prune without --remote")


def collect_garbage(ws: Workspace, cloud: bool = False, dry_run: bool = False) -> dict:
    """`dvc gc --workspace`: drop the cached data the workspace no longer uses (earlier rounds'
    models and stage outputs; MLflow keeps the models that matter). Feedback is never dropped:
    every raw, received and set-aside file stays in the workspace, and with `cloud` (prune the
    remote too) a feedback file that history holds but the workspace lacks stops it, named.
    Returns the objects removed (or, dry, that would be) and their bytes where they are local."""
    flags = ["gc", "--workspace", "--force"] + (["--cloud"] if cloud else [])
    with lock(ws):
        if cloud:
            check_remote_prunable(ws)
        dry = dvc(ws, *flags, "--dry")
        listed = [Path(p) for p in re.findall(r"^Removing (.+)$", dry.stdout + dry.stderr, re.M)]
        result = {"objects": len(listed), "bytes": sum(p.stat().st_size for p in listed if p.is_file()),
                  "cloud": cloud, "dry_run": dry_run}
        if not dry_run and listed:
            dvc(ws, *flags)
    return result


def head_commit(ws: Workspace) -> str | None:
    out = git(ws, "rev-parse", "HEAD", check=False)
    return out.stdout.strip() if out.returncode == 0 else None


@dataclass
class DataVersion:
    commit: str
    date: str
    message: str
    files: list[str]


def history(ws: Workspace) -> list[DataVersion]:
    """Every commit that added raw feedback, newest first."""
    out = git(ws, "log", "--format=%H%x09%cI%x09%s", "--name-only", "--",
              str(ws.raw_dir.relative_to(ws.root)), check=False).stdout
    versions: list[DataVersion] = []
    for line in out.splitlines():
        if "\t" in line:
            commit, date, message = line.split("\t", 2)
            versions.append(DataVersion(commit, date, message, []))
        elif line.strip() and versions and line.endswith(".dvc"):
            versions[-1].files.append(line.strip()[:-4])
    return [v for v in versions if v.files]


def raw_files_at(ws: Workspace, rev: str, dest: Path) -> list[Path]:
    """The raw feedback as it was at git revision `rev`, brought back by DVC into `dest`."""
    listing = git(ws, "ls-tree", "-r", "--name-only", rev, "--", str(ws.raw_dir.relative_to(ws.root)), check=False)
    if listing.returncode != 0:
        raise VersioningError(f"unknown data version {rev!r}: {listing.stderr.strip()}; see `rlhf data history`")
    pointers = [p for p in listing.stdout.split() if p.endswith(".jsonl.dvc")]
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for pointer in pointers:
        target = dest / Path(pointer[:-4]).name
        if not target.exists():
            dvc(ws, "get", ".", pointer[:-4], "--rev", rev, "-o", str(target))
        out.append(target)
    return out


def raw_files(ws: Workspace) -> list[Path]:
    return sorted(ws.raw_dir.glob("*.jsonl")) if ws.raw_dir.exists() else []
