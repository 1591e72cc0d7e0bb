"""The training loop on CPU with a tiny Gemma-2: both orderings learn, resume is exact, settings honoured."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import numpy as np
import polars as pl
import pytest
import torch

from kaggle_utils.core.config import FoldConfig, PipelineConfig, TrainConfig
from kaggle_utils.core.errors import DataError, UsageError
from kaggle_utils.core.metrics import log_loss
from kaggle_utils.data.folds import make_folds
from kaggle_utils.models.classifier import predict_probs
from kaggle_utils.train import checkpointing
from kaggle_utils.train import loop as training
from kaggle_utils.train.checkpointing import prune_best, run_fingerprint
from kaggle_utils.train.evaluation import LEARNING_CURVE_FILE, eval_interval
from kaggle_utils.train.fold_data import split_fold, split_inner
from kaggle_utils.train.head_roundtrip import check_unsloth_head_roundtrip
from kaggle_utils.train.model_setup import default_build_model, make_optimizer
from kaggle_utils.train.results import StepInfo
from kaggle_utils.train.steps import (
    NonFiniteLossError,
    epoch_batches,
    epoch_examples,
    examples_per_epoch,
    planned_steps,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


class SimulatedCrash(Exception):
    """Stands in for a Kaggle session dying mid-run."""


@pytest.fixture(scope="module")
def folds(train_data):
    return make_folds(train_data.frame, FoldConfig(n_folds=4, seed=0))


def learning_config(base_dir, ordering: str) -> PipelineConfig:
    """Settings under which the tiny model learns the generated signal in ~225 steps (10-40 s on 2 cores)."""
    cfg = PipelineConfig()
    cfg.model.base_model = str(base_dir)
    cfg.model.gradient_checkpointing = False
    cfg.format.max_length = 128
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 16, 32, 0.0
    cfg.train = TrainConfig(
        ordering=ordering,
        learning_rate=1e-3,
        epochs=3,
        per_device_batch_size=8,
        grad_accum=1,
        warmup_ratio=0.1,
        eval_every_steps=25,
        save_every_steps=1000,
    )
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("ordering", ["ft-then-quant", "quant-then-ft"])
def test_each_ordering_learns_below_the_class_prior(
    train_data, folds, demo_tokenizer, demo_base_dir, tmp_path, ordering
):
    cfg = learning_config(demo_base_dir, ordering)
    result = training.train_fold(
        cfg, train_data.frame, folds, demo_tokenizer, tmp_path, fold=0, progress=False
    )

    assert result.global_step == result.total_steps == 225  # 3 epochs x 75 batches of 8 (300 rows + swaps)
    assert result.train_examples == 2 * result.train_rows  # swap augmentation
    assert result.best_eval_loss < result.prior_log_loss - 0.03, [h["eval_loss"] for h in result.history]
    assert [h["step"] for h in result.history] == list(range(25, 226, 25))
    # selection="final": the last step's weights ship; the held-out fold (100 rows, under the monitor cap) was
    # the learning curve's sample, so the last evaluation is the shipped model's score.
    assert result.selection == "final" and result.best_step == result.global_step
    np.testing.assert_allclose(
        log_loss(result.val_labels, result.val_probs), result.history[-1]["eval_loss"], atol=1e-12
    )
    # the learning curve is a file in the run folder, written as the run goes: one line per evaluation
    curve = [json.loads(line) for line in (tmp_path / LEARNING_CURVE_FILE).read_text().splitlines()]
    assert curve == json.loads(json.dumps(result.history))
    assert curve[-1]["tokens_seen"] == result.tokens_seen and curve[-1]["eval_rows"] == len(result.val_labels)
    assert 0 < curve[-1]["eval_loss_se"] < 0.2 and curve[0]["tokens_seen"] < curve[-1]["tokens_seen"]
    from kaggle_utils.text.encode import encode_rows

    val_rows = encode_rows(
        train_data.frame.filter(pl.col("id").is_in(result.val_ids)), demo_tokenizer, cfg.format
    )
    np.testing.assert_allclose(
        predict_probs(result.model, val_rows.input_ids, demo_tokenizer.pad_token_id),
        result.val_probs,
        atol=1e-6,
    )
    quantized = any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())
    assert quantized == (ordering == "quant-then-ft")
    assert 0 < result.trainable_params < result.total_params
    assert result.tokens_seen > 0 and result.peak_rss_bytes > 0 and result.peak_cuda_bytes is None


def _resume_config(base_dir, ordering: str = "ft-then-quant") -> PipelineConfig:
    cfg = learning_config(base_dir, ordering)
    cfg.format.max_length = 128
    cfg.lora.r, cfg.lora.dropout = 4, 0.1  # dropout draws random numbers: the RNG state must be restored too
    cfg.model.gradient_checkpointing = True  # and the recomputed forward must draw the same dropout masks
    cfg.train = TrainConfig(
        ordering=ordering,
        learning_rate=1e-3,
        epochs=1.5,
        per_device_batch_size=8,
        grad_accum=2,
        eval_every_steps=3,
        save_every_steps=5,
    )
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("ordering", ["ft-then-quant", "quant-then-ft"])
def test_an_interrupted_run_resumes_to_the_same_step_and_result(
    train_data, demo_tokenizer, demo_base_dir, tmp_path, ordering
):
    frame = train_data.frame.head(120)
    folds = make_folds(frame, FoldConfig(n_folds=4, seed=0))
    cfg = _resume_config(demo_base_dir, ordering)

    straight = training.train_fold(cfg, frame, folds, demo_tokenizer, tmp_path / "straight", progress=False)
    steps_per_epoch = int(np.ceil(np.ceil(straight.train_examples / 8) / 2))  # batches of 8, accumulation 2
    assert straight.total_steps == int(np.ceil(1.5 * steps_per_epoch)) > steps_per_epoch > 8

    def crash_at_8(info: StepInfo) -> None:
        if info.step == 8:
            raise SimulatedCrash

    with pytest.raises(SimulatedCrash):
        training.train_fold(
            cfg, frame, folds, demo_tokenizer, tmp_path / "resumed", on_step=crash_at_8, progress=False
        )
    resumed = training.train_fold(cfg, frame, folds, demo_tokenizer, tmp_path / "resumed", progress=False)

    assert resumed.resumed_from_step == 5  # the last checkpoint before the crash; steps 6-8 are redone
    assert resumed.global_step == straight.global_step == straight.total_steps
    assert [h["eval_loss"] for h in resumed.history] == [h["eval_loss"] for h in straight.history]
    assert resumed.best_step == straight.best_step
    straight_state, resumed_state = straight.model.state_dict(), resumed.model.state_dict()
    for name, param in straight.model.named_parameters():
        if param.requires_grad:
            assert torch.equal(straight_state[name], resumed_state[name]), name
    np.testing.assert_array_equal(resumed.val_probs, straight.val_probs)

    # A finished run continues as finished: nothing is trained again.
    again = training.train_fold(cfg, frame, folds, demo_tokenizer, tmp_path / "resumed", progress=False)
    assert again.resumed_from_step == straight.total_steps and again.history == resumed.history


def test_resume_false_discards_old_checkpoints(train_data, demo_tokenizer, demo_base_dir, tmp_path):
    frame = train_data.frame.head(60)
    folds = make_folds(frame, FoldConfig(n_folds=3, seed=0))
    cfg = _resume_config(demo_base_dir)
    cfg.train.max_steps = 2
    first = training.train_fold(cfg, frame, folds, demo_tokenizer, tmp_path, progress=False)
    assert first.resumed_from_step is None and (tmp_path / "checkpoints").is_dir()
    assert (
        training.train_fold(cfg, frame, folds, demo_tokenizer, tmp_path, progress=False).resumed_from_step
        == 2
    )
    assert (
        training.train_fold(
            cfg, frame, folds, demo_tokenizer, tmp_path, resume=False, progress=False
        ).resumed_from_step
        is None
    )


def test_resume_refuses_a_checkpoint_of_another_run(train_data, demo_tokenizer, demo_base_dir, tmp_path):
    frame = train_data.frame.head(60)
    folds = make_folds(frame, FoldConfig(n_folds=3, seed=0))
    cfg = _resume_config(demo_base_dir)
    cfg.train.max_steps = 2
    training.train_fold(cfg, frame, folds, demo_tokenizer, tmp_path, progress=False)
    cfg.train.learning_rate = 5e-4
    with pytest.raises(UsageError, match="different run"):
        training.train_fold(cfg, frame, folds, demo_tokenizer, tmp_path, progress=False)
    other_rows = train_data.frame.slice(60, 60)
    cfg.train.learning_rate = 1e-3
    with pytest.raises(UsageError, match="different run"):
        training.train_fold(
            cfg,
            other_rows,
            make_folds(other_rows, FoldConfig(n_folds=3, seed=0)),
            demo_tokenizer,
            tmp_path,
            progress=False,
        )


def test_epoch_batches_are_reproducible_and_split_between_processes():
    lengths = np.arange(10, 110)
    cfg = TrainConfig(per_device_batch_size=4, seed=3)
    one = epoch_batches(lengths, cfg, epoch=0)
    assert one == epoch_batches(lengths, cfg, epoch=0) != epoch_batches(lengths, cfg, epoch=1)
    assert sorted(i for batch in one for i in batch) == list(range(100))
    rank0, rank1 = (epoch_batches(lengths, cfg, 0, rank=r, world=2) for r in (0, 1))
    assert len(rank0) == len(rank1) == 12 and not {i for b in rank0 for i in b} & {
        i for b in rank1 for i in b
    }
    assert planned_steps(100, TrainConfig(per_device_batch_size=4, grad_accum=3, epochs=2)) == 18
    assert planned_steps(100, TrainConfig(per_device_batch_size=4, grad_accum=3, epochs=2, max_steps=5)) == 5
    with pytest.raises(UsageError):
        planned_steps(100, TrainConfig(epochs=0))


def test_optimizer_is_8bit_on_cuda_and_torch_adamw_on_cpu():
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(4, 4))
    model.add_module("score", torch.nn.Module())
    model.score.add_module("modules_to_save", torch.nn.Linear(4, 3))
    cfg = TrainConfig(learning_rate=1e-4, head_learning_rate=1e-3)
    cpu = make_optimizer(model, cfg, torch.device("cpu"))
    assert type(cpu) is torch.optim.AdamW
    assert [g["lr"] for g in cpu.param_groups] == [1e-4, 1e-3]
    assert isinstance(make_optimizer(model, cfg, torch.device("cuda")), bnb.optim.AdamW8bit)
    assert isinstance(
        make_optimizer(model, TrainConfig(optimizer="adamw_8bit"), torch.device("cpu")),
        bnb.optim.AdamW8bit,
    )


def test_unsloth_backend_is_refused_on_cpu_with_one_clear_message(demo_tokenizer):
    cfg = PipelineConfig()
    cfg.train.backend = "unsloth"
    with pytest.raises(UsageError, match="needs a CUDA GPU.*no classification head"):
        default_build_model(cfg, demo_tokenizer, torch.device("cpu"))


def test_fold_split_errors_name_the_problem(train_data, folds):
    frame = train_data.frame
    with pytest.raises(UsageError, match="fold 7 is not in the folds file"):
        split_fold(frame, folds, 7)
    unlabelled = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("label")).alias("label")
    )
    with pytest.raises(DataError, match="1 rows have no label"):
        split_fold(unlabelled, folds, 0)
    train, val = split_fold(frame, folds, 1)
    assert train.height + val.height == frame.height and not set(train["id"]) & set(val["id"])


def test_peak_memory_sees_an_allocation_inside_the_block():
    """Run in a fresh process: inside the long test session the process holds GBs of cold pages that the
    host's memory reclaim (DAMON) may page out while the block allocates, leaving the high-water mark flat."""
    import subprocess
    import sys

    script = (
        "import numpy as np\n"
        "from kaggle_utils.train.results import PeakMemory\n"
        "with PeakMemory('cpu') as before:\n"
        "    pass\n"
        "with PeakMemory('cpu') as during:\n"
        "    block = np.ones(40_000_000)  # 320 MB\n"
        "    block[::4096] = 2.0\n"
        "    del block\n"
        "print(during.peak_rss_bytes - before.peak_rss_bytes, during.rss_is_lifetime_peak)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    grown, lifetime = int(out[-2]), out[-1] == "True"
    assert grown > 250_000_000 or lifetime


def test_a_best_saved_after_the_last_checkpoint_is_dropped_on_resume(tmp_path):
    """The resumed state names the best as of its checkpoint; a newer best/ from the lost steps must not
    survive (on GPU the replayed steps need not reproduce it bit for bit)."""
    for step in (3, 6, 9):
        (tmp_path / "best" / f"step-{step:07d}").mkdir(parents=True)
    (tmp_path / "best" / ".step-0000012.tmp").mkdir()
    prune_best(tmp_path, keep={3}, newer_than=6)
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["step-0000003", "step-0000006"]
    prune_best(tmp_path, keep={6})
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["step-0000006"]


def test_run_fingerprint_changes_with_the_template_version(monkeypatch):
    """A checkpoint written under one encoding (template/truncation version) is not resumed under another."""
    cfg = PipelineConfig()
    before = run_fingerprint(cfg, 0, [1, 2, 3], 10)
    assert run_fingerprint(cfg, 0, [1, 2, 3], 10) == before
    monkeypatch.setattr(checkpointing, "TEMPLATE_VERSION", "arena-pair-test")  # its own binding of it
    assert run_fingerprint(cfg, 0, [1, 2, 3], 10) != before


class _FakeUnslothSave:
    """Stands in for unsloth's `save_pretrained_merged` on a plain peft model (unsloth itself is GPU-only):
    merges a copy and saves it, optionally broken the way a faulty export breaks it."""

    def __init__(self, model, break_with=None):
        self.model, self.break_with = model, break_with

    def __call__(self, out_dir: str, tokenizer, save_method: str = "merged_16bit") -> None:
        import copy

        merged = copy.deepcopy(self.model).merge_and_unload()
        if self.break_with is not None:
            self.break_with(merged)
        merged.save_pretrained(out_dir)


def _trained_classifier(demo_tokenizer, demo_base_dir):
    from kaggle_utils.core.config import LoraSettings, ModelConfig
    from kaggle_utils.models.classifier import apply_lora, build_classifier

    base = build_classifier(
        ModelConfig(base_model=str(demo_base_dir)),
        pad_token_id=demo_tokenizer.pad_token_id,
        device=torch.device("cpu"),
    )
    model = apply_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # a "trained" head and LoRA: far from their initial values
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


def test_head_roundtrip_check_raises_when_the_reload_differs(demo_tokenizer, demo_base_dir, tmp_path):
    model = _trained_classifier(demo_tokenizer, demo_base_dir)
    probe = [demo_tokenizer("a probe row " * k)["input_ids"] for k in range(1, 7)]

    model.save_pretrained_merged = _FakeUnslothSave(model)
    good = check_unsloth_head_roundtrip(model, demo_tokenizer, tmp_path / "good", probe)
    assert good["num_labels"] == 3 and good["head_max_abs_diff"] < 1e-6 and good["probs_max_abs_diff"] < 1e-5

    def drop_head(merged):  # the head re-initialised: what unsloth's merged save is known to do
        with torch.no_grad():
            merged.score.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))

    model.save_pretrained_merged = _FakeUnslothSave(model, drop_head)
    with pytest.raises(UsageError, match="score head differs"):
        check_unsloth_head_roundtrip(model, demo_tokenizer, tmp_path / "no-head", probe)

    def lose_the_adapter(merged):  # head intact, body wrong: only the probabilities show it
        with torch.no_grad():
            for module in merged.model.layers:
                module.mlp.down_proj.weight.mul_(-3.0)

    model.save_pretrained_merged = _FakeUnslothSave(model, lose_the_adapter)
    with pytest.raises(UsageError, match="probabilities on the probe rows differ"):
        check_unsloth_head_roundtrip(model, demo_tokenizer, tmp_path / "no-body", probe)


