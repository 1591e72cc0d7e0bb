"""compare_orderings end to end (tiny Gemma-2, CPU), the variant registry, the noise rule and the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from kaggle_utils.cli.main import main
from kaggle_utils.core.config import PipelineConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.metrics import load_oof, log_loss, oof_probs
from kaggle_utils.evaluate import cv_report
from kaggle_utils.evaluate.report_render import artifact_table, plot_learning_curves
from kaggle_utils.quant.artifacts import load_artifact
from kaggle_utils.studies import experiment
from kaggle_utils.studies import orderings as compare
from kaggle_utils.text.template import TEMPLATE_VERSION
from kaggle_utils.variants import registry as variant_registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def quick_config(max_steps: int = 8) -> PipelineConfig:
    cfg = experiment.demo_config()
    cfg.folds.n_folds = 4
    cfg.lora.r = 4
    # Two held-out folds: anything that keeps only one fold's rows (the OOF store once did) is caught.
    cfg.train = dataclasses.replace(
        cfg.train, max_steps=max_steps, eval_every_steps=4, save_every_steps=4, cv_folds=(0, 1)
    )
    return cfg


@pytest.fixture(scope="module")
def comparison(sample_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    report = compare.compare_orderings(
        quick_config(), sample_files.train_csv, out, seeds=(1, 2), progress=False
    ).to_dict()
    return report, out


@pytest.mark.slow
def test_report_files_and_numbers_come_from_the_run(comparison):
    report, out = comparison
    for name in (compare.REPORT_JSON, compare.REPORT_MD, compare.REPORT_PNG, compare.OOF_FILE):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / compare.REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / compare.REPORT_JSON).read_text())
    assert on_disk["decision"] == report["decision"]
    assert [v["variant"] for v in report["variants"]] == ["ft-then-quant", "quant-then-ft"]
    assert report["decision"]["winner"] in ("ft-then-quant", "quant-then-ft")
    assert isinstance(report["decision"]["within_noise"], bool)
    assert "no GPU" in report["environment"]["device"]
    assert report["environment"]["cpu"] and report["environment"]["cores"]
    model = report["setup"]["model"]
    assert model["model_type"] == "gemma2" and model["parameters"] > 0 and model["weights_sha256"]
    assert "Model: gemma2" in (out / compare.REPORT_MD).read_text()

    oof = load_oof(out / compare.OOF_FILE)
    for run in report["runs"]:
        name = f"{run['variant']}/seed{run['seed']}"
        rows16, rows_q = (
            oof.filter(pl.col("name") == f"{name}/16bit"),
            oof.filter(pl.col("name") == f"{name}/quantized"),
        )
        assert rows16.height == rows_q.height == run["rows"] > 0
        assert [f["fold"] for f in run["per_fold"]] == [0, 1]
        assert sorted(rows_q["fold"].unique().to_list()) == [0, 1]  # every trained fold's rows, not the last
        assert run["cv_log_loss_16bit"] == pytest.approx(
            log_loss(rows16["label"].to_numpy(), oof_probs(rows16))
        )
        assert run["cv_log_loss_quantized"] == pytest.approx(
            log_loss(rows_q["label"].to_numpy(), oof_probs(rows_q))
        )
        assert run["gap_vs_own_reference"] == pytest.approx(
            run["cv_log_loss_quantized"] - run["cv_log_loss_16bit"]
        )
        # One common reference per seed: ft-then-quant's 16-bit LoRA model (merged in fp32), for every variant
        reference = next(
            r for r in report["runs"] if r["variant"] == "ft-then-quant" and r["seed"] == run["seed"]
        )
        assert run["cv_log_loss_common_reference"] == reference["cv_log_loss_16bit"]
        assert run["qid_vs_common"] == pytest.approx(
            run["cv_log_loss_quantized"] - reference["cv_log_loss_16bit"]
        )
        for fold, ref_fold in zip(run["per_fold"], reference["per_fold"], strict=True):
            assert fold["qid_vs_common"] == pytest.approx(
                fold["log_loss_quantized"] - ref_fold["log_loss_16bit"]
            )
        assert run["steps"] == 8 and run["trainable_params"] > 0 and run["artifact_bytes"] > 0
        assert run["train_wall_time_s"] > 0 and run["inference_rows_per_s"] > 0 and run["peak_rss_bytes"] > 0
    # Identical held-out rows for every variant and seed: the same folds.
    held_out = {tuple(sorted(part["id"].to_list())) for _, part in oof.group_by("name")}
    assert len(held_out) == 1
    for summary in report["variants"]:
        assert summary["seeds"] == [1, 2] and summary["cv_log_loss_quantized"]["std"] is not None
    assert report["common_reference"]["variant"] == "ft-then-quant"
    for summary in report["variants"]:
        assert summary["qid_vs_common"]["mean"] == pytest.approx(
            np.mean([r["qid_vs_common"] for r in report["runs"] if r["variant"] == summary["variant"]])
        )
    assert (
        "adapter, trained on the quantized base"
        in next(v for v in report["variants"] if v["variant"] == "quant-then-ft")["own_reference"]
    )
    markdown = (out / compare.REPORT_MD).read_text()
    assert report["decision"]["statement"] in markdown and "| ft-then-quant |" in markdown
    assert "QiD vs common reference" in markdown and "shipped − own reference" in markdown
    # several seeds: each variant's seed ensemble is a ship candidate, shipping every seed's fold artifacts
    ranking = {c["name"]: c for c in report["ship"]["ranking"]}
    ensemble = ranking["ft-then-quant/seed-ensemble"]
    assert len([m for m in ensemble["members"] if m["kind"] == "model"]) == 4  # 2 seeds x 2 folds
    assert report["ship"]["statement"].startswith("ship ")


@pytest.mark.slow
def test_both_artifacts_share_folds_base_and_reload(comparison):
    report, out = comparison
    manifests = []
    for run in report["runs"]:
        artifact = run["per_fold"][0]["artifact_dir"]
        loaded = load_artifact(artifact, device="cpu")
        manifests.append(loaded.manifest)
        assert loaded.manifest["cv_scores"]["log_loss_quantized"] == pytest.approx(
            run["per_fold"][0]["log_loss_quantized"]
        )
    assert len({m["folds_file_hash"] for m in manifests}) == 1
    assert len({m["base_model"] for m in manifests}) == 1
    assert {m["quant_scheme"] for m in manifests} == {"nf4"}
    assert {m["has_adapter"] for m in manifests if m["ordering"] == "quant-then-ft"} == {True}
    assert {m["has_merged"] for m in manifests if m["ordering"] == "quant-then-ft"} == {True}
    extras = [f["extras"] for r in report["runs"] if r["ordering"] == "quant-then-ft" for f in r["per_fold"]]
    assert all("merged-into-nf4" in extra for extra in extras)


def test_a_registered_variant_runs_without_touching_compare(sample_files, tmp_path):
    """The extension point: a variant defined elsewhere (here: ft-then-quant exported in LLM.int8)."""
    base = variant_registry.VARIANTS["ft-then-quant"]

    def int8(cfg: PipelineConfig) -> PipelineConfig:
        cfg.quant.scheme = "int8"
        return cfg

    variant = variant_registry.register_variant(
        dataclasses.replace(base, name="test-ft-then-int8", configure=int8)
    )
    variant_registry.register_variant(
        dataclasses.replace(base, name="test-needs-a-gpu", unavailable=lambda: "needs CUDA")
    )
    try:
        with pytest.raises(UsageError, match="already registered"):
            variant_registry.register_variant(dataclasses.replace(variant, description="another"))
        cfg = quick_config(max_steps=2)
        cfg.train.eval_every_steps = 2
        typed = compare.compare_orderings(
            cfg,
            sample_files.train_csv,
            tmp_path,
            variants=["test-ft-then-int8", "test-needs-a-gpu"],
            progress=False,
        )
        report = typed.to_dict()
        assert (
            typed.run("test-ft-then-int8").folds[0].artifact_dir
            == report["runs"][0]["per_fold"][0]["artifact_dir"]
        )
        # the variant that cannot run here is skipped and listed; the others still run
        assert [v["variant"] for v in report["variants"]] == ["test-ft-then-int8"]
        assert report["skipped_variants"] == {"test-needs-a-gpu": "needs CUDA"}
        assert "test-needs-a-gpu" in (tmp_path / "report.md").read_text()
        with pytest.raises(UsageError, match="no requested variant can run.*needs CUDA"):
            compare.compare_orderings(
                cfg, sample_files.train_csv, tmp_path / "none", variants=["test-needs-a-gpu"]
            )
        artifact = report["runs"][0]["per_fold"][0]["artifact_dir"]
        assert load_artifact(artifact, device="cpu").manifest["quant_scheme"] == "int8"
        assert report["decision"]["runner_up"] is None
        # the report records how its rows were encoded
        assert report["setup"]["template_version"] == TEMPLATE_VERSION
        assert report["setup"]["format"] == dataclasses.asdict(cfg.format)
    finally:
        variant_registry.VARIANTS.pop("test-ft-then-int8", None)
        variant_registry.VARIANTS.pop("test-needs-a-gpu", None)
    with pytest.raises(UsageError, match="unknown variant"):
        variant_registry.resolve_variants(["no-such-variant"])


def test_lora_is_merged_in_fp32_for_the_common_reference(demo_tokenizer, demo_base_dir):
    """A bf16 merge rounds a small LoRA update away; the reference is merged in fp32 and keeps it."""
    import torch

    from kaggle_utils.core.config import LoraSettings, ModelConfig
    from kaggle_utils.models.classifier import apply_lora, build_classifier

    def lora_model():
        base = build_classifier(
            ModelConfig(base_model=str(demo_base_dir), dtype="bfloat16"),
            pad_token_id=demo_tokenizer.pad_token_id,
            device=torch.device("cpu"),
        )
        model = apply_lora(base, LoraSettings(r=4, alpha=4, dropout=0.0))
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_((torch.randn(param.shape, generator=generator) * 1e-2).to(param.dtype))
        return model

    model = lora_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    exact = (
        layer.base_layer.weight.double()
        + layer.lora_B["default"].weight.double()
        @ layer.lora_A["default"].weight.double()
        * layer.scaling["default"]
    )
    merged = variant_registry.merge_lora_fp32(model)
    weight = merged.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.float32
    bf16_error = (
        (lora_model().merge_and_unload().model.layers[0].self_attn.q_proj.weight.double() - exact).abs().max()
    )
    assert (weight.double() - exact).abs().max() < 1e-6 < bf16_error


def _run(name: str, seed: int, losses: np.ndarray) -> dict:
    return {
        "variant": name,
        "seed": seed,
        "cv_log_loss_quantized": float(losses.mean()),
        "_row_losses_quantized": losses,
    }


def test_winner_needs_a_difference_beyond_noise():
    rng = np.random.default_rng(0)
    common = rng.exponential(1.0, size=2000)
    clear = [_run("a", 0, common), _run("b", 0, common + 0.05 + rng.normal(0, 0.1, 2000))]
    decision = cv_report.decide_winner(clear, ["a", "b"])
    assert (
        decision["winner"] == "a" and decision["within_noise"] is False and "a wins" in decision["statement"]
    )
    close = [_run("a", 0, common), _run("b", 0, common + 0.001 + rng.normal(0, 0.3, 2000))]
    decision = cv_report.decide_winner(close, ["a", "b"])
    assert decision["within_noise"] is True and "within noise" in decision["statement"]
    # Several seeds: seed-to-seed spread counts as noise too.
    seeds = [_run("a", s, common) for s in range(3)] + [
        _run("b", s, common + shift) for s, shift in enumerate((0.08, -0.07, 0.02))
    ]
    assert cv_report.decide_winner(seeds, ["a", "b"])["within_noise"] is True


def test_cli_train_writes_an_artifact(sample_files, tmp_path, capsys):
    cfg = quick_config(max_steps=2)
    cfg.train.eval_every_steps = 2
    config_path = tmp_path / "cfg.yaml"
    cfg.to_yaml(config_path)
    assert yaml.safe_load(config_path.read_text())["train"]["max_steps"] == 2
    code = main(
        [
            "train",
            "--ordering",
            "quant-then-ft",
            "--config",
            str(config_path),
            "--train",
            str(sample_files.train_csv),
            "--out",
            str(tmp_path / "out"),
            "--fold",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "quant-then-ft, fold 1" in printed and "artifact:" in printed
    artifact = printed.split("artifact:")[1].strip()
    assert load_artifact(artifact, device="cpu").manifest["ordering"] == "quant-then-ft"
    # its OOF file records the folds the run left out (none), as compare-orderings' does (a teacher check
    # reads it)
    from kaggle_utils.core.metrics import read_oof_records

    records = read_oof_records(tmp_path / "out" / "oof.parquet")
    assert records and all(record["excluded_folds"] == {} for record in records.values())
    assert (
        main(["compare-orderings", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)]) == 2
    )


def _report_with_history(variants: list[str]) -> dict:
    """The fields of report.json the learning curves and the artifact table read, for two folds per run."""
    runs = []
    for variant in variants:
        per_fold = [
            {
                "fold": fold,
                "log_loss_quantized": 1.0 - 0.1 * fold,
                "artifact_dir": f"runs/{variant}/fold{fold}",
                "history": [{"step": step, "eval_loss": 1.1 - 0.01 * step - fold} for step in (1, 2, 3)],
            }
            for fold in (0, 1)
        ]
        runs.append({"variant": variant, "seed": 7, "prior_log_loss": 1.0986, "per_fold": per_fold})
    return {"runs": runs}


@pytest.mark.parametrize("variants", [["ft-then-quant"], ["ft-then-quant", "quant-then-ft"]])
def test_learning_curves_draw_one_line_per_run_and_fold(variants, tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    original_plot = matplotlib.axes.Axes.plot

    def recording_plot(axis, x, y, **kwargs):
        drawn.append((list(x), list(y), kwargs["label"]))
        return original_plot(axis, x, y, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    path = plot_learning_curves(_report_with_history(variants), tmp_path / "curves.png")
    assert path == tmp_path / "curves.png" and path.read_bytes().startswith(b"\x89PNG")
    assert len(drawn) == 2 * len(variants)
    steps, losses, label = drawn[-1]
    assert steps == [1, 2, 3] and losses == pytest.approx([0.09, 0.08, 0.07])
    assert label == ("fold 1" if len(variants) == 1 else "quant-then-ft seed 7 fold 1")


def test_artifact_table_lists_every_trained_fold():
    table = artifact_table(_report_with_history(["ft-then-quant", "quant-then-ft"]))
    assert table.columns == ["fold", "log_loss_quantized", "artifact_dir"]
    assert table["artifact_dir"].to_list() == [
        f"runs/{v}/fold{f}" for v in ("ft-then-quant", "quant-then-ft") for f in (0, 1)
    ]
    assert table["log_loss_quantized"].to_list() == pytest.approx([1.0, 0.9, 1.0, 0.9])


def test_training_notebook_parameters_resolve_to_config_and_paths(tmp_path, monkeypatch):
    from kaggle_utils.core import environment

    monkeypatch.setattr(environment, "KAGGLE_INPUT", tmp_path / "input")
    monkeypatch.setattr(environment, "KAGGLE_WORKING", tmp_path / "working")
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.chdir(tmp_path)  # no data/train.csv here
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"lora": {"r": 4}, "train": {"max_steps": 50}}))
    train_csv = tmp_path / "input" / "competitions" / "arena" / "train.csv"
    train_csv.parent.mkdir(parents=True)
    train_csv.write_text("id\n")
    cfg, train_path, out_dir = experiment.resolve_training_notebook(
        "quant-then-ft",
        "arena",
        config_path=config,
        base_model_path="/models/gemma",
        cv_folds=[1, 2],
        overrides={"train": {"max_steps": 2}},
    )
    assert (cfg.lora.r, cfg.train.max_steps, cfg.train.cv_folds) == (4, 2, (1, 2))
    assert (
        cfg.model.base_model == "/models/gemma"
        and cfg.format.tokenizer_path == PipelineConfig().format.tokenizer_path
    )
    assert train_path == train_csv and out_dir == tmp_path / "working" / "quant-then-ft"
    cfg, train_path, out_dir = experiment.resolve_training_notebook(
        "ft-then-quant", "arena", train_path="mine.csv", out_dir=tmp_path / "out", tokenizer_path="/tok"
    )
    assert (train_path, out_dir, cfg.format.tokenizer_path) == (Path("mine.csv"), tmp_path / "out", "/tok")
    assert cfg.model.base_model == PipelineConfig().model.base_model and cfg.train.cv_folds == (0,)
    with pytest.raises(UsageError, match="no train.csv in .*; set TRAIN_PATH"):
        experiment.resolve_training_notebook("ft-then-quant", "other-competition")


def test_own_reference_of_full_fine_tuning_is_not_a_lora():
    text = cv_report.own_reference_description(variant_registry.VARIANTS["full-then-quant"])
    assert "fully fine-tuned" in text and "LoRA" not in text


def test_the_winner_is_ranked_by_the_rows_its_difference_is_paired_on():
    """report.json's cv_log_loss_quantized (edited, or NaN) cannot reverse the decision its rows make."""
    rng = np.random.default_rng(0)
    common = rng.exponential(1.0, size=2000)
    better, worse = _run("a", 0, common), _run("b", 0, common + 0.05 + rng.normal(0, 0.1, 2000))
    for recorded in (worse["cv_log_loss_quantized"] + 0.1, float("nan")):
        decision = cv_report.decide_winner([{**better, "cv_log_loss_quantized": recorded}, worse], ["a", "b"])
        assert decision["winner"] == "a" and decision["difference"] > 0 and "a wins" in decision["statement"]


