"""Competition dialects: the registry, LMSYS unchanged through it, WSDM's metric, writer, validator, generated
files, a new dialect as one registration, `predict` with a WSDM artifact, and the WSDM demo end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import sklearn.metrics

from kaggle_utils.cli import main as cli
from kaggle_utils.core.config import DataConfig
from kaggle_utils.core.errors import DataError, SubmissionError, UsageError
from kaggle_utils.data import dialects
from kaggle_utils.data.dialects import dialect_of_manifest, get_dialect
from kaggle_utils.data.labels import parse_winner_labels
from kaggle_utils.data.lmsys import LmsysDialect
from kaggle_utils.data.load import load_competition
from kaggle_utils.data.sample import generate_wsdm_files
from kaggle_utils.data.submission import write_submission
from kaggle_utils.data.wsdm import TIE_RULE, ab_accuracy, ab_log_loss, ab_winners
from kaggle_utils.evaluate import cv_report, report_render
from kaggle_utils.variants import registry as variant_registry

WSDM = get_dialect("wsdm")
LMSYS = get_dialect("lmsys")


@pytest.fixture(scope="module")
def wsdm_files(tmp_path_factory):
    return generate_wsdm_files(tmp_path_factory.mktemp("wsdm"), n_train=300, n_test=30, seed=0)


def test_registry_names_slugs_and_manifest_default():
    assert {"lmsys", "wsdm"} <= set(dialects.dialect_names())
    assert get_dialect("llm-classification-finetuning") is LMSYS
    assert get_dialect("wsdm-cup-multilingual-chatbot-arena") is WSDM
    assert dialect_of_manifest({}) is LMSYS  # artifacts written before the field existed are LMSYS
    assert dialect_of_manifest({"dialect": "wsdm"}) is WSDM
    with pytest.raises(UsageError, match="unknown competition dialect 'kaggle-x'.*lmsys, wsdm"):
        get_dialect("kaggle-x")
    with pytest.raises(UsageError, match="'dialect' must be a string"):
        dialect_of_manifest({"dialect": 3})
    assert WSDM.describe()["metric"] == "accuracy" and WSDM.describe()["higher_is_better"] is True
    assert LMSYS.describe()["submission_columns"] == ["id", "winner_model_a", "winner_model_b", "winner_tie"]


def test_lmsys_dialect_writes_exactly_what_the_3_class_writer_writes(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.random((6, 3))
    probs[2] = np.nan  # the fallback path too
    ids = list(range(10, 16))
    direct = write_submission(
        ids, probs, tmp_path / "a.csv", expected_ids=ids, fallback_prior=[0.3, 0.3, 0.4]
    )
    through = LMSYS.write(ids, probs, tmp_path / "b.csv", expected_ids=ids, fallback_prior=[0.3, 0.3, 0.4])
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert direct.to_dict() | {"path": ""} == through.to_dict() | {"path": ""}
    assert through.fallback_rows == 1 and through.tied_rows == 0


def test_ab_winners_ignores_tie_and_sends_exact_ties_to_a():
    probs = np.array([[0.2, 0.3, 0.5], [0.5, 0.1, 0.4], [0.3, 0.3, 0.4], [1 / 3, 1 / 3, 1 / 3]])
    winners, tied = ab_winners(probs)
    assert winners.tolist() == [1, 0, 0, 0]  # tie column ignored; equal A/B -> A
    assert tied.tolist() == [False, False, True, True]


def test_accuracy_and_ab_log_loss():
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3], [0.45, 0.45, 0.1]])
    assert ab_accuracy(labels, probs) == 0.75  # row 3 wrong, row 4 an exact tie -> A, right
    pair = probs[:, :2] / probs[:, :2].sum(axis=1, keepdims=True)
    assert math.isclose(
        ab_log_loss(labels, probs), sklearn.metrics.log_loss(labels, pair[:, 1]), rel_tol=1e-12
    )
    with pytest.raises(ValueError, match="no tie class"):
        ab_accuracy(np.array([0, 2]), probs[:2])
    with pytest.raises(ValueError, match="shape"):
        ab_accuracy(labels, probs[:, :2])
    assert WSDM.scores(labels, probs).keys() == {"accuracy", "ab_log_loss", "log_loss"}
    assert WSDM.metric.better(0.8, 0.7) and LMSYS.metric.better(0.9, 1.0)


def test_generated_wsdm_files_have_the_competition_layout_and_load(wsdm_files):
    train = pl.read_parquet(wsdm_files.train_path)
    test = pl.read_parquet(wsdm_files.test_path)
    assert train.columns == [
        "id",
        "prompt",
        "response_a",
        "response_b",
        "winner",
        "model_a",
        "model_b",
        "language",
    ]
    assert train.schema["id"] == pl.String and test.schema["id"] == pl.Int64
    assert test.columns == ["id", "prompt", "response_a", "response_b", "scored"]
    assert set(train["winner"].unique()) == {"model_a", "model_b"}
    assert train["language"].n_unique() > 1
    assert pl.read_csv(wsdm_files.sample_submission_csv).columns == ["id", "winner"]

    loaded = load_competition(wsdm_files.train_path, WSDM.data_config(), split="train")
    assert loaded.report.rows_kept == 300 and set(loaded.frame["label"].unique()) == {0, 1}
    assert loaded.report.repairs["null_cell"] == len(wsdm_files.traps["train"]["null_response"])
    assert loaded.frame["prompt"].list.len().max() == 1  # one plain string per side
    test_loaded = load_competition(wsdm_files.test_path, WSDM.data_config(), split="test")
    assert test_loaded.report.rows_kept == 30 and not test_loaded.report.warnings
    # same seed, same files
    again = generate_wsdm_files(Path(wsdm_files.train_path).parent.parent / "again", n_train=300, n_test=30)
    assert pl.read_parquet(again.train_path).equals(train)


def test_wsdm_writer_picks_the_larger_of_a_and_b_and_counts_ties_and_fallbacks(tmp_path):
    ids = [7, 8, 9, 10]
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [np.nan, 0.2, 0.1], [0.4, 0.4, 0.2]])
    out = tmp_path / "submission.csv"
    report = WSDM.write(ids, probs, out, expected_ids=ids)
    assert out.read_text() == "id,winner\n7,model_b\n8,model_a\n9,model_a\n10,model_a\n"
    # row 9 could not be used: uniform fallback (then a tie -> A); row 10 is an exact tie
    assert report.fallback_rows == 1 and report.fallback_ids == [9]
    assert report.tied_rows == 2 and report.tie_rule == TIE_RULE
    assert "decided by rule" in report.summary()
    test = tmp_path / "test.parquet"
    pl.DataFrame(
        {"id": ids, "prompt": ["p"] * 4, "response_a": ["a"] * 4, "response_b": ["b"] * 4}
    ).write_parquet(test)
    assert WSDM.validate(out, test).rows == 4

    with pytest.raises(SubmissionError, match=r"probabilities must have shape \(4, 3\)"):
        WSDM.write(ids, probs[:, :2], tmp_path / "x.csv")
    with pytest.raises(SubmissionError, match="1 test ids missing"):
        WSDM.write(ids[:3], probs[:3], tmp_path / "x.csv", expected_ids=ids)
    assert not (tmp_path / "x.csv").exists()


@pytest.fixture
def wsdm_test_file(tmp_path) -> Path:
    path = tmp_path / "test.parquet"
    pl.DataFrame(
        {
            "id": [101, 102, 103, 104],
            "prompt": ["p"] * 4,
            "response_a": ["a"] * 4,
            "response_b": ["b"] * 4,
            "scored": [True, False, True, True],
        }
    ).write_parquet(path)
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_wsdm_validator_names_file_line_id_and_field(tmp_path, wsdm_test_file):
    good = write_text(
        tmp_path / "good.csv", "id,winner\n101,model_a\n102,model_b\n103,model_b\n104,model_a\n"
    )
    assert WSDM.validate(good, wsdm_test_file).rows == 4

    bad = write_text(tmp_path / "bad.csv", "id,winner\n101,model_a\n102,tie\n103,\n104,Model_B\n")
    with pytest.raises(SubmissionError) as error:
        WSDM.validate(bad, wsdm_test_file)
    message = str(error.value)
    assert str(bad) in message and "field 'winner': 3 values" in message
    assert "line 3 (id 102): 'tie'" in message and "line 4 (id 103): None" in message
    assert "line 5 (id 104): 'Model_B'" in message and "\n" not in message

    duplicated = write_text(tmp_path / "dup.csv", "id,winner\n101,model_a\n102,model_b\n102,model_a\n")
    with pytest.raises(SubmissionError) as error:
        WSDM.validate(duplicated, wsdm_test_file)
    message = str(error.value)
    assert "field 'id': 1 duplicate ids: 102 (lines 3, 4)" in message
    assert "field 'id': 2 test ids missing (103, 104)" in message

    extra = write_text(
        tmp_path / "extra.csv", "id,winner\n101,model_a\n102,model_b\n103,model_b\n104,model_a\n999,model_a\n"
    )
    with pytest.raises(SubmissionError, match=r"1 ids not in the test file \(999 \(line 6\)\)"):
        WSDM.validate(extra, wsdm_test_file)

    three_class = write_text(
        tmp_path / "lmsys.csv", "id,winner_model_a,winner_model_b,winner_tie\n101,1,0,0\n"
    )
    with pytest.raises(SubmissionError, match=r"header must be exactly \['id', 'winner'\]"):
        WSDM.validate(three_class, wsdm_test_file)
    with pytest.raises(SubmissionError, match="no rows"):
        WSDM.validate(write_text(tmp_path / "empty.csv", "id,winner\n"), wsdm_test_file)
    with pytest.raises(SubmissionError, match="not found"):
        WSDM.validate(tmp_path / "missing.csv", wsdm_test_file)


def test_a_new_dialect_is_one_subclass_and_its_registration(tmp_path, monkeypatch):
    """A CSV competition with a `preferred` column (left/right) and JSON-list cells: no change elsewhere."""

    class SideDialect(LmsysDialect):
        name = "sides"
        label_columns = ("preferred",)
        classes = ("model_a", "model_b")

        def parse_labels(self, raw, ids, path):
            return parse_winner_labels(raw, ids, path, "preferred", {"left": 0, "right": 1})

    monkeypatch.setitem(dialects.DIALECTS, "sides", SideDialect())
    train = write_text(
        tmp_path / "train.csv",
        "id,prompt,response_a,response_b,preferred\n"
        '1,"[""hi""]","[""a""]","[""b""]",right\n'
        '2,"[""yo""]","[""c""]","[""d""]",left\n',
    )
    loaded = load_competition(train, DataConfig(format="sides"))
    assert loaded.frame["label"].to_list() == [1, 0] and loaded.frame["prompt"].to_list() == [["hi"], ["yo"]]
    bad = write_text(
        tmp_path / "bad.csv", 'id,prompt,response_a,response_b,preferred\n1,"[""x""]","[]","[]",up\n'
    )
    with pytest.raises(
        DataError, match=r"bad.csv: column 'preferred' must be one of 'left' / 'right'.*\(1, 'up'\)"
    ):
        load_competition(bad, DataConfig(format="sides"))
    with pytest.raises(DataError, match="unknown data format 'nope'"):
        load_competition(train, DataConfig(format="nope"))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def main(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_GROUPS", ("data",))
    return cli.main


def test_cli_validate_submission_and_baseline_in_the_wsdm_dialect(main, wsdm_files, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    code = main(
        [
            "baseline",
            "--train",
            str(wsdm_files.train_path),
            "--dialect",
            "wsdm",
            "--n-folds",
            "3",
            "--test",
            str(wsdm_files.test_path),
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "OOF wsdm metric: accuracy 0." in printed and "(validated)" in printed
    assert pl.read_csv(out).columns == ["id", "winner"]
    assert (
        main(["validate-submission", str(out), "--test", str(wsdm_files.test_path), "--dialect", "wsdm"]) == 0
    )
    # the same file is not an LMSYS submission
    assert main(["validate-submission", str(out), "--test", str(wsdm_files.test_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "header must be exactly" in err and "\n" not in err
    assert main(["validate-submission", str(out), "--test", str(wsdm_files.test_path), "--dialect", "x"]) == 2
    assert "unknown competition dialect 'x'" in capsys.readouterr().err


def test_sample_rows_of_a_wsdm_config_are_generated_in_the_wsdm_format(tmp_path):
    """train / compare-orderings --sample-rows with `data.format: wsdm`: the files its loader can read."""
    import argparse

    from kaggle_utils.cli.run_options import add_run_options, prepare_run

    config = write_text(tmp_path / "wsdm.yaml", "data:\n  format: wsdm\n")
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    add_run_options(parser)
    cfg, _, train = prepare_run(
        parser.parse_args(["--out", str(tmp_path / "run"), "--sample-rows", "60", "--config", str(config)])
    )
    assert train.endswith("train.parquet")
    assert set(load_competition(train, cfg.data).frame["label"].unique()) <= {0, 1}


# ------------------------------------------------------------------------------------------------ predict
@pytest.fixture(scope="module")
def wsdm_artifact(tmp_path_factory, demo_tokenizer):
    import torch

    from kaggle_utils.core.config import FormatConfig, ModelConfig, QuantConfig
    from kaggle_utils.models import classifier as modeling
    from kaggle_utils.models import quantized as quantization
    from kaggle_utils.quant import artifacts

    torch.set_num_threads(1)
    model_cfg = ModelConfig()
    merged = modeling.build_classifier(
        model_cfg, vocab_size=len(demo_tokenizer), pad_token_id=demo_tokenizer.pad_token_id, device="cpu"
    )
    quantized = quantization.quantize_merged(merged, QuantConfig(scheme="int8"), model_cfg, device="cpu")
    fields = {
        "ordering": "ft-then-quant",
        "variant": "test",
        "base_model": "tiny",
        "folds_file_hash": "none",
        "cv_scores": {},
        "class_prior": [0.48, 0.52, 0.0],
        "dialect": "wsdm",
    }
    return artifacts.save_artifact(
        tmp_path_factory.mktemp("wsdm_artifact") / "a",
        quantized,
        demo_tokenizer,
        fields,
        FormatConfig(max_length=256),
    )


def test_predict_with_a_wsdm_artifact_writes_a_validated_id_winner_file(wsdm_artifact, wsdm_files, tmp_path):
    from kaggle_utils.core.config import InferenceConfig
    from kaggle_utils.inference import predictor as inference
    from kaggle_utils.inference.report import report_path_for
    from kaggle_utils.quant.artifacts import load_artifact
    from kaggle_utils.quant.manifest import read_manifest
    from kaggle_utils.text.encode import encode_rows

    assert read_manifest(wsdm_artifact)["dialect"] == "wsdm"
    cfg = InferenceConfig(
        device="cpu", token_budget=2048, max_rows_per_batch=16, warmup_batches=1, progress=False
    )
    out = tmp_path / "submission.csv"
    report = inference.run_submission(
        artifact_dir=wsdm_artifact, test_path=wsdm_files.test_path, out_path=out, cfg=cfg
    )
    assert report.dialect == "wsdm" and report.rows_by_path["tta"] == 30 and not report.errors
    assert WSDM.validate(out, wsdm_files.test_path).rows == 30
    written = pl.read_csv(out)
    assert written.columns == ["id", "winner"]
    saved = json.loads(report_path_for(out).read_text())
    assert saved["manifest"]["dialect"] == "wsdm" and saved["data_report"]["format"] == "wsdm"

    # Independently: each row alone through the model in both orders, exchanged back by index, averaged;
    # the written winner is the larger of A and B.
    import torch

    loaded = load_artifact(wsdm_artifact, device="cpu")
    frame = load_competition(wsdm_files.test_path, WSDM.data_config(), split="test").frame
    exchanged = frame.with_columns(response_a=pl.col("response_b"), response_b=pl.col("response_a"))

    def alone(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        exp = np.exp(logits - logits.max())
        return exp / exp.sum()

    original = encode_rows(frame, loaded.tokenizer, loaded.format_config).input_ids
    swapped = encode_rows(exchanged, loaded.tokenizer, loaded.format_config).input_ids
    probs = np.array([(alone(a) + alone(b)[[1, 0, 2]]) / 2 for a, b in zip(original, swapped, strict=True)])
    want = np.where(probs[:, 1] > probs[:, 0], "model_b", "model_a")
    assert written["winner"].to_list() == want.tolist()
    assert written["id"].to_list() == frame["id"].to_list()

    # An LMSYS reader forced onto a WSDM artifact is refused before anything is written.
    refused = tmp_path / "refused.csv"
    with pytest.raises(UsageError, match="data format 'lmsys' but the dialect is 'wsdm'"):
        inference.predict(wsdm_artifact, wsdm_files.test_path, refused, cfg, data_cfg=DataConfig())
    with pytest.raises(UsageError, match="unknown competition dialect"):
        inference.predict(wsdm_artifact, wsdm_files.test_path, refused, cfg, dialect="nope")
    assert not refused.exists()


def test_predict_fallback_of_a_wsdm_artifact_is_a_valid_id_winner_file(wsdm_artifact, wsdm_files, tmp_path):
    """A broken model path: every row from the manifest's class prior, written in the WSDM format."""
    from kaggle_utils.core.config import InferenceConfig
    from kaggle_utils.inference import predictor as inference

    cfg = InferenceConfig(device="cpu", progress=False)
    out = tmp_path / "submission.csv"

    def broken(forward, name):
        def fail(seqs):
            raise RuntimeError("device fault")

        return fail

    report = inference.predict(wsdm_artifact, wsdm_files.test_path, out, cfg, wrap_forward=broken)
    assert report.fallback_rows == 30 and report.fallback_source == "class prior from manifest"
    assert WSDM.validate(out, wsdm_files.test_path).rows == 30
    assert set(pl.read_csv(out)["winner"]) == {"model_b"}  # prior 0.48 / 0.52


