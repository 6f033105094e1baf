"""What every stage module shares: `python -m tasks.<stage>` reads the workspace it runs in
(DVC runs commands at the repository root), the config and the round state."""
from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Callable

import torch

from tasks.config import ConfigError, PipelineConfig, load_config
from tasks.modeling import ModelLoadError
from tasks.workspace import RoundState, Workspace


class StageError(RuntimeError):
    """A stage cannot go on; the message says why and what to do."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def quiet_libraries() -> None:
    """Progress bars and load reports of transformers and datasets drown the stage's own log."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


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
