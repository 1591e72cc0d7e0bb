"""`predict` and `run_submission` end to end on tiny artifacts of both orderings (CPU, bitsandbytes int8 /
nf4): TTA, the deadline, failure paths, worker processes, refused settings and which file a run leaves."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from builders import CLASS_PRIOR, ORDERINGS, FakeClock, build_tiny_artifacts, predict_cfg, read_probs

from kaggle_utils.core.config import FormatConfig, InferenceConfig, ModelConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.data.submission import validate_submission
from kaggle_utils.inference import predictor as inference
from kaggle_utils.inference import preflight, tpu
from kaggle_utils.inference import report as inference_report
from kaggle_utils.inference.report import (
    InferenceError,
    fallback_path_for,
    raise_if_fallback,
    report_path_for,
)
from kaggle_utils.text.encode import encode_both_orders, encode_rows
from kaggle_utils.text.swap import swap_probs

# ----------------------------------------------------------------------------------------------------------
# fakes
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# engine
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# tiny artifacts of both orderings (built here: random weights, the session's demo tokenizer)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory, demo_tokenizer):
    torch.set_num_threads(1)
    return build_tiny_artifacts(tmp_path_factory.mktemp("artifacts"), demo_tokenizer)


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_predict_both_orderings_match_an_independent_tta_computation(
    ordering, tiny_artifacts, sample_files, tmp_path
):
    from kaggle_utils.data.load import load_competition
    from kaggle_utils.quant.artifacts import load_artifact

    out = tmp_path / "submission.csv"
    report = inference.predict(tiny_artifacts[ordering], sample_files.test_csv, out, predict_cfg())
    validate_submission(out, sample_files.test_csv)
    rows = pl.read_csv(sample_files.test_csv).height
    assert report.rows == rows and report.rows_by_path["tta"] == rows and not report.errors
    saved = json.loads(report_path_for(out).read_text())
    assert saved["rows_by_path"]["tta"] == rows and saved["manifest"]["ordering"] == ordering
    assert saved["runtime"]["kind"] == "cpu" and saved["fallback_source"] == "class prior from manifest"

    # The expected value without the code under test (no batching, padding, scheduler, swap_frame, swap_probs
    # or combine_views): each row alone through the model, the responses exchanged by hand for the swapped
    # view, its A/B columns exchanged back by index, the two views averaged here.
    loaded = load_artifact(tiny_artifacts[ordering], device="cpu")
    frame = load_competition(sample_files.test_csv, split="test").frame
    exchanged = frame.with_columns(response_a=pl.col("response_b"), response_b=pl.col("response_a"))
    original = encode_rows(frame, loaded.tokenizer, loaded.format_config).input_ids
    swapped = encode_rows(exchanged, loaded.tokenizer, loaded.format_config).input_ids

    def alone(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = (
                loaded.model(
                    input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)
                )
                .logits[0]
                .double()
                .numpy()
            )
        exp = np.exp(logits - logits.max())
        return exp / exp.sum()

    want = np.array([(alone(a) + alone(b)[[1, 0, 2]]) / 2 for a, b in zip(original, swapped, strict=True)])
    np.testing.assert_allclose(read_probs(out), want, atol=1e-5)


def test_predict_without_tta_serves_the_original_view_only(tiny_artifacts, sample_files, tmp_path):
    out = tmp_path / "sub.csv"
    report = inference.predict(
        tiny_artifacts["ft-then-quant"], sample_files.test_csv, out, predict_cfg(tta_swap=False)
    )
    validate_submission(out, sample_files.test_csv)
    assert report.rows_by_path["original_only"] == report.rows and report.schedule["views"] == 1


def test_predict_on_the_swapped_file_gives_the_swapped_predictions(tiny_artifacts, sample_files, tmp_path):
    """With TTA on, predictions for a swapped row equal the swapped predictions of the row (real model)."""
    swapped_csv = tmp_path / "test_swapped.csv"
    raw = pl.read_csv(sample_files.test_csv)
    raw.with_columns(response_a=raw["response_b"], response_b=raw["response_a"]).write_csv(swapped_csv)
    artifact = tiny_artifacts["quant-then-ft"]
    inference.predict(artifact, sample_files.test_csv, tmp_path / "a.csv", predict_cfg())
    inference.predict(artifact, swapped_csv, tmp_path / "b.csv", predict_cfg())
    np.testing.assert_allclose(
        read_probs(tmp_path / "b.csv"), swap_probs(read_probs(tmp_path / "a.csv")), atol=1e-6
    )


# ----------------------------------------------------------------------------------------------------------
# predict(): the guarantees
# ----------------------------------------------------------------------------------------------------------


def test_deadline_hit_mid_run_still_writes_a_full_valid_submission(tiny_artifacts, sample_files, tmp_path):
    clock = FakeClock()

    def slow(forward, name):  # every padded token costs 0.1 fake seconds
        def wrapped(seqs):
            clock.advance(0.1 * len(seqs) * max(len(seq) for seq in seqs))
            return forward(seqs)

        return wrapped

    # 40 rows x ~200 tokens x 2 views ~ 1600 fake s for everything; the deadline leaves ~600 s.
    cfg = predict_cfg(deadline_hours=(600 / 3600) + 0.1, safety_margin_hours=0.1)
    out = tmp_path / "submission.csv"
    report = inference.predict(
        tiny_artifacts["ft-then-quant"], sample_files.test_csv, out, cfg, clock=clock, wrap_forward=slow
    )
    validate_submission(out, sample_files.test_csv)
    counts = json.loads(report_path_for(out).read_text())["rows_by_path"]
    assert sum(counts.values()) == report.rows
    assert counts["fallback"] > 0 and counts["original_only"] > 0
    assert report.schedule["tta_dropped"] and report.schedule["stopped"] == "deadline"
    is_prior = np.all(np.abs(read_probs(out) - CLASS_PRIOR) < 1e-9, axis=1)
    assert is_prior.sum() == counts["fallback"]  # rows not reached hold the manifest's class prior


def test_exception_inside_a_batch_still_writes_a_full_valid_submission(
    tiny_artifacts, sample_files, tmp_path
):
    calls = {"n": 0}

    def flaky(forward, name):
        def wrapped(seqs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("CUDA error: device-side assert triggered (injected)")
            return forward(seqs)

        return wrapped

    out = tmp_path / "submission.csv"
    cfg = predict_cfg(tta_swap=False)
    report = inference.predict(
        tiny_artifacts["quant-then-ft"], sample_files.test_csv, out, cfg, wrap_forward=flaky
    )
    validate_submission(out, sample_files.test_csv)
    saved = json.loads(report_path_for(out).read_text())
    assert saved["rows_by_path"]["fallback"] > 0 and saved["rows_by_path"]["original_only"] > 0
    assert any("device-side assert" in error["message"] for error in saved["errors"])

    calls["n"] = 0
    strict = tmp_path / "strict.csv"
    with pytest.raises(InferenceError, match="device-side assert"):
        inference.predict(
            tiny_artifacts["quant-then-ft"],
            sample_files.test_csv,
            strict,
            predict_cfg(tta_swap=False, raise_after_write=True),
            wrap_forward=flaky,
        )
    validate_submission(strict, sample_files.test_csv)  # written before raising
    assert report.rows_by_path == json.loads(report_path_for(strict).read_text())["rows_by_path"]


def test_out_of_memory_at_predict_level_is_absorbed(tiny_artifacts, sample_files, tmp_path):
    def small_memory(forward, name):
        def wrapped(seqs):
            if len(seqs) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return forward(seqs)

        return wrapped

    out = tmp_path / "submission.csv"
    report = inference.predict(
        tiny_artifacts["ft-then-quant"], sample_files.test_csv, out, predict_cfg(), wrap_forward=small_memory
    )
    validate_submission(out, sample_files.test_csv)
    assert report.rows_by_path["tta"] == report.rows and report.schedule["oom_events"]
    reference = tmp_path / "reference.csv"
    inference.predict(tiny_artifacts["ft-then-quant"], sample_files.test_csv, reference, predict_cfg())
    np.testing.assert_allclose(read_probs(out), read_probs(reference), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# predict() with two real worker processes (CPU stand-ins for Kaggle's 2x T4, one torch thread each)
# ----------------------------------------------------------------------------------------------------------


def process_cfg(**overrides) -> InferenceConfig:
    # token_budget 1024: ~5 rows per batch, ~16 batches for the 40 rows x 2 views, so both workers get several
    return predict_cfg(**{"worker_backend": "process", "cpu_replicas": 2, "token_budget": 1024, **overrides})


@pytest.fixture(scope="module")
def single_process_reference(tiny_artifacts, sample_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "submission.csv"
    cfg = predict_cfg(token_budget=1024)
    inference.predict(tiny_artifacts["quant-then-ft"], sample_files.test_csv, out, cfg)
    return read_probs(out)


def test_two_worker_processes_predict_like_the_single_process_path(
    tiny_artifacts, sample_files, single_process_reference, tmp_path
):
    out = tmp_path / "submission.csv"
    report = inference.predict(tiny_artifacts["quant-then-ft"], sample_files.test_csv, out, process_cfg())
    validate_submission(out, sample_files.test_csv)
    workers = report.schedule["workers"]
    assert [w["name"] for w in workers] == ["cpu#0", "cpu#1"] and all(w["batches"] > 0 for w in workers)
    assert report.rows_by_path["tta"] == report.rows and not report.errors
    assert report.schedule["workers_lost"] == 0
    # Same rows, same batches, another process with one thread: fp32 on CPU agrees to rounding.
    np.testing.assert_allclose(read_probs(out), single_process_reference, atol=1e-5)


def test_a_worker_process_killed_mid_run_has_its_batch_redone_by_the_other(
    tiny_artifacts, sample_files, single_process_reference, tmp_path, monkeypatch
):
    from kaggle_utils.inference.workers import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "1:exit:2")  # worker 1 SIGKILLs itself when its second batch arrives
    out = tmp_path / "submission.csv"
    report = inference.predict(tiny_artifacts["quant-then-ft"], sample_files.test_csv, out, process_cfg())
    validate_submission(out, sample_files.test_csv)
    schedule = report.schedule
    assert schedule["workers_lost"] == 1 and schedule["rows_requeued"] > 0 and not schedule["stopped"]
    lost, survivor = schedule["workers"][1], schedule["workers"][0]
    assert lost["batches"] == 1 and "exited with code -9" in lost["retired"] and not survivor["retired"]
    assert report.rows_by_path["tta"] == report.rows and report.fallback_rows == 0
    assert [error["where"] for error in report.errors] == ["worker lost"]
    assert "1 worker process(es) lost" in report.summary()
    np.testing.assert_allclose(read_probs(out), single_process_reference, atol=1e-5)
    saved = json.loads(report_path_for(out).read_text())
    assert saved["schedule"]["workers_lost"] == 1 and saved["rows_by_path"]["tta"] == report.rows


def test_a_hung_worker_process_is_killed_after_the_batch_timeout_and_its_batch_redone(
    tiny_artifacts, sample_files, single_process_reference, tmp_path, monkeypatch
):
    from kaggle_utils.inference.workers import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "1:hang:1")  # worker 1 never answers its first batch
    out = tmp_path / "submission.csv"
    began = time.monotonic()
    report = inference.predict(
        tiny_artifacts["quant-then-ft"], sample_files.test_csv, out, process_cfg(batch_timeout_s=2.0)
    )
    assert time.monotonic() - began < 60  # not the hour the worker sleeps
    validate_submission(out, sample_files.test_csv)
    schedule = report.schedule
    assert schedule["workers_lost"] == 1 and "killed" in schedule["workers"][1]["retired"]
    assert schedule["workers"][1]["batches"] == 0 and report.rows_by_path["tta"] == report.rows
    np.testing.assert_allclose(read_probs(out), single_process_reference, atol=1e-5)


def test_out_of_memory_inside_a_worker_process_halves_the_batch_there(
    tiny_artifacts, sample_files, single_process_reference, tmp_path, monkeypatch
):
    from kaggle_utils.inference.workers import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "1:oom:1")  # worker 1 runs out of memory on any batch of more than one row
    out = tmp_path / "submission.csv"
    report = inference.predict(tiny_artifacts["quant-then-ft"], sample_files.test_csv, out, process_cfg())
    validate_submission(out, sample_files.test_csv)
    events = report.schedule["oom_events"]
    assert (
        events and {event["device"] for event in events} == {"cpu#1"} and report.schedule["workers_lost"] == 0
    )
    oom_worker = report.schedule["workers"][1]
    assert oom_worker["token_cap"] is not None and oom_worker["rows"] > 0
    assert report.rows_by_path["tta"] == report.rows and not report.errors
    np.testing.assert_allclose(read_probs(out), single_process_reference, atol=1e-5)


def test_a_worker_process_that_cannot_start_leaves_the_other_to_do_everything(
    tiny_artifacts, sample_files, single_process_reference, tmp_path, monkeypatch
):
    from kaggle_utils.inference.workers import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "0:bogus:1")  # an unknown fault: worker 0 fails while starting
    out = tmp_path / "submission.csv"
    report = inference.predict(tiny_artifacts["quant-then-ft"], sample_files.test_csv, out, process_cfg())
    validate_submission(out, sample_files.test_csv)
    assert [error["where"] for error in report.errors] == ["starting worker"]
    assert report.errors[0]["device"] == "cpu#0" and "unknown fault" in report.errors[0]["message"]
    assert [w["name"] for w in report.schedule["workers"]] == ["cpu#1"]
    assert report.rows_by_path["tta"] == report.rows
    np.testing.assert_allclose(read_probs(out), single_process_reference, atol=1e-5)

    monkeypatch.setenv(FAULT_ENV, "0:exit:1")
    report = inference.predict(
        tiny_artifacts["quant-then-ft"], sample_files.test_csv, out, process_cfg(cpu_replicas=1)
    )  # the only worker dies: every row falls back
    validate_submission(out, sample_files.test_csv)
    assert report.rows_by_path["fallback"] == report.rows
    assert report.schedule["stopped"] == "all devices retired"


def test_unloadable_artifact_falls_back_to_the_manifest_prior(tiny_artifacts, sample_files, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = json.loads((tiny_artifacts["ft-then-quant"] / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps(manifest))  # lists files that are not there
    out = tmp_path / "submission.csv"
    report = inference.predict(broken, sample_files.test_csv, out, predict_cfg())
    validate_submission(out, sample_files.test_csv)
    assert report.rows_by_path["fallback"] == report.rows
    assert report.errors and report.errors[0]["where"] == "model inference"
    np.testing.assert_allclose(read_probs(out), np.tile(CLASS_PRIOR, (report.rows, 1)), atol=1e-9)


def test_baseline_fallback_is_used_when_given(sample_files, train_data, tmp_path):
    from kaggle_utils.core.config import FoldConfig
    from kaggle_utils.data.folds import make_folds
    from kaggle_utils.train.baseline import run_baseline_cv

    frame = train_data.frame
    result = run_baseline_cv(frame, make_folds(frame, FoldConfig(n_folds=2)))
    baseline = result.model.save(tmp_path / "baseline.json")
    out = tmp_path / "submission.csv"
    report = inference.predict(
        tmp_path / "no-artifact", sample_files.test_csv, out, predict_cfg(), fallback_path=baseline
    )
    validate_submission(out, sample_files.test_csv)
    assert (
        report.fallback_source.startswith("baseline model") and report.rows_by_path["fallback"] == report.rows
    )
    from kaggle_utils.data.load import load_competition

    want = result.model.predict_proba(load_competition(sample_files.test_csv, split="test").frame)
    np.testing.assert_allclose(read_probs(out), want, atol=1e-9)


def test_test_rows_that_cannot_be_parsed_still_get_a_valid_submission(tiny_artifacts, sample_files, tmp_path):
    """Only the ids are needed to write a valid file: a test file the parser rejects goes to the fallback."""
    broken = tmp_path / "test.csv"
    pl.read_csv(sample_files.test_csv).drop("prompt").write_csv(broken)
    out = tmp_path / "submission.csv"
    report = inference.predict(tiny_artifacts["ft-then-quant"], broken, out, predict_cfg())
    validate_submission(out, broken)
    assert report.rows_by_path["fallback"] == report.rows
    assert report.errors[0]["where"] == "reading test rows" and "prompt" in report.errors[0]["message"]


def test_unreadable_test_file_is_a_clear_error(tmp_path):
    from kaggle_utils.core.errors import SubmissionError

    with pytest.raises(SubmissionError, match="not found"):
        inference.predict(tmp_path / "artifact", tmp_path / "absent.csv", tmp_path / "sub.csv", predict_cfg())


# ----------------------------------------------------------------------------------------------------------
# TPU path: what runs without torch_xla
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_tpu_plain_bf16_model_has_no_quantized_layers_and_predicts_like_the_artifact(
    ordering, tiny_artifacts, sample_files
):
    from kaggle_utils.data.load import load_competition
    from kaggle_utils.models.classifier import predict_probs
    from kaggle_utils.quant.artifacts import load_artifact

    plain = tpu.load_plain(tiny_artifacts[ordering])
    state = tpu.plain_state_dict(plain.model)
    assert all(t.dtype == torch.bfloat16 for t in state.values() if t.is_floating_point())
    quantized = load_artifact(tiny_artifacts[ordering], device="cpu")
    with pytest.raises(UsageError, match="quantized or adapter"):
        tpu.plain_state_dict(quantized.model)
    frame = load_competition(sample_files.test_csv, split="test").frame
    original, _ = encode_both_orders(frame, plain.tokenizer, plain.format_config)
    pad = plain.tokenizer.pad_token_id
    got = predict_probs(plain.model, original.input_ids[:8], pad)
    want = predict_probs(quantized.model, original.input_ids[:8], pad)
    np.testing.assert_allclose(got, want, atol=0.03)  # bf16 rounding of the same weights


def test_tpu_mesh_fits_gemma2_9b_on_16gb_cores_and_splits_rows_per_core():
    nine_b_bf16 = int(9.24e9 * 2)
    assert tpu.choose_mesh(8, nine_b_bf16, 16 * 2**30) == (4, 2)
    assert tpu.choose_mesh(8, 10_000_000, 16 * 2**30) == (8, 1)
    with pytest.raises(UsageError, match="do not fit"):
        tpu.choose_mesh(8, 200 * 2**30, 16 * 2**30)
    assert tpu.partition_spec("model.layers.0.self_attn.q_proj.weight", (4096, 3584), 2) == ("model", None)
    assert tpu.partition_spec("model.layers.0.mlp.down_proj.weight", (3584, 14336), 2) == (None, "model")
    assert tpu.partition_spec("model.layers.0.input_layernorm.weight", (3584,), 2) is None
    assert tpu.partition_spec("score.weight", (3, 3584), 2) is None
    assert tpu.partition_spec("model.layers.0.self_attn.q_proj.weight", (4096, 3584), 1) is None
    # Static shapes: few distinct ones, rows a multiple of the data axis (each core the same share).
    shapes = {tpu.static_shape(length, 8192, 256, 4) for length in range(1, 2049)}
    assert len(shapes) == 8 and all(rows % 4 == 0 and rows * length <= 8192 for rows, length in shapes)
    ids, mask = tpu.pad_static([[5, 6, 7], [8]], rows=4, length=4, pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [5, 6, 7, 0], [5, 6, 7, 0]]
    assert mask.sum(axis=1).tolist() == [3, 1, 3, 3]
    with pytest.raises(ValueError, match="cannot pad"):
        tpu.pad_static([[1] * 5], rows=1, length=4, pad_token_id=0)


# ----------------------------------------------------------------------------------------------------------
# CLI: `python -m kaggle_utils predict ...` (the command group registered on its own parser)
# ----------------------------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    import argparse

    from kaggle_utils.cli import inference as commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_predict_writes_the_submission_and_strict_reports_absorbed_errors(
    tiny_artifacts, sample_files, tmp_path, capsys
):
    from kaggle_utils.cli.inference import inference_config

    out = tmp_path / "cli.csv"
    code = run_cli(
        [
            "predict",
            "--artifact",
            str(tiny_artifacts["ft-then-quant"]),
            "--test",
            str(sample_files.test_csv),
            "--out",
            str(out),
            "--no-tta",
            "--device",
            "cpu",
            "--token-budget",
            "1024",
            "--no-progress",
        ]
    )
    assert code == 0
    validate_submission(out, sample_files.test_csv)
    assert "original_only" in capsys.readouterr().out

    strict = tmp_path / "strict.csv"
    code = run_cli(
        [
            "predict",
            "--artifact",
            str(tmp_path / "missing"),
            "--test",
            str(sample_files.test_csv),
            "--out",
            str(strict),
            "--strict",
            "--no-progress",
        ]
    )
    assert code == 1 and "submission written" in capsys.readouterr().err
    validate_submission(strict, sample_files.test_csv)

    import argparse

    args = argparse.Namespace(
        config=None,
        no_tta=True,
        deadline_hours=2.5,
        margin_hours=None,
        device=None,
        num_gpus=2,
        dtype="float16",
        token_budget=None,
        layout="view_per_device",
        strict=False,
        no_progress=False,
    )
    cfg = inference_config(args)
    assert (cfg.tta_swap, cfg.deadline_hours, cfg.num_gpus, cfg.compute_dtype, cfg.layout) == (
        False,
        2.5,
        2,
        "float16",
        "view_per_device",
    )
    assert cfg.safety_margin_hours == InferenceConfig().safety_margin_hours and cfg.token_budget == 8192


# ----------------------------------------------------------------------------------------------------------
# fallback rows are a failure; invalid settings and outputs are refused before anything is written
# ----------------------------------------------------------------------------------------------------------


def _broken_inputs(kind: str, tiny_artifacts, sample_files, tmp_path) -> tuple[Path, Path]:
    """(artifact, test file) with one thing wrong that only the fallback can survive."""
    artifact, test = tiny_artifacts["ft-then-quant"], sample_files.test_csv
    if kind == "artifact typo":
        artifact = tmp_path / "artefact"
    elif kind == "no response_b":
        test = tmp_path / "test.csv"
        pl.read_csv(sample_files.test_csv).drop("response_b").write_csv(test)
    elif kind == "corrupt manifest":
        import shutil

        artifact = tmp_path / "corrupt"
        shutil.copytree(tiny_artifacts["ft-then-quant"], artifact)
        (artifact / "manifest.json").write_text('{"ordering": "ft-then-quant", ')
    return artifact, test


@pytest.mark.parametrize("kind", ["artifact typo", "no response_b", "corrupt manifest"])
def test_cli_predict_exits_nonzero_when_rows_fell_back_but_keeps_the_file(
    kind, tiny_artifacts, sample_files, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    artifact, test = _broken_inputs(kind, tiny_artifacts, sample_files, tmp_path)
    out = tmp_path / "sub.csv"
    argv = [
        "predict",
        "--artifact",
        str(artifact),
        "--test",
        str(test),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert run_cli(argv) == 1
    validate_submission(out, test)
    captured = capsys.readouterr()
    rows = pl.read_csv(test).height
    assert captured.out.startswith(f"FALLBACK {rows} of {rows} rows")
    assert f"{rows} of {rows} rows were predicted by the fallback" in captured.err

    # the competition's hidden rerun keeps the file and finishes
    monkeypatch.setenv("KAGGLE_IS_COMPETITION_RERUN", "1")
    assert run_cli(argv) == 0
    validate_submission(out, test)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cpu_replicas": 0}, "inference.cpu_replicas must be >= 1"),
        ({"worker_backend": "gpu"}, "inference.worker_backend must be one of ['thread', 'process']"),
        ({"batch_timeout_s": 0}, "inference.batch_timeout_s must be > 0"),
        ({"batch_timeout_s": float("nan")}, "inference.batch_timeout_s must be a finite number"),
    ],
)
def test_invalid_worker_settings_are_usage_errors(overrides, message):
    """Refused when the config is built, and again by predict's check when a field was changed afterwards."""
    with pytest.raises(UsageError, match=re.escape(message)):
        InferenceConfig(**overrides)
    cfg = InferenceConfig()
    for name, value in overrides.items():
        setattr(cfg, name, value)
    with pytest.raises(UsageError, match=re.escape(message)):
        preflight.validate_inference_config(cfg)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--token-budget", "0", "inference.token_budget must be >= 1"),
        ("--deadline-hours", "nan", "inference.deadline_hours must be a finite number"),
        ("--deadline-hours", "inf", "inference.deadline_hours must be a finite number"),
        ("--deadline-hours", "-1", "inference.deadline_hours must be > 0"),
        ("--margin-hours", "nan", "inference.safety_margin_hours must be a finite number"),
        ("--margin-hours", "10", "must be below deadline_hours"),
        ("--num-gpus", "0", "inference.num_gpus must be >= 1"),
        ("--device", "cuda", "no CUDA GPU"),
    ],
)
def test_invalid_settings_are_usage_errors_before_anything_is_written(
    option, value, message, tiny_artifacts, sample_files, tmp_path, capsys
):
    from kaggle_utils.cli.main import main

    if option == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "sub.csv"
    code = main(
        [
            "predict",
            "--artifact",
            str(tiny_artifacts["ft-then-quant"]),
            "--test",
            str(sample_files.test_csv),
            "--out",
            str(out),
            "--no-progress",
            option,
            value,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_valid_previous_submission_survives_until_the_new_one_is_complete(
    tiny_artifacts, sample_files, tmp_path
):
    out = tmp_path / "submission.csv"
    inference.predict(
        tiny_artifacts["ft-then-quant"], sample_files.test_csv, out, predict_cfg(tta_swap=False)
    )
    previous = out.read_bytes()
    seen = []

    def watch(forward, name):
        def wrapped(seqs):
            seen.append((out.read_bytes() == previous, fallback_path_for(out).is_file()))
            return forward(seqs)

        return wrapped

    report = inference.predict(
        tiny_artifacts["ft-then-quant"], sample_files.test_csv, out, predict_cfg(), wrap_forward=watch
    )
    assert seen and all(kept and fallback_beside for kept, fallback_beside in seen)
    assert report.fallback_file == str(fallback_path_for(out))
    assert not fallback_path_for(out).exists()  # removed once the new file is complete
    validate_submission(out, sample_files.test_csv)
    assert out.read_bytes() != previous  # TTA this time

    # a previous file that is not a valid submission for this test file is replaced by the fallback at once
    out.write_text("id,winner_model_a,winner_model_b,winner_tie\n1,1,0,0\n")
    seen.clear()

    def watch_invalid(forward, name):
        def wrapped(seqs):
            seen.append(validate_submission(out, sample_files.test_csv).rows)
            return forward(seqs)

        return wrapped

    report = inference.predict(
        tiny_artifacts["ft-then-quant"], sample_files.test_csv, out, predict_cfg(), wrap_forward=watch_invalid
    )
    assert seen and report.fallback_file == str(out)


def test_outputs_that_are_inputs_or_not_regular_files_are_refused(tiny_artifacts, sample_files, tmp_path):
    import shutil

    test = tmp_path / "test.csv"
    shutil.copy(sample_files.test_csv, test)
    before = test.read_bytes()
    artifact = tiny_artifacts["ft-then-quant"]
    with pytest.raises(UsageError, match="it is the test file"):
        inference.predict(artifact, test, test, predict_cfg())
    with pytest.raises(UsageError, match="inside the artifact"):
        inference.predict(artifact, test, artifact / "submission.csv", predict_cfg())
    link = tmp_path / "link.csv"
    link.symlink_to(tmp_path / "elsewhere.csv")
    with pytest.raises(UsageError, match="symlink"):
        inference.predict(artifact, test, link, predict_cfg())
    assert test.read_bytes() == before and link.is_symlink() and not (tmp_path / "elsewhere.csv").exists()
    assert not (artifact / "submission.csv").exists()


def test_cli_baseline_refuses_to_overwrite_its_test_file(sample_files, tmp_path, capsys):
    import shutil

    from kaggle_utils.cli.main import main

    test = tmp_path / "test.csv"
    shutil.copy(sample_files.test_csv, test)
    before = test.read_bytes()
    code = main(["baseline", "--train", str(sample_files.train_csv), "--test", str(test), "--out", str(test)])
    err = capsys.readouterr().err
    assert code == 2 and "it is the test file" in err and len(err.strip().splitlines()) == 1
    assert test.read_bytes() == before


def test_a_failed_report_write_keeps_the_submission_and_removes_the_stale_report(
    tiny_artifacts, sample_files, tmp_path, monkeypatch
):
    out = tmp_path / "submission.csv"
    inference.predict(
        tiny_artifacts["ft-then-quant"], sample_files.test_csv, out, predict_cfg(tta_swap=False)
    )
    stale = report_path_for(out)
    assert stale.is_file()
    real_write = inference_report.atomic_write_bytes

    def failing(path, data):
        if Path(path) == stale:
            raise OSError(28, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(inference_report, "atomic_write_bytes", failing)
    report = inference.predict(tiny_artifacts["ft-then-quant"], sample_files.test_csv, out, predict_cfg())
    validate_submission(out, sample_files.test_csv)
    assert report.rows_by_path["tta"] == report.rows and not report.report_written
    assert any(error["where"].startswith("writing the report") for error in report.errors)
    assert not stale.exists()  # the earlier run's report no longer sits beside the new file


@pytest.mark.parametrize(
    "content", [None, "inference: [unclosed\n", "inference:\n  token_budgt: 5\n", "- a\n- b\n"]
)
@pytest.mark.parametrize("command", ["predict", "kaggle", "train"])
def test_bad_config_files_are_one_line_errors(
    command, content, tiny_artifacts, sample_files, tmp_path, capsys
):
    from kaggle_utils.cli.main import main

    config = tmp_path / "config.yaml"
    if content is not None:
        config.write_text(content)
    argv = {
        "predict": [
            "predict",
            "--artifact",
            str(tiny_artifacts["ft-then-quant"]),
            "--test",
            str(sample_files.test_csv),
            "--out",
            str(tmp_path / "sub.csv"),
        ],
        "kaggle": ["kaggle", "metadata", "--out", str(tmp_path / "kernel-metadata.json")],
        "train": [
            "train",
            "--ordering",
            "quant-then-ft",
            "--train",
            str(sample_files.train_csv),
            "--out",
            str(tmp_path / "run"),
        ],
    }[command]
    code = main([*argv, "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and str(config) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "sub.csv").exists()


def test_a_runtime_probe_that_crashes_still_leaves_a_file_and_counts_as_fallback(
    sample_files, tmp_path, monkeypatch
):
    def broken(cfg):
        raise RuntimeError("CUDA driver initialization failed (injected)")

    monkeypatch.setattr(preflight, "detect_runtime", broken)  # preflight's own binding of detect_runtime
    out = tmp_path / "submission.csv"
    report = inference.predict(tmp_path / "artifact", sample_files.test_csv, out, predict_cfg())
    validate_submission(out, sample_files.test_csv)
    assert report.fallback_rows == report.rows and report.errors[-1]["where"] == "detecting the runtime"


# ----------------------------------------------------------------------------------------------------------
# which file a run leaves: a previous submission kept when the model served nothing; the report; disk full
# ----------------------------------------------------------------------------------------------------------


def test_a_valid_previous_submission_is_kept_when_no_row_came_from_the_model(
    tiny_artifacts, sample_files, tmp_path, capsys, monkeypatch
):
    from kaggle_utils.cli.main import main

    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    out = tmp_path / "submission.csv"
    inference.predict(
        tiny_artifacts["ft-then-quant"], sample_files.test_csv, out, predict_cfg(tta_swap=False)
    )
    previous, previous_report = out.read_bytes(), report_path_for(out).read_bytes()
    argv = [
        "predict",
        "--artifact",
        str(tmp_path / "artefact"),
        "--test",
        str(sample_files.test_csv),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    beside = fallback_path_for(out)
    assert out.read_bytes() == previous and report_path_for(out).read_bytes() == previous_report
    validate_submission(beside, sample_files.test_csv)
    np.testing.assert_allclose(read_probs(beside), 1 / 3)  # no manifest: uniform
    written = json.loads(report_path_for(beside).read_text())
    assert written["previous_kept"] and written["rows_by_path"]["fallback"] == written["rows"]
    assert (
        f"error (previous submission kept): {written['rows']} of {written['rows']} rows were predicted by "
        "the fallback" in err
    )
    assert f"the valid previous submission {out} was kept; this run's file is {beside}" in err
    assert "--write-fallback-over-previous" in err

    # asked for explicitly: the fallback-filled file replaces the previous one
    assert main([*argv, "--write-fallback-over-previous"]) == 1
    validate_submission(out, sample_files.test_csv)
    np.testing.assert_allclose(read_probs(out), 1 / 3)
    assert not beside.exists() and not json.loads(report_path_for(out).read_text())["previous_kept"]

    # Kaggle's competition rerun: a valid file is what scores, so it is written at the output as before
    out.write_bytes(previous)
    monkeypatch.setenv("KAGGLE_IS_COMPETITION_RERUN", "1")
    assert main(argv) == 0
    np.testing.assert_allclose(read_probs(out), 1 / 3)


def test_the_report_records_that_it_was_written(sample_files, tmp_path):
    out = tmp_path / "submission.csv"
    report = inference.predict(tmp_path / "no-artifact", sample_files.test_csv, out, predict_cfg())
    assert report.report_written
    assert json.loads(report_path_for(out).read_text())["report_written"] is True


def test_disk_full_writing_the_submission_is_one_line_naming_it_and_the_previous_file_stays(
    sample_files, tmp_path, capsys, monkeypatch
):
    import errno

    from kaggle_utils.cli.main import main
    from kaggle_utils.core import fileio

    out = tmp_path / "submission.csv"
    inference.predict(tmp_path / "no-artifact", sample_files.test_csv, out, predict_cfg())
    previous = out.read_bytes()
    real = fileio.tempfile.NamedTemporaryFile

    def full_disk(*args, **kwargs):  # only the submission itself: the fallback beside it is written first
        handle = real(*args, **kwargs)
        if kwargs.get("prefix") == f".{out.name}.":

            def write(data):
                raise OSError(errno.ENOSPC, "No space left on device")

            handle.write = write
        return handle

    monkeypatch.setattr(fileio.tempfile, "NamedTemporaryFile", full_disk)
    code = main(
        [
            "predict",
            "--artifact",
            str(tmp_path / "no-artifact"),
            "--test",
            str(sample_files.test_csv),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
            "--write-fallback-over-previous",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: cannot write {out}: No space left on device (the previous file is intact)"
    )
    assert out.read_bytes() == previous
    validate_submission(fallback_path_for(out), sample_files.test_csv)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------------------
# offline: the Hugging Face Hub is never asked, bitsandbytes is imported only where it is used
# ----------------------------------------------------------------------------------------------------------

OFFLINE_NAMES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _run_module_probe(argv: list[str], tmp_path) -> dict:
    """`python -m kaggle_utils *argv` in a fresh interpreter without the offline variables; what it
    imported."""
    import os
    import subprocess
    import sys

    probe = (
        "import json, os, runpy, sys\n"
        f"sys.argv = ['kaggle_utils', *{argv!r}]\n"
        "code = 0\n"
        "try:\n"
        "    runpy.run_module('kaggle_utils', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "import huggingface_hub.constants as hub\n"
        "print('PROBE ' + json.dumps({'code': code, 'bitsandbytes': 'bitsandbytes' in sys.modules,\n"
        f"    'env': {{name: os.environ.get(name) for name in {OFFLINE_NAMES!r}}},\n"
        "    'hub_offline': hub.HF_HUB_OFFLINE}))\n"
    )
    env = {key: value for key, value in os.environ.items() if key not in OFFLINE_NAMES}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("PROBE "))


def test_the_cli_goes_offline_at_start_and_a_light_command_does_not_import_bitsandbytes(tmp_path):
    root = tmp_path / "input"
    (root / "comp").mkdir(parents=True)
    (root / "comp" / "test.csv").write_text("id\n1\n")
    (root / "art").mkdir()
    (root / "art" / "manifest.json").write_text("{}")
    seen = _run_module_probe(["find-inputs", str(root)], tmp_path)
    assert seen["code"] == 0 and not seen["bitsandbytes"]
    assert seen["env"] == dict.fromkeys(OFFLINE_NAMES, "1") and seen["hub_offline"] is True


def test_predicting_with_a_16_bit_artifact_does_not_import_bitsandbytes(
    demo_tokenizer, sample_files, tmp_path
):
    from kaggle_utils.models import classifier as modeling
    from kaggle_utils.quant import artifacts

    model = modeling.build_classifier(
        ModelConfig(), vocab_size=len(demo_tokenizer), pad_token_id=demo_tokenizer.pad_token_id, device="cpu"
    )
    plain = artifacts.save_artifact(
        tmp_path / "plain",
        model,
        demo_tokenizer,
        {
            "variant": "test",
            "base_model": "tiny",
            "folds_file_hash": "none",
            "cv_scores": {},
            "class_prior": CLASS_PRIOR,
            "ordering": "ft-then-quant",
        },
        FormatConfig(max_length=128),
    )
    assert json.loads((plain / "manifest.json").read_text())["quant_scheme"] == "none"
    out = tmp_path / "submission.csv"
    seen = _run_module_probe(
        [
            "predict",
            "--artifact",
            str(plain),
            "--test",
            str(sample_files.test_csv),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-tta",
            "--no-progress",
        ],
        tmp_path,
    )
    assert seen["code"] == 0 and not seen["bitsandbytes"]
    validate_submission(out, sample_files.test_csv)


def test_predict_runs_with_the_hub_offline_unless_the_user_said_otherwise(
    tiny_artifacts, sample_files, tmp_path, monkeypatch
):
    import os

    import huggingface_hub.constants

    for name in OFFLINE_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    seen = []

    def watch(forward, name):
        def wrapped(seqs):
            seen.append(
                (
                    {name: os.environ.get(name) for name in OFFLINE_NAMES},
                    huggingface_hub.constants.HF_HUB_OFFLINE,
                )
            )
            return forward(seqs)

        return wrapped

    inference.predict(
        tiny_artifacts["ft-then-quant"],
        sample_files.test_csv,
        tmp_path / "sub.csv",
        predict_cfg(tta_swap=False),
        wrap_forward=watch,
    )
    assert seen and all(env == dict.fromkeys(OFFLINE_NAMES, "1") and hub for env, hub in seen)


# ----------------------------------------------------------------------------------------------------------
# run_submission: an explicit path wins, hints are whole names, and a valid file is written before any raise
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def two_artifacts_attached(tiny_artifacts, sample_files, tmp_path):
    """An input root holding the competition's test file and two artifacts whose names share a prefix."""
    import shutil

    root = tmp_path / "input"
    competition = root / "competitions" / "arena"
    competition.mkdir(parents=True)
    shutil.copy(sample_files.test_csv, competition / "test.csv")
    shutil.copy(sample_files.sample_submission_csv, competition / "sample_submission.csv")
    (root / "arena-ensemble").symlink_to(tiny_artifacts["ft-then-quant"], target_is_directory=True)
    (root / "arena-ensemble2").symlink_to(tiny_artifacts["quant-then-ft"], target_is_directory=True)
    return root, competition / "test.csv"


def test_run_submission_takes_an_explicit_artifact_and_a_whole_name_hint_among_two(
    two_artifacts_attached, tmp_path
):
    root, test = two_artifacts_attached
    report = inference.run_submission(
        root,
        artifact_dir=root / "arena-ensemble",
        out_path=tmp_path / "a.csv",
        cfg=predict_cfg(tta_swap=False),
    )
    assert report.fallback_rows == 0 and report.test_path == str(test)
    report = inference.run_submission(
        root, artifact_hint="arena-ensemble", out_path=tmp_path / "b.csv", cfg=predict_cfg(tta_swap=False)
    )
    assert report.fallback_rows == 0 and report.artifact_dir == str(root / "arena-ensemble")
    validate_submission(tmp_path / "b.csv", test)


def test_run_submission_writes_a_valid_file_before_raising_whatever_failed(
    two_artifacts_attached, tmp_path, monkeypatch
):
    root, test = two_artifacts_attached
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    out = tmp_path / "ambiguous.csv"
    with pytest.raises(
        UsageError,
        match=rf"2 candidates for the artifact .*; a fallback submission \(uniform\) "
        rf"was written to {re.escape(str(out))}$",
    ):
        inference.run_submission(root, out_path=out, cfg=predict_cfg())
    validate_submission(out, test)
    report = json.loads(report_path_for(out).read_text())
    assert (
        report["errors"][0]["where"] == "the inputs and settings" and report["rows_by_path"]["fallback"] == 40
    )

    settings = tmp_path / "settings.csv"  # settings refused: the artifact's class prior fills the file
    with pytest.raises(
        UsageError,
        match=r"inference.token_budget must be >= 1, got 0; a fallback submission \(class "
        r"prior from manifest\) was written",
    ):
        inference.run_submission(
            root,
            artifact_dir=root / "arena-ensemble",
            out_path=settings,
            cfg={"token_budget": 0, "device": "cpu"},
        )
    validate_submission(settings, test)
    np.testing.assert_allclose(read_probs(settings), np.tile(CLASS_PRIOR, (40, 1)), atol=1e-9)

    with pytest.raises(UsageError, match=r"unknown inference settings \['token_budgt'\] .*; a fallback"):
        inference.run_submission(
            root,
            artifact_dir=root / "arena-ensemble",
            out_path=tmp_path / "typo.csv",
            cfg={"token_budgt": 100},
        )
    validate_submission(tmp_path / "typo.csv", test)

    monkeypatch.setenv("KAGGLE_IS_COMPETITION_RERUN", "1")  # the rerun keeps the file and finishes
    rerun = inference.run_submission(root, out_path=tmp_path / "rerun.csv", cfg=predict_cfg())
    assert rerun.fallback_rows == rerun.rows
    validate_submission(tmp_path / "rerun.csv", test)


def test_non_finite_rows_are_an_error_that_counts_not_a_quiet_hand_off(
    tiny_artifacts, sample_files, tmp_path
):
    """A model returning NaN for some row views (float16 overflow): the other view serves them and the file is
    valid, but the run says so and fails (exit 1), never only a counter in the report."""
    calls = {"n": 0}

    def nan_in_one_batch(forward, name):
        def wrapped(seqs):
            probs = forward(seqs)
            calls["n"] += 1
            if calls["n"] == 1:  # one batch of one view: the other view still serves those rows
                probs[:] = np.nan
            return probs

        return wrapped

    out = tmp_path / "submission.csv"
    report = inference.predict(
        tiny_artifacts["quant-then-ft"],
        sample_files.test_csv,
        out,
        predict_cfg(),
        wrap_forward=nan_in_one_batch,
    )
    validate_submission(out, sample_files.test_csv)
    assert report.nonfinite_rows > 0 and report.fallback_rows == 0 and "NON-FINITE" in report.summary()
    with pytest.raises(
        InferenceError,
        match=r"^the model returned non-finite probabilities \(NaN/inf, "
        r"e.g. float16 overflow\) for \d+ row views of 40 rows; their "
        r"other view served them",
    ):
        raise_if_fallback(report)


def test_a_float16_run_is_preflighted_on_real_rows(tiny_artifacts, sample_files, tmp_path):
    out = tmp_path / "submission.csv"
    report = inference.predict(
        tiny_artifacts["quant-then-ft"], sample_files.test_csv, out, predict_cfg(compute_dtype="float16")
    )  # NF4 computes in float16 (int8 keeps fp32)
    validate_submission(out, sample_files.test_csv)
    # every decoder layer was watched on real rows before the schedule; on CPU this artifact's residual stream
    # stays float32 (only the 4-bit matmuls compute in float16), so there is no float16 layer to refuse
    assert report.dtype_preflight == {
        "checked_layers": 2,
        "float16_layers": 0,
        "max_abs": None,
        "layer": None,
    }
