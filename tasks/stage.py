"""What every stage module shares: `python -m tasks.<stage>` reads the workspace it runs in
(DVC runs commands at the repository root), the config and the round state."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Callable

from tasks.config import ConfigError, PipelineConfig, load_config
from tasks.errors import ModelLoadError
from tasks.workspace import RoundState, Workspace


class StageError(RuntimeError):
    """A stage cannot go on; the message says why and what to do."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    if "torch" in sys.modules:  # every stage that uses torch imports it at the top, before this runs
        sys.modules["torch"].manual_seed(seed)


def quiet_libraries() -> None:
    """Progress bars and load reports of transformers and datasets drown the stage's own log.
    Through the environment for libraries not imported yet (they read it when they are; a stage
    that never needs them does not pay seconds to import them), and for the processes started."""
    os.environ.update({"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                       "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.set_verbosity_error()
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def clock(s: float) -> str:
    """Seconds as people read them: '9s', '4m05s', '2h02m'."""
    if s >= 3600:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


def time_left(elapsed: float, done: int, to_do: int) -> str:
    """'1m10s, about 4m05s left': the time `done` steps took, and the `to_do` steps after them at
    that pace (nothing left said once none are)."""
    return clock(elapsed) + (f", about {clock(elapsed / done * to_do)} left" if done > 0 and to_do > 0 else "")


def stage_main(run: Callable[[Workspace, PipelineConfig, RoundState], object]) -> None:
    ws = Workspace(Path.cwd())
    quiet_libraries()
    try:
        cfg = load_config(ws.params)
        state = ws.read_state()
        seed_everything(cfg.seed + state.round)
        run(ws, cfg, state)
    except (ConfigError, ModelLoadError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