def test_submission_notebook_on_a_wsdm_competition_folder(wsdm_artifact, wsdm_files, tmp_path):
    """The unchanged submission notebook, headless: WSDM's test.parquet beside sample_submission.csv and a
    WSDM artifact under a Kaggle-like input root; the dialect comes from the manifest."""
    import shutil

    import papermill

    from kaggle_utils.inference.report import report_path_for

    root = tmp_path / "input"
    competition = root / "competitions" / "wsdm-cup-multilingual-chatbot-arena"
    competition.mkdir(parents=True)
    shutil.copy(wsdm_files.test_path, competition / "test.parquet")
    shutil.copy(wsdm_files.sample_submission_csv, competition / "sample_submission.csv")
    shutil.copytree(wsdm_artifact, root / "models" / "wsdm-artifact")
    out = tmp_path / "submission.csv"
    notebook = Path(__file__).resolve().parents[2] / "notebooks" / "submission.ipynb"
    papermill.execute_notebook(
        str(notebook),
        str(tmp_path / "executed.ipynb"),
        parameters={"INPUT_ROOT": str(root), "OUT": str(out), "DEVICE": "cpu", "TOKEN_BUDGET": 2048},
        kernel_name="python3",
        progress_bar=False,
        cwd=str(tmp_path),
        execution_timeout=300,
    )
    assert WSDM.validate(out, competition / "test.parquet").rows == 30
    report = json.loads(report_path_for(out).read_text())
    assert report["dialect"] == "wsdm" and report["rows_by_path"]["tta"] == 30 and not report["errors"]


