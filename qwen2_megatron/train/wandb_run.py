"""One Weights & Biases run per training run, continued across restarts.

The run id is created once and kept in <run dir>/wandb_run_id; every restart resumes that id, so
a preempted and resumed run continues the same charts. Only the logging rank talks to W&B, and
the API key stays in W&B's own settings or environment: nothing here prints it.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from qwen2_megatron.train.config import WandbConfig

ID_FILE = "wandb_run_id"


class WandbRun:
    def __init__(self, cfg: WandbConfig, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        self.run = None
        if cfg.mode == "disabled":
            return
        import wandb

        id_file = run_dir / ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_name,
            tags=list(cfg.tags),
            mode=cfg.mode,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if v is not None and k != "step"}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
