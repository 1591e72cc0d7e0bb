"""An ensemble artifact through `predict`: the blend by the manifest's weights, the time guard cutting the
most expensive member first, a failing member, and a submission that stays valid throughout (fake clock)."""

from __future__ import annotations

import json
import re

import numpy as np
import polars as pl
import pytest
import torch
from builders import CLASS_PRIOR, FakeClock, build_tiny_artifacts, predict_cfg, read_probs

from kaggle_utils.cli.main import main
from kaggle_utils.core.errors import UsageError
from kaggle_utils.data.submission import validate_submission
from kaggle_utils.evaluate.ensembles import blend_members
from kaggle_utils.inference import predictor as inference
from kaggle_utils.inference.ensemble import EnsembleMember, ensemble_members, fill_blend
from kaggle_utils.inference.report import report_path_for
from kaggle_utils.quant.layout import MANIFEST_NAME

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory, demo_tokenizer):
    torch.set_num_threads(1)
    return build_tiny_artifacts(tmp_path_factory.mktemp("artifacts"), demo_tokenizer)


def write_ensemble(folder, members: list[tuple[str, str, float]], extra: list[dict] = ()) -> str:
    """An ensemble folder as `ensembles.save_ensemble` writes it: a manifest naming members and weights."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "kind": "ensemble",
        "class_prior": CLASS_PRIOR,
        "dialect": "lmsys",
        "members": [{"name": name, "path": str(path), "weight": weight} for name, path, weight in members]
        + list(extra),
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
    return str(folder)


def single(artifact, sample_files, out) -> np.ndarray:
    report = inference.predict(artifact, sample_files.test_csv, out, predict_cfg())
    assert report.fallback_rows == 0
    return read_probs(out)


def test_an_ensemble_predicts_the_weighted_mean_of_its_members(tiny_artifacts, sample_files, tmp_path):
    first = single(tiny_artifacts["ft-then-quant"], sample_files, tmp_path / "a.csv")
    second = single(tiny_artifacts["quant-then-ft"], sample_files, tmp_path / "b.csv")
    ensemble = write_ensemble(
        tmp_path / "ens",
        [("ft", tiny_artifacts["ft-then-quant"], 0.7), ("q", tiny_artifacts["quant-then-ft"], 0.3)],
    )
    out = tmp_path / "submission.csv"
    assert (
        main(
            [
                "predict",
                "--artifact",
                ensemble,
                "--test",
                str(sample_files.test_csv),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    validate_submission(out, sample_files.test_csv)
    np.testing.assert_allclose(read_probs(out), 0.7 * first + 0.3 * second, atol=1e-6)
    report = json.loads(report_path_for(out).read_text())
    rows = pl.read_csv(sample_files.test_csv).height
    assert report["rows_by_path"] == {"all_members": rows, "some_members": 0, "fallback": 0}
    assert [(m["name"], m["rows_served"]) for m in report["members"]] == [("ft", rows), ("q", rows)]


def test_the_time_guard_cuts_the_most_expensive_member_first(tiny_artifacts, sample_files, tmp_path):
    """Members run cheapest first under one deadline: the expensive one loses its TTA, then rows, which are
    then served by the cheap member alone; nothing falls back and the file is valid."""
    clock = FakeClock()
    first, second = tiny_artifacts["ft-then-quant"], tiny_artifacts["quant-then-ft"]
    cheap, costly = sorted((first, second), key=lambda p: EnsembleMember("", "model", 1.0, p).cost())

    def slow(forward, name):  # every padded token costs 0.1 fake seconds, whichever member runs
        def wrapped(seqs):
            clock.advance(0.1 * len(seqs) * max(len(seq) for seq in seqs))
            return forward(seqs)

        return wrapped

    ensemble = write_ensemble(tmp_path / "ens", [("costly", costly, 0.5), ("cheap", cheap, 0.5)])
    # ~1600 fake s per member with both views; the deadline leaves room for the cheap member and a part of
    # the costly one.
    cfg = predict_cfg(deadline_hours=(2700 / 3600) + 0.1, safety_margin_hours=0.1)
    out = tmp_path / "submission.csv"
    report = inference.predict(ensemble, sample_files.test_csv, out, cfg, clock=clock, wrap_forward=slow)
    validate_submission(out, sample_files.test_csv)
    members = {m["name"]: m for m in report.members}
    assert members["cheap"]["rows_served"] == report.rows  # run first: all its rows
    assert members["costly"]["schedule"]["tta_dropped"]  # its TTA went first ...
    assert 0 < members["costly"]["rows_served"] < report.rows  # ... then its remaining rows
    assert report.rows_by_path["fallback"] == 0
    assert report.rows_by_path["some_members"] == report.rows - members["costly"]["rows_served"]


def test_a_failing_member_leaves_its_rows_to_the_others(tiny_artifacts, sample_files, tmp_path):
    alone = single(tiny_artifacts["ft-then-quant"], sample_files, tmp_path / "a.csv")
    ensemble = write_ensemble(
        tmp_path / "ens",
        [("ft", tiny_artifacts["ft-then-quant"], 0.5), ("missing", tmp_path / "no-such-artifact", 0.5)],
    )
    out = tmp_path / "submission.csv"
    report = inference.predict(ensemble, sample_files.test_csv, out, predict_cfg())
    validate_submission(out, sample_files.test_csv)
    np.testing.assert_allclose(read_probs(out), alone, atol=1e-6)  # weights renormalised over the served
    assert report.rows_by_path["some_members"] == report.rows and report.fallback_rows == 0
    assert any("missing" in error["where"] for error in report.errors)


def test_blend_members_renormalises_over_the_members_that_served_a_row():
    a = np.array([[0.6, 0.3, 0.1], [np.nan] * 3, [np.nan] * 3])
    b = np.array([[0.2, 0.2, 0.6], [0.1, 0.8, 0.1], [np.nan] * 3])
    blended = blend_members([a, b], [0.75, 0.25])
    np.testing.assert_allclose(blended.probs[0], 0.75 * a[0] + 0.25 * b[0])
    np.testing.assert_allclose(blended.probs[1], b[1])
    assert np.isnan(blended.probs[2]).all()
    assert blended.members_served.tolist() == [2, 1, 0]
    final, paths = fill_blend(blended, np.full((3, 3), 1 / 3))
    assert paths.tolist() == ["all_members", "some_members", "fallback"]
    np.testing.assert_allclose(final[2], 1 / 3)


def test_a_prior_member_shrinks_the_model_towards_the_class_prior(tiny_artifacts, sample_files, tmp_path):
    alone = single(tiny_artifacts["ft-then-quant"], sample_files, tmp_path / "a.csv")
    prior = [0.5, 0.3, 0.2]
    ensemble = write_ensemble(
        tmp_path / "ens",
        [("ft", tiny_artifacts["ft-then-quant"], 0.8)],
        [{"name": "prior", "kind": "prior", "prior": prior, "weight": 0.2}],
    )
    out = tmp_path / "submission.csv"
    report = inference.predict(ensemble, sample_files.test_csv, out, predict_cfg())
    validate_submission(out, sample_files.test_csv)
    np.testing.assert_allclose(read_probs(out), 0.8 * alone + 0.2 * np.array(prior), atol=1e-6)
    assert report.rows_by_path["all_members"] == report.rows


@pytest.mark.parametrize(
    ("member", "message"),
    [
        ({"name": "x", "kind": "weights", "path": "a", "weight": 1.0}, "kind 'weights' is not one of"),
        ({"name": "x", "kind": "prior", "prior": [0.5, 0.5], "weight": 1.0}, "prior must be 3 non-negative"),
        ({"name": "x", "kind": "model", "weight": 1.0}, r"members\[0\] \(model\) needs a path"),
        ({"name": "x", "path": "a", "weight": -1.0}, "weight must be >= 0"),
        ({"name": "x", "path": "a"}, r"members\[0\] is malformed"),
    ],
)
def test_malformed_ensemble_members_are_named(member, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        ensemble_members(tmp_path, {"kind": "ensemble", "members": [member]})


def test_ensemble_member_names_are_unique(tmp_path):
    twice = [{"name": "x", "path": "a", "weight": 0.5}, {"name": "x", "path": "b", "weight": 0.5}]
    with pytest.raises(UsageError, match=r"member names must be unique, repeated: \['x'\]"):
        ensemble_members(tmp_path, {"kind": "ensemble", "members": twice})


def test_member_per_device_runs_members_side_by_side_with_the_same_result(
    tiny_artifacts, sample_files, tmp_path
):
    """The winners' 2-GPU layout on two CPU replicas: one member per device, the same blend as in sequence."""
    ensemble = write_ensemble(
        tmp_path / "ens",
        [("ft", tiny_artifacts["ft-then-quant"], 0.5), ("q", tiny_artifacts["quant-then-ft"], 0.5)],
    )
    sequential = inference.predict(ensemble, sample_files.test_csv, tmp_path / "seq.csv", predict_cfg())
    side = inference.predict(
        ensemble,
        sample_files.test_csv,
        tmp_path / "side.csv",
        predict_cfg(cpu_replicas=2, ensemble_layout="member_per_device"),
    )
    assert sequential.schedule["ensemble_layout"] == "sequential"
    assert side.schedule["ensemble_layout"] == "member_per_device"
    assert [m["schedule"]["workers"][0]["name"] for m in side.members] == ["cpu", "cpu"]  # one device each
    np.testing.assert_allclose(read_probs(tmp_path / "side.csv"), read_probs(tmp_path / "seq.csv"), atol=1e-6)
    # with fewer devices than model members it falls back to sequential and says so
    one = inference.predict(
        ensemble,
        sample_files.test_csv,
        tmp_path / "one.csv",
        predict_cfg(ensemble_layout="member_per_device"),
    )
    assert one.schedule["ensemble_layout"].startswith("sequential (member_per_device needs")


