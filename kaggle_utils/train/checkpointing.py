"""Where a training run's checkpoints and best weights live, when they are written, and how a run resumes.

`Checkpointer` owns all of it, so the training loop only says "a step happened" (`after_step`), "this
evaluation may be the best" (`keep_if_best`) and "give me the best back" (`load_best`):

* every `every_steps` optimizer steps (and at the last) a checkpoint ``checkpoints/step-N`` is written
  atomically (a temp directory renamed into place) with accelerate's `save_state` (optimizer, LR scheduler,
  grad scaler, Python/NumPy/torch/CUDA RNG states of every process) holding only the trainable tensors, plus
  `trainer_state.json` (`TrainState`: step, epoch, position in the epoch's batch order, history, best so far);
  older checkpoints are removed once the new one is in place;
* `resume` continues the newest complete checkpoint, refusing one of another run (`TrainState.fingerprint`);
* with selection "inner" the best weights (and their probabilities) are kept as ``best/step-N``. The best that
  the latest checkpoint names stays until a newer checkpoint supersedes it, so a run resumed from that
  checkpoint finds the weights its state names; a best newer than the resumed checkpoint is dropped.

Only the main process writes files; every process takes part in `save_state` (each adds its RNG state).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from kaggle_utils.core.config import PipelineConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.text.template import TEMPLATE_VERSION

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
STATE_FILE = "trainer_state.json"
BEST_WEIGHTS = "trainable.safetensors"
BEST_PROBS = "val_probs.npy"


@dataclass
class TrainState:
    """Everything besides tensors a resumed run needs (saved as trainer_state.json)."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed (always a whole accumulation group)
    tokens_seen: int = 0
    train_time_s: float = 0.0
    wall_time_s: float = 0.0
    loss_sum: float = 0.0  # since the last history entry
    loss_count: int = 0
    best_step: int = -1
    best_eval_loss: float = math.inf
    history: list[dict] = field(default_factory=list)
    fingerprint: str = (
        ""  # what the run is (config, fold, rows): a checkpoint of another run is never resumed
    )
    examples_seen: int = 0  # training examples (swapped copies included) over all processes