def test_the_report_names_its_model_and_machine(tmp_path):
    """Every comparison report says which model it is about (type, parameters, vocabulary, weights' sha256,
    origin) and on which machine it ran, not only a folder path."""
    import json

    from kaggle_utils.core.config import ModelConfig
    from kaggle_utils.core.fileio import file_sha256
    from kaggle_utils.models.classifier import materialize_base
    from kaggle_utils.models.model_config import describe_checkpoint

    base = materialize_base(ModelConfig(init_seed=3), tmp_path / "base", vocab_size=300, pad_token_id=0)
    described = describe_checkpoint(base, "tiny", 3)
    weights = sorted(base.glob("*.safetensors"))
    assert described["model_type"] == "gemma2" and described["vocab_size"] == 300
    assert described["weights_sha256"] == {path.name: file_sha256(path) for path in weights}
    assert described["origin"] == "random weights from the config (model.init_seed 3)"
    from safetensors.torch import load_file

    assert described["parameters"] == sum(t.numel() for path in weights for t in load_file(path).values())
    (base / "fetch.json").write_text(
        json.dumps({"name": "m", "gguf_file": "m.gguf", "gguf_sha256": "ab", "quantization": "Q4_K_M"})
    )
    assert describe_checkpoint(base, str(base))["origin"] == "fetch-model m: m.gguf (sha256 ab, Q4_K_M)"