def test_a_tampered_member_file_of_a_shipped_ensemble_is_refused_naming_it(
    tiny_artifacts, sample_files, tmp_path, capsys
):
    """Loading a shipped (self-contained) ensemble checks every member file against the sha256 its manifest
    lists: a same-size edit of a member's weights is an ArtifactError naming the file, and `predict` serves no
    row from that ensemble (every row from the fallback, exit 1, the file named in the report)."""
    from kaggle_utils.core.errors import ArtifactError
    from kaggle_utils.evaluate.candidates import Candidate, decide_ship
    from kaggle_utils.evaluate.ship import write_shipped

    members = [
        {"name": "ft", "kind": "model", "path": str(tiny_artifacts["ft-then-quant"]), "weight": 0.5},
        {"name": "q", "kind": "model", "path": str(tiny_artifacts["quant-then-ft"]), "weight": 0.5},
    ]
    labels = np.arange(30) % 3
    candidate = Candidate(name="blend", kind="blend", probs=np.tile(CLASS_PRIOR, (30, 1)), members=members)
    shipped = write_shipped(
        decide_ship(labels, [candidate]), tmp_path / "shipped", class_prior=CLASS_PRIOR, dialect="lmsys"
    )
    manifest = json.loads((shipped / MANIFEST_NAME).read_text())
    assert len(ensemble_members(shipped, manifest)) == 2  # intact: accepted

    weights = shipped / "members" / "q" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.unlink()  # a new file (the copy may be a hard link to the module's artifact)
    weights.write_bytes(bytes(data))
    with pytest.raises(
        ArtifactError, match=r"file members/q/model/model.safetensors does not match its sha256"
    ):
        ensemble_members(shipped, manifest)

    out = tmp_path / "submission.csv"
    assert (
        main(
            [
                "predict",
                "--artifact",
                str(shipped),
                "--test",
                str(sample_files.test_csv),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 1
    )
    validate_submission(out, sample_files.test_csv)
    report = json.loads(report_path_for(out).read_text())
    assert report["rows_by_path"]["fallback"] == report["rows"]
    assert any(
        "members/q/model/model.safetensors does not match its sha256" in e["message"]
        for e in report["errors"]
    )
    assert "members/q/model/model.safetensors" in capsys.readouterr().err


def _copied(artifact, where):
    import shutil

    return shutil.copytree(artifact, where)


def test_predict_refuses_an_output_that_is_a_file_any_member_reads(
    tiny_artifacts, sample_files, tmp_path, capsys
):
    """The members' files are inputs too: a baseline member's JSON, its manifest, a model member's folder."""
    member = _copied(tiny_artifacts["ft-then-quant"], tmp_path / "members" / "ft")
    baseline = tmp_path / "baseline_model.json"
    baseline.write_text("{}")
    ensemble = write_ensemble(
        tmp_path / "shipped",
        [("ft", "../members/ft", 0.5)],
        [{"name": "baseline", "kind": "baseline", "path": str(baseline), "weight": 0.5}],
    )
    targets = {
        baseline: "ensemble member baseline",
        tmp_path / "baseline_model.json.manifest.json": "ensemble member baseline's manifest",
        member / "manifest.json": "ensemble member ft",
    }
    before = {path: path.read_bytes() for path in member.rglob("*") if path.is_file()}
    for target, what in targets.items():
        code = main(
            [
                "predict",
                "--artifact",
                ensemble,
                "--test",
                str(sample_files.test_csv),
                "--out",
                str(target),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        err = capsys.readouterr().err
        relation = "is" if target.name != "manifest.json" else "is inside"
        assert code == 2 and err.strip() == (
            f"error: refusing to write {target}: it {relation} the {what} "
            f"{target if relation == 'is' else member}; choose another output"
        ), err
    assert baseline.read_text() == "{}" and not (tmp_path / "baseline_model.json.manifest.json").exists()
    assert {path: path.read_bytes() for path in member.rglob("*") if path.is_file()} == before
    assert not list(tmp_path.glob("*.csv")) and not list(tmp_path.glob("*.inference.json"))


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([float("inf"), 1.0], r"members\[0\]\.weight must be >= 0 and finite, got inf"),
        ([1e308, 1e308], r"the members' weights sum to inf \(not finite\)"),
        ([0.0, 0.0], "an ensemble needs members with positive weight"),
    ],
)
def test_ensemble_weights_must_be_finite_with_a_finite_positive_sum(
    weights, message, tiny_artifacts, sample_files, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    ensemble = write_ensemble(
        tmp_path / "ens",
        [
            ("ft", tiny_artifacts["ft-then-quant"], weights[0]),
            ("q", tiny_artifacts["quant-then-ft"], weights[1]),
        ],
    )
    manifest = json.loads((tmp_path / "ens" / MANIFEST_NAME).read_text())
    with pytest.raises(UsageError, match=message):
        ensemble_members(ensemble, manifest)
    out = tmp_path / "submission.csv"
    code = main(
        [
            "predict",
            "--artifact",
            ensemble,
            "--test",
            str(sample_files.test_csv),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 1 and re.search(message, capsys.readouterr().err)
    validate_submission(out, sample_files.test_csv)
    np.testing.assert_allclose(read_probs(out), np.tile(CLASS_PRIOR, (40, 1)), atol=1e-9)  # not a blend


def test_blend_members_normalises_huge_and_tiny_weights_safely():
    a = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    b = np.array([[0.2, 0.2, 0.6], [0.1, 0.8, 0.1]])
    for weights, share in (([1e308, 1e308], 0.5), ([1e-320, 1e-320], 0.5), ([3e307, 1e307], 0.75)):
        blended = blend_members([a, b], weights)
        np.testing.assert_allclose(blended.probs, share * a + (1 - share) * b)


def test_a_prior_member_with_nan_probabilities_is_recorded_and_counted(
    tiny_artifacts, sample_files, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    ensemble = write_ensemble(
        tmp_path / "ens",
        [("ft", tiny_artifacts["ft-then-quant"], 0.8)],
        [{"name": "prior", "kind": "prior", "prior": [float("nan"), 0.3, 0.2], "weight": 0.2}],
    )
    out = tmp_path / "submission.csv"
    code = main(
        [
            "predict",
            "--artifact",
            ensemble,
            "--test",
            str(sample_files.test_csv),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    validate_submission(out, sample_files.test_csv)
    report = json.loads(report_path_for(out).read_text())
    prior = next(m for m in report["members"] if m["name"] == "prior")
    assert prior["rows_served"] == 0 and prior["rows_nonfinite"] == 40
    error = next(e for e in report["errors"] if e["where"] == "ensemble member prior")
    assert error["message"] == "prior [nan, 0.3, 0.2] is not finite: left out of the blend of 40 of 40 rows"
    assert code == 1 and "ensemble member prior served none of the 40 rows" in err


def test_an_ensemble_whose_model_member_fails_entirely_exits_1_as_a_single_model_does(
    tiny_artifacts, sample_files, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    ensemble = write_ensemble(
        tmp_path / "ens",
        [("ft", tiny_artifacts["ft-then-quant"], 0.5), ("missing", tmp_path / "no-such-artifact", 0.5)],
    )
    out = tmp_path / "submission.csv"
    argv = [
        "predict",
        "--artifact",
        ensemble,
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
    assert "error (submission written): ensemble member missing served none of the 40 rows" in err
    validate_submission(out, sample_files.test_csv)
    monkeypatch.setenv("KAGGLE_IS_COMPETITION_RERUN", "1")  # the rerun keeps the file and finishes
    assert main(argv) == 0