def test_predict_without_a_readable_manifest_writes_the_test_file_s_dialect(wsdm_files, tmp_path):
    """No artifact at all: every row falls back (uniform), and the file is still a valid WSDM submission
    because test.parquet is only WSDM's test file."""
    from kaggle_utils.core.config import InferenceConfig
    from kaggle_utils.inference import predictor as inference

    out = tmp_path / "submission.csv"
    report = inference.predict(
        tmp_path / "no-such-artifact",
        wsdm_files.test_path,
        out,
        InferenceConfig(device="cpu", progress=False),
    )
    assert report.dialect == "wsdm" and report.fallback_rows == 30 and report.errors
    assert WSDM.validate(out, wsdm_files.test_path).rows == 30
    assert report.submission["tied_rows"] == 30 and report.submission["tie_rule"] == TIE_RULE


# ------------------------------------------------------------------------------------------------ compare
def test_compare_reports_the_dialect_metric_beside_log_loss():
    variant = variant_registry.resolve_variants(["ft-then-quant"])[0]
    labels = np.array([0, 1, 1, 0, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.5, 0.2, 0.3], [0.3, 0.2, 0.5], [0.1, 0.8, 0.1]])
    train = {
        "best_eval_loss": 0.5,
        "selection": "final",
        "wall_time_s": 1.0,
        "tokens_per_s": 1.0,
        "trainable_params": 1,
        "total_params": 2,
        "total_steps": 3,
        "best_step": 3,
        "history": [],
    }
    fold = {
        "fold": 0,
        "labels": labels,
        "probs_16bit": probs,
        "probs_quantized": probs,
        "train": train,
        "peak_rss_bytes": 1,
        "peak_cuda_bytes": None,
        "artifact_bytes": 1,
        "inference_rows_per_s": 1.0,
        "artifact_dir": None,
        "extras": {},
        "notes": [],
        "prior_log_loss": 0.69,
        "class_prior": [0.4, 0.6, 0.0],
        "ids": [1, 2, 3, 4, 5],
    }
    run = cv_report.aggregate_run(variant, 0, [fold], WSDM)
    assert run["metric"] == "accuracy" and run["cv_metric_quantized"] == 0.8  # row 3 wrong
    assert run["accuracy_quantized"] == 0.6  # the 3-class argmax also counts row 4's "tie" as a miss
    assert set(run["cv_secondary_quantized"]) == {"ab_log_loss", "log_loss"}
    lmsys_run = cv_report.aggregate_run(variant, 0, [fold], LMSYS)
    assert lmsys_run["cv_metric_quantized"] == lmsys_run["cv_log_loss_quantized"]

    report = {
        "dialect": WSDM.describe(),
        "runs": [run],
        "variants": [cv_report.summarise_variant([run], variant.name, variant.ordering, "")],
    }
    text = "\n".join(report_render._metric_lines(report))
    assert (
        "Competition metric (wsdm): accuracy, higher is better" in text
        and "| ft-then-quant | 0.8000 |" in text
    )
    assert report_render._metric_lines({"dialect": LMSYS.describe(), "runs": [], "variants": []}) == []


