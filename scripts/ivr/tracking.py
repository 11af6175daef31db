"""TensorBoard event files of a training run, written through accelerate's trackers (training.tensorboard).

Every numeric field of a train_log.jsonl record (loss, grad_norm, lr, tokens, tokens_per_s, and whatever
else the loop logs, such as dev-split bits per byte) becomes a scalar of the same name at the record's
step, and each held-row check a scalar `held_rows_max_abs_change`. Only the main process writes.

The events live in <checkpoint dir>/tensorboard/ while training (`tensorboard --logdir results/checkpoints`
shows a run as it goes) and are copied into the trained model's folder at the end. A resumed run rebuilds
the folder from train_log.jsonl, which was cut back to the checkpoint's step, so the curve holds each
step once: the points a killed run logged after its last checkpoint are gone, as they are from the JSON
log (the rebuilt points carry the time of the rebuild, not of their first writing).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

FOLDER = "tensorboard"
DRIFT = "held_rows_max_abs_change"
FLUSH_SECS = 20  # how often the writer flushes (TensorBoard's default, 120 s, is long to watch a run by)


def accelerator_kwargs(settings: dict, checkpoint_dir: str | Path) -> dict:
    """Accelerator arguments that turn the TensorBoard tracker on (nothing when training.tensorboard is off)."""
    if not settings.get("tensorboard"):
        return {}
    from accelerate.utils import is_tensorboard_available

    if not is_tensorboard_available():
        from ivr.cli import UserError

        raise UserError("training.tensorboard is on but the tensorboard package is missing: install "
                        "requirements.txt (bash setup.sh), or set training.tensorboard: false")
    return {"log_with": "tensorboard", "project_dir": str(checkpoint_dir)}


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a log record but its step (booleans and None are not scalars)."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def log_record(accelerator, record: dict) -> None:
    values = scalars(record)
    if values:
        accelerator.log(values, step=record["step"])


def log_held_check(accelerator, step: int, change: float) -> None:
    accelerator.log({DRIFT: change}, step=step)


def start(accelerator, checkpoint_dir: str | Path, log_path: Path, checks: list[dict]) -> None:
    """Open the event files in <checkpoint_dir>/tensorboard/, rebuilt from the (cut back) JSON log and the
    held-row checks a resumed run carries; nothing when the Accelerator has no tracker."""
    if accelerator.is_main_process:  # also when off: no stale events of an earlier run go to the output
        shutil.rmtree(Path(checkpoint_dir) / FOLDER, ignore_errors=True)
    if not accelerator.log_with:
        return
    accelerator.init_trackers(FOLDER, init_kwargs={"tensorboard": {"flush_secs": FLUSH_SECS}})
    if accelerator.is_main_process:
        lines = log_path.read_text(encoding="utf-8").splitlines() if log_path.exists() else []
        for line in lines:
            log_record(accelerator, json.loads(line))
        for check in checks:
            log_held_check(accelerator, check["step"], check["max_abs_change"])
        flush(accelerator)


def flush(accelerator) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.tracker.flush()


def copy_events(checkpoint_dir: str | Path, out: Path) -> None:
    """Copy the (flushed) event files into the output folder being written, if there are any."""
    source = Path(checkpoint_dir) / FOLDER
    if source.is_dir():
        shutil.copytree(source, out / FOLDER)