def _counting_evaluate(monkeypatch) -> list[int]:
    """Record the number of rows of every evaluation train_fold makes."""
    calls: list[int] = []
    original = training.evaluate_rows

    def counting(accelerator, model, input_ids, *args, **kwargs):
        calls.append(len(input_ids))
        return original(accelerator, model, input_ids, *args, **kwargs)

    monkeypatch.setattr(training, "evaluate_rows", counting)
    return calls


@pytest.mark.parametrize("selection", ["final", "inner"])
def test_reported_fold_is_scored_once_by_the_shipped_weights(
    train_data, demo_tokenizer, demo_base_dir, tmp_path, monkeypatch, selection
):
    """Evaluation during training is bounded (evals_per_run x eval_rows_cap rows) and never on the whole
    reported fold; that fold is scored exactly once, at the end, by the weights that ship."""
    frame = train_data.frame.head(160)
    folds = make_folds(frame, FoldConfig(n_folds=4, seed=0))
    cfg = _resume_config(demo_base_dir)
    cfg.lora.dropout = 0.0
    cfg.model.gradient_checkpointing = False
    cfg.train = TrainConfig(
        learning_rate=1e-3,
        epochs=1,
        per_device_batch_size=8,
        grad_accum=1,
        max_steps=12,
        save_every_steps=100,
        selection=selection,
        eval_rows_cap=16,
        evals_per_run=3,
        inner_holdout_fraction=0.2,
    )
    calls = _counting_evaluate(monkeypatch)
    final_weights = {}

    def remember(info: StepInfo) -> None:
        if info.step == 12:
            model = holder["model"]
            final_weights.update(
                {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
            )

    holder = {}

    def build(cfg_, tokenizer_, device):
        holder["model"] = default_build_model(cfg_, tokenizer_, device)
        return holder["model"]

    result = training.train_fold(
        cfg,
        frame,
        folds,
        demo_tokenizer,
        tmp_path,
        fold=0,
        build_model=build,
        on_step=remember,
        progress=False,
    )
    n_val = len(result.val_ids)
    assert n_val > 16
    # 3 bounded evaluations (the cap: 16 rows), then the whole reported fold exactly once
    assert len(calls) == 4 and len(set(calls[:-1])) == 1 and 0 < calls[0] <= 16 and calls[-1] == n_val
    assert [h["step"] for h in result.history] == [4, 8, 12]
    assert log_loss(result.val_labels, result.val_probs) == pytest.approx(
        log_loss(
            result.val_labels,
            predict_probs(
                result.model, _val_input_ids(frame, result, demo_tokenizer, cfg), demo_tokenizer.pad_token_id
            ),
        ),
        abs=1e-9,
    )
    shipped = dict(result.model.named_parameters())
    if selection == "final":
        assert result.best_step == 12 and "learning curve only" in result.eval_set and calls[0] == 16
        for name, value in final_weights.items():
            assert torch.equal(shipped[name], value), name
    else:
        assert result.best_step == min(result.history, key=lambda h: h["eval_loss"])["step"]
        assert result.best_eval_loss == min(h["eval_loss"] for h in result.history)
        assert "inner holdout" in result.eval_set
        # the inner holdout came out of the training part: fewer rows trained than the fold split leaves
        train_part, _ = split_fold(frame, folds, 0)
        assert result.train_rows == train_part.height - calls[0]


def _val_input_ids(frame, result, tokenizer, cfg):
    from kaggle_utils.text.encode import encode_rows

    return encode_rows(frame.filter(pl.col("id").is_in(result.val_ids)), tokenizer, cfg.format).input_ids


def test_inner_holdout_takes_whole_prompt_groups_from_the_training_part(train_data, folds):
    train_part, val_part = split_fold(train_data.frame, folds, 0)
    cfg = TrainConfig(selection="inner", inner_holdout_fraction=0.05, eval_rows_cap=512, seed=3)
    rest, inner = split_inner(train_part, folds, cfg)
    assert rest.height + inner.height == train_part.height
    assert 0 < inner.height <= int(np.ceil(0.05 * train_part.height))
    assert not set(inner["id"]) & set(rest["id"]) and not set(inner["id"]) & set(val_part["id"])
    group_of = dict(zip(folds["id"].to_list(), folds["group"].to_list(), strict=True))
    assert not {group_of[i] for i in inner["id"]} & {group_of[i] for i in rest["id"]}
    again, _ = split_inner(train_part, folds, cfg)
    assert again["id"].to_list() == rest["id"].to_list()  # seeded: resumable
    capped = split_inner(train_part, folds, TrainConfig(inner_holdout_fraction=0.5, eval_rows_cap=7))[1]
    assert 0 < capped.height <= 7
    with pytest.raises(UsageError, match="inner_holdout_fraction"):
        split_inner(train_part, folds, TrainConfig(inner_holdout_fraction=0.0))


def test_eval_interval_gives_a_fixed_number_of_evaluations():
    assert eval_interval(11_500, TrainConfig()) == 1150  # 10 evaluations per run by default
    assert eval_interval(7, TrainConfig(evals_per_run=10)) == 1
    assert eval_interval(100, TrainConfig(eval_every_steps=30)) == 30
    with pytest.raises(UsageError):
        eval_interval(100, TrainConfig(evals_per_run=0))


def test_random_swap_shows_each_row_once_per_epoch_in_a_seeded_order():
    cfg = TrainConfig(swap_augment="random", seed=5)
    n = 1000
    first = epoch_examples(n, cfg, epoch=0)
    assert len(first) == n and sorted(first % n) == list(range(n))  # every row exactly once
    assert 400 < int((first >= n).sum()) < 600  # about half in the swapped order
    np.testing.assert_array_equal(first, epoch_examples(n, cfg, epoch=0))  # resumable
    assert not np.array_equal(first, epoch_examples(n, cfg, epoch=1))  # a new draw each epoch
    assert not np.array_equal(first, epoch_examples(n, TrainConfig(swap_augment="random", seed=6), 0))
    np.testing.assert_array_equal(epoch_examples(n, TrainConfig(swap_augment="double"), 0), np.arange(2 * n))
    np.testing.assert_array_equal(epoch_examples(n, TrainConfig(swap_augment="none"), 0), np.arange(n))
    assert examples_per_epoch(n, cfg) == n == examples_per_epoch(n, TrainConfig(swap_augment="none"))
    assert examples_per_epoch(n, TrainConfig(swap_augment="double")) == 2 * n
    with pytest.raises(UsageError, match="swap_augment"):
        examples_per_epoch(n, TrainConfig(swap_augment="sometimes"))


def test_random_swap_trains_one_order_per_row_and_epoch(train_data, demo_tokenizer, demo_base_dir, tmp_path):
    frame = train_data.frame.head(64)
    folds = make_folds(frame, FoldConfig(n_folds=4, seed=0))
    cfg = _resume_config(demo_base_dir)
    cfg.train = TrainConfig(
        learning_rate=1e-3,
        epochs=1,
        per_device_batch_size=8,
        grad_accum=1,
        save_every_steps=100,
        swap_augment="random",
        eval_rows_cap=8,
        evals_per_run=1,
    )
    result = training.train_fold(cfg, frame, folds, demo_tokenizer, tmp_path, progress=False)
    assert result.train_examples == result.train_rows  # not doubled
    assert result.total_steps == result.global_step == int(np.ceil(result.train_rows / 8))


# -------------------------------------------------------------------------------------- loss, callbacks


def _tiny_run_config(base_dir) -> PipelineConfig:
    cfg = _resume_config(base_dir)
    cfg.lora.dropout = 0.0
    cfg.model.gradient_checkpointing = False
    cfg.train = TrainConfig(
        learning_rate=1e-3,
        epochs=1,
        per_device_batch_size=4,
        grad_accum=2,
        max_steps=4,
        save_every_steps=1000,
        eval_rows_cap=8,
        evals_per_run=2,
    )
    return cfg


def _trainable(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_default_loss_is_the_classifiers_own_loss(train_data, demo_tokenizer, demo_base_dir):
    from kaggle_utils.text.batching import PadCollator
    from kaggle_utils.text.encode import encode_rows
    from kaggle_utils.train.losses import cross_entropy_loss

    cfg = _tiny_run_config(demo_base_dir)
    model = default_build_model(cfg, demo_tokenizer, torch.device("cpu"))
    rows = encode_rows(train_data.frame.head(5), demo_tokenizer, cfg.format)
    batch = PadCollator(demo_tokenizer.pad_token_id)(
        [
            {"input_ids": ids, "labels": int(label)}
            for ids, label in zip(rows.input_ids, rows.labels, strict=True)
        ]
    )
    out = model(**batch)
    assert torch.equal(cross_entropy_loss(out.logits, batch), out.loss)


def test_soft_target_loss_with_one_hot_targets_trains_like_the_default(
    train_data, demo_tokenizer, demo_base_dir, tmp_path
):
    """Distillation is a loss function plus a batch field: one-hot soft targets (swapped with the rows) train
    exactly as the default cross-entropy; other targets train differently."""
    from kaggle_utils.train.losses import soft_target_cross_entropy

    frame = train_data.frame.head(60)
    folds = make_folds(frame, FoldConfig(n_folds=3, seed=0))
    cfg = _tiny_run_config(demo_base_dir)
    assert (
        cfg.train.swap_augment == "double"
    )  # the swapped copies' targets must be swapped as their labels are
    one_hot = np.eye(3)[frame["label"].to_numpy()]
    smoothed = 0.8 * one_hot + 0.2 / 3
    frame = frame.with_columns(
        pl.Series("soft_labels", one_hot.tolist()), pl.Series("smoothed", smoothed.tolist())
    )

    default = training.train_fold(cfg, frame, folds, demo_tokenizer, tmp_path / "default", progress=False)
    soft = training.train_fold(
        cfg,
        frame,
        folds,
        demo_tokenizer,
        tmp_path / "soft",
        progress=False,
        loss_fn=soft_target_cross_entropy,
        target_columns=["soft_labels"],
    )
    other = training.train_fold(
        cfg,
        frame,
        folds,
        demo_tokenizer,
        tmp_path / "other",
        progress=False,
        loss_fn=lambda logits, batch: soft_target_cross_entropy(logits, batch, "smoothed"),
        target_columns=["smoothed"],
    )

    expected, got, changed = _trainable(default.model), _trainable(soft.model), _trainable(other.model)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-7)
    assert max(float((changed[name] - value).abs().max()) for name, value in expected.items()) > 1e-4
    assert [h["train_loss"] for h in soft.history] == pytest.approx(
        [h["train_loss"] for h in default.history], abs=1e-6
    )


def test_target_columns_must_be_class_vectors_in_every_row(
    train_data, demo_tokenizer, demo_base_dir, tmp_path
):
    frame = train_data.frame.head(60)
    folds = make_folds(frame, FoldConfig(n_folds=3, seed=0))
    cfg = _tiny_run_config(demo_base_dir)
    with pytest.raises(DataError, match="no target column 'teacher'"):
        training.train_fold(
            cfg, frame, folds, demo_tokenizer, tmp_path / "a", target_columns=["teacher"], progress=False
        )
    vectors = [[0.2, 0.3, 0.5]] * frame.height
    vectors[7] = [0.5, 0.5]
    bad = frame.with_columns(pl.Series("teacher", vectors, dtype=pl.List(pl.Float64)))
    with pytest.raises(DataError, match=r"column 'teacher', row \d+ \(id .*\): expected a vector"):
        training.train_fold(
            cfg, bad, folds, demo_tokenizer, tmp_path / "b", target_columns=["teacher"], progress=False
        )


def test_step_callbacks_see_step_tokens_examples_and_model(
    train_data, demo_tokenizer, demo_base_dir, tmp_path
):
    frame = train_data.frame.head(60)
    folds = make_folds(frame, FoldConfig(n_folds=3, seed=0))
    cfg = _tiny_run_config(demo_base_dir)
    seen: list[StepInfo] = []
    models = []

    result = training.train_fold(
        cfg,
        frame,
        folds,
        demo_tokenizer,
        tmp_path,
        progress=False,
        on_step=[seen.append, lambda info: models.append(info.model)],
    )

    assert [info.step for info in seen] == [1, 2, 3, 4] and all(info.total_steps == 4 for info in seen)
    assert [info.examples_seen for info in seen] == [8, 16, 24, 32]  # batches of 4, accumulation 2
    tokens = [info.tokens_seen for info in seen]
    assert 0 < tokens[0] < tokens[1] < tokens[2] < tokens[3] == result.tokens_seen
    assert all(model is result.model for model in models)
    assert all(np.isfinite(info.loss) and info.loss > 0 for info in seen)
    assert len(seen[-1].history) == len(result.history) == 2


def test_training_stops_at_the_first_non_finite_loss(train_data, demo_tokenizer, demo_base_dir, tmp_path):
    """A NaN loss (float16 overflow, divergence) stops training with one line naming the step and a fix,
    instead of training on into garbage."""
    from kaggle_utils.train.losses import cross_entropy_loss

    frame = train_data.frame.head(60)
    folds = make_folds(frame, FoldConfig(n_folds=3, seed=0))
    calls = {"n": 0}

    def turns_nan(logits, batch):
        calls["n"] += 1
        loss = cross_entropy_loss(logits, batch)
        return loss * float("nan") if calls["n"] >= 3 else loss

    cfg = _tiny_run_config(demo_base_dir)
    with pytest.raises(
        NonFiniteLossError,
        match=r"^training stopped at step \d+: the loss is nan \(parameters float32, mixed precision "
        r"no\); .* use model.dtype=float32",
    ):
        training.train_fold(
            cfg, frame, folds, demo_tokenizer, tmp_path / "run", progress=False, loss_fn=turns_nan
        )