# ------------------------------------------------------------------------------------------------ demo
@pytest.mark.slow
def test_demo_in_the_wsdm_dialect_end_to_end(tmp_path):
    """Generated WSDM files -> folds -> baseline -> both orderings -> predict: a validated id,winner file and
    accuracy reported (about 80 s on 2 shared CPU cores)."""
    from kaggle_utils.demo.run import run_demo

    submission = tmp_path / "submission.csv"
    report = run_demo(
        tmp_path / "demo",
        submission_path=submission,
        n_train=300,
        n_test=30,
        seed=0,
        echo=lambda _: None,
        dialect="wsdm",
    )
    test_path = report["sample"]["test_csv"]
    assert test_path.endswith("test.parquet") and report["meta"]["dialect"]["name"] == "wsdm"
    assert WSDM.validate(submission, test_path).rows == 30
    assert pl.read_csv(submission).columns == ["id", "winner"]
    assert 0.5 < report["baseline"]["competition_metric"]["scores"]["accuracy"] <= 1.0
    comparison = json.loads((tmp_path / "demo" / "orderings" / "report.json").read_text())
    assert comparison["dialect"]["metric"] == "accuracy"
    assert all(0.0 <= v["cv_metric_quantized"]["mean"] <= 1.0 for v in comparison["variants"])
    assert (
        "Competition metric (wsdm): accuracy" in (tmp_path / "demo" / "orderings" / "report.md").read_text()
    )
    artifact = Path(report["inference"]["artifact_dir"])
    assert json.loads((artifact / "manifest.json").read_text())["dialect"] == "wsdm"
    assert report["inference"]["dialect"] == "wsdm" and report["inference"]["fallback_rows"] == 0
    assert "Shipped CV accuracy" in (tmp_path / "demo" / "demo_report.md").read_text()