class Checkpointer:
    """Checkpoints, resume and best weights of one run under `out_dir` (see the module docstring)."""

    def __init__(self, out_dir: str | Path, accelerator: Any, trainable_names: set[str], every_steps: int):
        if every_steps < 1:
            raise UsageError("train.save_every_steps must be >= 1")
        self.out_dir = Path(out_dir)
        self.accelerator = accelerator
        self.every_steps = every_steps
        # Names as the unwrapped model has them: under DDP the prepared model's parameters are
        # "module."-prefixed but accelerate saves the unwrapped state dict (filtering by the prefixed names
        # kept nothing).
        self.trainable_names = {name.removeprefix("module.") for name in trainable_names}
        self._checkpointed_best = -1  # the best the latest checkpoint refers to: kept until superseded there
        self._register_trainable_only()

    # ------------------------------------------------------------------------------------------ resume

    def resume(self, fingerprint: str, resume: bool) -> tuple[TrainState, int | None]:
        """(state to continue from, the step it was saved at or None): the newest complete checkpoint with
        `resume`, else a fresh state (with resume=False the old checkpoints and best weights are removed)."""
        accelerator = self.accelerator
        state, resumed_from = TrainState(fingerprint=fingerprint), None
        latest = self.latest() if resume else None
        if latest is not None:
            saved = TrainState(**json.loads((latest / STATE_FILE).read_text(encoding="utf-8")))
            if saved.fingerprint != fingerprint:
                raise UsageError(
                    f"{latest} is a checkpoint of a different run (config, fold or training rows differ); "
                    "resume with the same settings, pass resume=False to start over, or use another output "
                    "directory"
                )
            accelerator.load_state(str(latest))
            state, resumed_from = saved, saved.global_step
            if accelerator.is_main_process:
                prune_best(self.out_dir, keep={state.best_step}, newer_than=state.global_step)
        elif not resume and accelerator.is_main_process:
            shutil.rmtree(self.out_dir / CHECKPOINTS_DIR, ignore_errors=True)
        if not resume and accelerator.is_main_process:
            shutil.rmtree(self.out_dir / BEST_DIR, ignore_errors=True)
        accelerator.wait_for_everyone()  # no process writes a checkpoint before the main one has cleared them
        self._checkpointed_best = state.best_step
        return state, resumed_from

    def latest(self) -> Path | None:
        """The newest complete checkpoint (one with its trainer_state.json), or None."""
        complete = [p for p in (self.out_dir / CHECKPOINTS_DIR).glob("step-*") if (p / STATE_FILE).is_file()]
        return max(complete, key=lambda p: p.name) if complete else None

    # -------------------------------------------------------------------------------------- during the run

    def after_step(self, state: TrainState, finished: bool) -> None:
        """Write a checkpoint when this step is due one (every `every_steps`, and the last step)."""
        if state.global_step % self.every_steps == 0 or finished:
            self.save(state)
            self._checkpointed_best = state.best_step
            if self.accelerator.is_main_process:
                prune_best(self.out_dir, keep={state.best_step})

    def save(self, state: TrainState) -> None:
        accelerator = self.accelerator
        root = self.out_dir / CHECKPOINTS_DIR
        final = root / f"step-{state.global_step:07d}"
        staging = root / f".{final.name}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()  # every process has written its RNG state before the rename
        if accelerator.is_main_process:
            (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            for old in root.glob("step-*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def keep_if_best(self, state: TrainState, model: nn.Module, probs: np.ndarray) -> bool:
        """After an evaluation (`state.history[-1]`): if it beats the best so far, record it in `state` and
        write its trainable weights and probabilities as best/step-N. Returns whether it was the best."""
        entry = state.history[-1]
        if not entry["eval_loss"] < state.best_eval_loss:
            return False
        state.best_eval_loss, state.best_step = entry["eval_loss"], entry["step"]
        if self.accelerator.is_main_process:
            self._write_best(model, probs, state.best_step, state.best_eval_loss)
        return True

    def _write_best(self, model: nn.Module, probs: np.ndarray, step: int, loss: float) -> None:
        from safetensors.torch import save_file

        target = best_dir(self.out_dir, step)
        staging = target.parent / f".{target.name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        tensors = {
            k: v.detach().contiguous().cpu()
            for k, v in self.accelerator.unwrap_model(model).state_dict().items()
            if k in self.trainable_names
        }
        save_file(tensors, str(staging / BEST_WEIGHTS))
        np.save(staging / BEST_PROBS, probs)
        (staging / "best.json").write_text(json.dumps({"step": step, "eval_loss": loss}), encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        prune_best(self.out_dir, keep={step, self._checkpointed_best})

    # ------------------------------------------------------------------------------------------ after the run

    def load_best(self, model: nn.Module, step: int) -> np.ndarray:
        """Put best/step-N's trainable weights into `model` (unwrapped); returns their held-out probs."""
        from safetensors.torch import load_file

        best = best_dir(self.out_dir, step)
        if not (best / BEST_WEIGHTS).is_file():
            raise UsageError(
                f"{best} is missing: the best weights of step {step} were not kept (was "
                f"{self.out_dir} edited while the run was stopped?)"
            )
        tensors = load_file(str(best / BEST_WEIGHTS), device=str(next(model.parameters()).device))
        result = model.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise UsageError(f"{best}: weights do not match the model ({result.unexpected_keys[:3]})")
        return np.load(best / BEST_PROBS)

    # ------------------------------------------------------------------------------------------ internals

    def _register_trainable_only(self) -> None:
        """Checkpoints carry only the trainable tensors; loading puts them back into the built model."""
        from safetensors.torch import load_file

        accelerator, names = self.accelerator, self.trainable_names

        def save_hook(models, weights, output_dir):
            for index in range(len(weights)):
                weights[index] = {
                    k: v for k, v in weights[index].items() if k.removeprefix("module.") in names
                }

        def load_hook(models, input_dir):
            for index, model in enumerate(models):
                model = accelerator.unwrap_model(model)
                file = Path(input_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")
                device = str(next(model.parameters()).device)
                tensors = {
                    k.removeprefix("module."): v for k, v in load_file(str(file), device=device).items()
                }
                result = model.load_state_dict(tensors, strict=False)
                absent = names - set(tensors)
                if result.unexpected_keys or absent:
                    raise UsageError(
                        f"checkpoint {input_dir} does not match the model "
                        f"(unexpected {result.unexpected_keys[:3]}, missing {sorted(absent)[:3]})"
                    )
            models.clear()

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)


def best_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / BEST_DIR / f"step-{step:07d}"


def prune_best(out_dir: Path, keep: set[int], newer_than: int | None = None) -> None:
    """Remove best/step-N directories not in `keep` (with `newer_than`: only those after that step)."""
    for path in (Path(out_dir) / BEST_DIR).glob("*step-*"):
        try:
            step = int(path.name.lstrip(".").split("step-")[1].split(".")[0])
        except (IndexError, ValueError):
            continue
        if step in keep and path.name.startswith("step-"):
            continue
        if newer_than is None or step > newer_than or not path.name.startswith("step-"):
            shutil.rmtree(path, ignore_errors=True)


def run_fingerprint(
    cfg: PipelineConfig,
    fold: int,
    train_ids: list,
    total_steps: int,
    targets: dict[str, np.ndarray] | None = None,
) -> str:
    """sha256 over what determines a run's trajectory: the format/model/LoRA/quant/train settings, the
    template version, the fold, the training row ids, the planned steps and, when rows carry soft targets
    (a teacher, pseudo-labels), their values: a teacher file rewritten under the same path is another run."""
    relevant = {name: getattr(cfg, name) for name in ("format", "model", "lora", "quant", "train")}
    content = {
        "sections": {k: asdict(v) for k, v in relevant.items()},
        "fold": fold,
        "template_version": TEMPLATE_VERSION,
        "train_ids": [str(i) for i in train_ids],
        "total_steps": total_steps,
    }
    if targets:  # absent without targets, so earlier runs' fingerprints (and their checkpoints) still match
        content["targets"] = {
            name: hashlib.sha256(np.ascontiguousarray(values, dtype=np.float64).tobytes()).hexdigest()
            for name, values in sorted(targets.items())
        }
    payload = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
