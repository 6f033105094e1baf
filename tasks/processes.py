"""Stopping a command together with everything it started.

Commands that start others (`dvc repro` starts the stage, `prefect server start` its API) run in
their own process group (`start_new_session=True`), so that stopping them stops the whole tree:
a PPO stage left running after its round was cancelled would hold the GPU and race the next round.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (a zombie nobody has reaped yet does not)."""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop_groups(*procs: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGTERM the process group of each process (started with start_new_session=True), wait up to
    `timeout` seconds for the groups to empty, then SIGKILL whatever is left."""
    live = [p for p in procs if p is not None]
    for proc in live:
        _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in live:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)  # the command is gone; what it started may still be on its way out
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def git_users(lock: Path, repo: Path) -> list[str]:
    """The processes that may be writing `lock` (a git lock file of `repo`), as 'pid (command)':
    a git running in the repository (or whose folder we may not read), or any process holding
    the file open (git holds its lock open until it renames it; so do DVC's and IDEs' git libraries)."""
    lock, repo = Path(os.path.realpath(lock)), Path(os.path.realpath(repo))
    users = []
    for proc in psutil.process_iter(["name", "cwd", "cmdline"]):
        try:
            if proc.pid == os.getpid():
                continue
            cwd = proc.info["cwd"]
            git_here = (proc.info["name"] or "").startswith("git") and (cwd is None or Path(cwd).is_relative_to(repo))
            if git_here or any(Path(f.path) == lock for f in proc.open_files()):
                users.append(f"{proc.pid} ({' '.join(proc.info['cmdline'] or [proc.info['name'] or '?'])[:80]})")
        except psutil.Error:
            continue
    return users
