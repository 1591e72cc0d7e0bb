"""What ships: the chosen candidate written as something `predict` runs (self-contained, with the fallback
baseline inside), and the CV figure is what `predict` then does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import CLASS_PRIOR, build_tiny_artifacts, overconfident_rows, predict_cfg, read_probs

from kaggle_utils.evaluate.calibration import apply_calibration
from kaggle_utils.evaluate.candidates import build_candidates, decide_ship
from kaggle_utils.evaluate.ship import write_shipped
from kaggle_utils.inference import predictor as inference
from kaggle_utils.inference.ensemble import ensemble_members

PRIOR = np.array(CLASS_PRIOR)


def test_the_shipped_calibrated_model_predicts_what_its_cv_scored(tmp_path, demo_tokenizer, sample_files):
    """Ship a calibrated model as an ensemble folder; predict on the test file gives exactly the calibrated
    version of the plain model's predictions (the post-processing CV scored is the one predict applies)."""
    torch.set_num_threads(1)
    artifacts = build_tiny_artifacts(tmp_path / "artifacts", demo_tokenizer)
    labels, sharp, _, groups = overconfident_rows(n=300)
    candidates = build_candidates(
        labels,
        groups,
        {"ftq": (sharp, artifacts["ft-then-quant"])},
        prior_probs=np.tile(PRIOR, (len(labels), 1)),
        prior=PRIOR,
        blend=False,
    )
    decision = decide_ship(labels, [c for c in candidates if c.kind == "calibrated"])
    shipped = write_shipped(decision, tmp_path / "shipped", class_prior=PRIOR, dialect="lmsys")
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert manifest["kind"] == "ensemble" and manifest["calibration"]["method"] == "temperature"

    plain = tmp_path / "plain.csv"
    inference.predict(artifacts["ft-then-quant"], sample_files.test_csv, plain, predict_cfg())
    out = tmp_path / "submission.csv"
    report = inference.predict(shipped, sample_files.test_csv, out, predict_cfg())
    assert report.fallback_rows == 0
    np.testing.assert_allclose(
        read_probs(out), apply_calibration(read_probs(plain), manifest["calibration"]), atol=1e-6
    )


def test_a_plain_model_ships_as_its_own_artifact(tmp_path):
    labels, _, true, groups = overconfident_rows(n=200)
    candidates = build_candidates(
        labels,
        groups,
        {"m": (true, tmp_path / "m")},
        prior_probs=np.tile(PRIOR, (len(labels), 1)),
        prior=PRIOR,
        calibrate=False,
        blend=False,
    )
    decision = decide_ship(labels, candidates)
    assert decision.best.name == "m"
    assert write_shipped(decision, tmp_path / "out", class_prior=PRIOR, dialect="lmsys") == tmp_path / "m"


def test_tta_space_is_a_candidate_and_ships_through_the_ensemble_member(
    tmp_path, demo_tokenizer, sample_files
):
    """The logit-space TTA candidate is scored on the views' OOF; shipped, predict combines the member's views
    in logit space, exactly as its manifest saying tta_space=logit would."""
    torch.set_num_threads(1)
    artifacts = build_tiny_artifacts(tmp_path / "artifacts", demo_tokenizer)
    labels, sharp, _, groups = overconfident_rows(n=300)
    swapped_view = sharp[:, [1, 0, 2]] ** 0.5
    swapped_view /= swapped_view.sum(axis=1, keepdims=True)
    views = np.stack([sharp, swapped_view])
    candidates = build_candidates(
        labels,
        groups,
        {"ftq": (sharp, artifacts["ft-then-quant"])},
        prior_probs=np.tile(PRIOR, (len(labels), 1)),
        prior=PRIOR,
        calibrate=False,
        blend=False,
        tta_views={"ftq": views},
    )
    logit = next(c for c in candidates if c.name == "ftq+logit-tta")
    decision = decide_ship(labels, [logit])
    shipped = write_shipped(decision, tmp_path / "shipped", class_prior=PRIOR, dialect="lmsys")
    assert shipped != artifacts["ft-then-quant"]  # not the plain artifact: its manifest says prob space

    reference = tmp_path / "reference"
    import shutil

    shutil.copytree(artifacts["ft-then-quant"], reference)
    manifest_path = reference / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "tta_space": "logit"}))
    inference.predict(reference, sample_files.test_csv, tmp_path / "logit.csv", predict_cfg())
    inference.predict(artifacts["ft-then-quant"], sample_files.test_csv, tmp_path / "prob.csv", predict_cfg())
    inference.predict(shipped, sample_files.test_csv, tmp_path / "shipped.csv", predict_cfg())
    np.testing.assert_allclose(
        read_probs(tmp_path / "shipped.csv"), read_probs(tmp_path / "logit.csv"), atol=1e-6
    )
    assert not np.allclose(read_probs(tmp_path / "logit.csv"), read_probs(tmp_path / "prob.csv"), atol=1e-4)


def test_a_blend_of_plain_and_logit_tta_members_is_a_valid_ensemble(tmp_path):
    """Both TTA spaces of one model in a blend: distinct member names (predict keys members by name)."""
    from builders import make_artifact

    make_artifact(tmp_path / "m")  # write_shipped copies the member in: a stand-in artifact (never loaded)
    labels, sharp, _, groups = overconfident_rows(n=300)
    views = np.stack(
        [sharp, sharp[:, [1, 0, 2]] ** 0.5 / (sharp[:, [1, 0, 2]] ** 0.5).sum(axis=1, keepdims=True)]
    )
    candidates = build_candidates(
        labels,
        groups,
        {"m": (sharp, tmp_path / "m")},
        prior_probs=np.tile(PRIOR, (len(labels), 1)),
        prior=PRIOR,
        calibrate=False,
        tta_views={"m": views},
    )
    blend = next(c for c in candidates if c.name == "blend")
    shipped = write_shipped(
        decide_ship(labels, [blend]), tmp_path / "shipped", class_prior=PRIOR, dialect="lmsys"
    )
    manifest = json.loads((shipped / "manifest.json").read_text())
    members = ensemble_members(shipped, manifest)  # raises on repeated names
    assert len({m.name for m in members}) == len(members)


def test_seed_ensemble_averages_aligned_rows_and_ships_every_seed():
    from kaggle_utils.evaluate.ship import ShippedRun, seed_ensemble

    labels = np.array([0, 1, 2])
    a = ShippedRun(
        "v",
        [1, 2, 3],
        labels,
        np.array([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]]),
        np.tile(PRIOR, (3, 1)),
        ["s1/fold0"],
    )
    b = ShippedRun(
        "v",
        [3, 1, 2],
        labels[[2, 0, 1]],
        np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        np.tile(PRIOR, (3, 1)),
        ["s2/fold0"],
    )
    both = seed_ensemble([a, b], "v/seed-ensemble")
    np.testing.assert_allclose(both.probs[0], [0.8, 0.1, 0.1])  # id 1 in both, rows matched by id
    assert both.artifact_dirs == ["s1/fold0", "s2/fold0"] and both.ids == [1, 2, 3]


def _emulated_kaggle_input(root, shipped, name: str, sample_files):
    """`root` laid out as /kaggle/input: the shipped folder as dataset `name` beside the competition files."""
    import shutil

    shutil.copytree(shipped, root / name)
    (root / "competition").mkdir()
    shutil.copy(sample_files.test_csv, root / "competition" / "test.csv")
    shutil.copy(sample_files.sample_submission_csv, root / "competition" / "sample_submission.csv")
    return root


def _blend_of(members: list[dict], n: int = 30) -> tuple[np.ndarray, object]:
    """A one-candidate decision shipping `members` (the OOF numbers do not matter to what is written)."""
    from kaggle_utils.evaluate.candidates import Candidate

    labels = np.arange(n) % 3
    blend = Candidate(
        name="blend",
        kind="blend",
        probs=np.tile(PRIOR, (n, 1)),
        members=members,
        calibration={"method": "temperature", "temperature": 1.5, "bias": [0.0, 0.0, 0.0]},
    )
    return labels, decide_ship(labels, [blend])


def test_a_shipped_ensemble_is_self_contained_and_predicts_the_same_numbers_when_moved(
    tmp_path, demo_tokenizer, sample_files
):
    """The members are copied into the ensemble folder and named by paths relative to it, every file listed
    with its sha256: moved elsewhere, with the run folder it came from gone, it predicts the same numbers."""
    import shutil

    from kaggle_utils.core.fileio import file_sha256

    torch.set_num_threads(1)
    artifacts = build_tiny_artifacts(tmp_path / "runs", demo_tokenizer)
    _, decision = _blend_of(
        [
            {"name": "ftq/fold0", "kind": "model", "path": str(artifacts["ft-then-quant"]), "weight": 0.6},
            {"name": "qft/fold0", "kind": "model", "path": str(artifacts["quant-then-ft"]), "weight": 0.3},
            {"name": "class-prior", "kind": "prior", "prior": [float(v) for v in PRIOR], "weight": 0.1},
        ]
    )
    shipped = write_shipped(decision, tmp_path / "orderings" / "shipped", class_prior=PRIOR, dialect="lmsys")
    manifest = json.loads((shipped / "manifest.json").read_text())
    paths = [m["path"] for m in manifest["members"] if m.get("path")]
    assert paths == ["members/ftq_fold0", "members/qft_fold0"]
    on_disk = {p.relative_to(shipped).as_posix() for p in shipped.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    assert "members/ftq_fold0/manifest.json" in manifest["files"]
    for relative, info in manifest["files"].items():
        assert file_sha256(shipped / relative) == info["sha256"], relative

    here = inference.predict(shipped, sample_files.test_csv, tmp_path / "here.csv", predict_cfg())
    assert here.fallback_rows == 0
    shutil.move(tmp_path / "runs", tmp_path / "runs-gone")  # the run folder the members came from
    moved = tmp_path / "kaggle" / "input" / "arena-ensemble"
    shutil.move(shipped, moved)
    there = inference.predict(moved, sample_files.test_csv, tmp_path / "there.csv", predict_cfg())
    assert there.fallback_rows == 0 and there.rows_by_path["all_members"] == there.rows
    np.testing.assert_array_equal(read_probs(tmp_path / "there.csv"), read_probs(tmp_path / "here.csv"))


def test_shipping_into_a_member_is_refused_before_anything_is_written(tmp_path):
    from builders import make_artifact

    from kaggle_utils.core.errors import UsageError

    member = make_artifact(tmp_path / "runs" / "fold0" / "artifact")
    before = sorted(p.relative_to(member).as_posix() for p in member.rglob("*"))
    _, decision = _blend_of(
        [
            {"name": "m", "kind": "model", "path": str(member), "weight": 1.0},
            {"name": "class-prior", "kind": "prior", "prior": [0.4, 0.4, 0.2], "weight": 1.0},
        ]
    )
    with pytest.raises(UsageError, match=r"refusing to write .*shipped: it is inside the ensemble member "):
        write_shipped(decision, member / "shipped", class_prior=PRIOR, dialect="lmsys")
    with pytest.raises(UsageError, match=r"refusing to write .*runs: it contains the ensemble member "):
        write_shipped(decision, tmp_path / "runs", class_prior=PRIOR, dialect="lmsys")
    assert sorted(p.relative_to(member).as_posix() for p in member.rglob("*")) == before


def test_the_fallback_baseline_travels_inside_the_shipped_artifact(
    tmp_path, demo_tokenizer, sample_files, train_data
):
    """The feature baseline ships as `baseline.json` (+ its sha256 manifest) inside what `write_shipped`
    writes, ensemble or plain model alike, where `find_inputs` looks: on an emulated /kaggle/input the
    submission's fallback is the baseline model, not the class prior."""

    from kaggle_utils.core.config import BaselineConfig, FoldConfig
    from kaggle_utils.data.folds import make_folds
    from kaggle_utils.inference.inputs import find_inputs
    from kaggle_utils.quant.manifest import read_manifest
    from kaggle_utils.train.baseline import BaselineModel, run_baseline_cv

    torch.set_num_threads(1)
    frame = train_data.frame
    fitted = run_baseline_cv(
        frame, make_folds(frame, FoldConfig(n_folds=3, seed=0)), BaselineConfig(model="logreg")
    )
    baseline = fitted.model.save(tmp_path / "runs" / "baseline_model.json")
    artifacts = build_tiny_artifacts(tmp_path / "runs", demo_tokenizer)

    _, decision = _blend_of(
        [
            {"name": "ftq", "kind": "model", "path": str(artifacts["ft-then-quant"]), "weight": 0.7},
            {"name": "feature-baseline", "kind": "baseline", "path": str(baseline), "weight": 0.3},
        ]
    )
    shipped = write_shipped(
        decision, tmp_path / "ens" / "shipped", class_prior=PRIOR, dialect="lmsys", baseline=baseline
    )
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert [m["path"] for m in manifest["members"]] == ["members/ftq", "baseline.json"]  # one copy, both uses
    assert {"baseline.json", "baseline.json.manifest.json"} <= set(manifest["files"])
    expected = fitted.model.predict_proba(frame.head(20))
    np.testing.assert_array_equal(
        BaselineModel.load(shipped / "baseline.json").predict_proba(frame.head(20)), expected
    )

    root = _emulated_kaggle_input(tmp_path / "input", shipped, "arena-ensemble", sample_files)
    found = find_inputs(root)
    assert found.artifact_dir == root / "arena-ensemble"
    assert found.baseline_path == root / "arena-ensemble" / "baseline.json"
    report = inference.run_submission(
        root, out_path=tmp_path / "submission.csv", cfg=predict_cfg(), fail_on_fallback=False
    )
    assert report.fallback_source == f"baseline model {root / 'arena-ensemble' / 'baseline.json'}"
    assert report.fallback_rows == 0 and not report.errors

    plain = decide_ship(
        np.arange(30) % 3,
        build_candidates(
            np.arange(30) % 3,
            np.arange(30),
            {"ftq": (np.tile(PRIOR, (30, 1)), artifacts["ft-then-quant"])},
            prior_probs=np.tile(PRIOR, (30, 1)),
            prior=PRIOR,
            calibrate=False,
            blend=False,
        )[:1],
    )
    assert plain.best.name == "ftq"
    copy = write_shipped(
        plain, tmp_path / "plain" / "shipped", class_prior=PRIOR, dialect="lmsys", baseline=baseline
    )
    assert copy == tmp_path / "plain" / "shipped"  # the model's folder itself stays as trained
    listed = read_manifest(copy, verify_hashes=True)["files"]
    assert {"baseline.json", "baseline.json.manifest.json"} <= set(listed)
    assert (
        "baseline.json" not in json.loads((artifacts["ft-then-quant"] / "manifest.json").read_text())["files"]
    )
    inference.predict(artifacts["ft-then-quant"], sample_files.test_csv, tmp_path / "a.csv", predict_cfg())
    inference.predict(copy, sample_files.test_csv, tmp_path / "b.csv", predict_cfg())
    np.testing.assert_array_equal(read_probs(tmp_path / "b.csv"), read_probs(tmp_path / "a.csv"))


def test_a_class_prior_winner_ships_as_an_ensemble_with_no_member_files(tmp_path):
    """Small data can make the class prior the best thing to ship: an ensemble folder whose file table is
    empty (nothing on disk to copy), which loads and uploads as its manifest alone."""
    from kaggle_utils.kaggle.upload import plan_upload

    _, decision = _blend_of(
        [{"name": "class-prior", "kind": "prior", "prior": [0.4, 0.4, 0.2], "weight": 1.0}]
    )
    shipped = write_shipped(decision, tmp_path / "shipped", class_prior=PRIOR, dialect="lmsys")
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert manifest["files"] == {}
    assert [m.kind for m in ensemble_members(shipped, manifest)] == ["prior"]
    assert list(plan_upload(shipped).files) == ["manifest.json"]


def test_shipping_again_replaces_the_previous_shipped_folder_but_nothing_else(tmp_path):
    """A rerun replaces what an earlier ship wrote (its manifest says so); a folder holding anything else is
    refused and left as it was."""
    from builders import make_artifact

    from kaggle_utils.core.errors import UsageError

    first, second = make_artifact(tmp_path / "runs" / "a"), make_artifact(tmp_path / "runs" / "b")
    prior = {"name": "class-prior", "kind": "prior", "prior": [0.4, 0.4, 0.2], "weight": 1.0}
    out = tmp_path / "orderings" / "shipped"
    write_shipped(
        _blend_of([{"name": "a", "kind": "model", "path": str(first), "weight": 1.0}, prior])[1],
        out,
        class_prior=PRIOR,
        dialect="lmsys",
    )
    write_shipped(
        _blend_of([{"name": "b", "kind": "model", "path": str(second), "weight": 1.0}, prior])[1],
        out,
        class_prior=PRIOR,
        dialect="lmsys",
    )
    assert sorted(p.name for p in (out / "members").iterdir()) == ["b"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".shipped.")]  # no staging left behind

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    with pytest.raises(
        UsageError,
        match=r"refusing to replace .*notes: it is not a shipped artifact \(no "
        r"manifest.json\)",
    ):
        write_shipped(_blend_of([prior])[1], notes, class_prior=PRIOR, dialect="lmsys")
    assert [p.name for p in notes.iterdir()] == ["keep.txt"]


def test_the_ship_command_puts_the_baseline_inside_a_fold_artifact_and_leaves_the_artifact_alone(
    tmp_path, demo_tokenizer, sample_files, train_data, capsys
):
    """The documented Kaggle flow uploads a training kernel's fold artifact: `ship --artifact A --baseline B
    --out S` makes S (A plus baseline.json) so the fallback on Kaggle is the baseline, not the class prior."""

    from kaggle_utils.cli.main import main
    from kaggle_utils.core.config import BaselineConfig, FoldConfig
    from kaggle_utils.core.fileio import file_sha256
    from kaggle_utils.data.folds import make_folds
    from kaggle_utils.inference.inputs import find_inputs
    from kaggle_utils.kaggle.upload import plan_upload
    from kaggle_utils.quant.manifest import read_manifest
    from kaggle_utils.train.baseline import run_baseline_cv

    torch.set_num_threads(1)
    frame = train_data.frame
    fitted = run_baseline_cv(
        frame, make_folds(frame, FoldConfig(n_folds=3, seed=0)), BaselineConfig(model="logreg")
    )
    baseline = fitted.model.save(tmp_path / "runs" / "baseline_model.json")
    artifact = build_tiny_artifacts(tmp_path / "runs", demo_tokenizer)["ft-then-quant"]
    before = {p.relative_to(artifact): file_sha256(p) for p in artifact.rglob("*") if p.is_file()}

    for out, relation in (
        (artifact / "shipped", "is inside the artifact"),
        (artifact.parent, "contains the artifact"),
        (baseline, "is the fallback baseline"),
    ):
        assert (
            main(["ship", "--artifact", str(artifact), "--baseline", str(baseline), "--out", str(out)]) == 2
        )
        assert f"refusing to write {out}: it {relation}" in capsys.readouterr().err
    shipped = tmp_path / "shipped"
    assert (
        main(["ship", "--artifact", str(artifact), "--baseline", str(baseline), "--out", str(shipped)]) == 0
    )
    assert {p.relative_to(artifact): file_sha256(p) for p in artifact.rglob("*") if p.is_file()} == before
    manifest = read_manifest(shipped, verify_hashes=True)
    assert manifest["fallback_baseline"] == "baseline.json"
    assert {"baseline.json", "baseline.json.manifest.json"} <= set(plan_upload(shipped).files)

    root = _emulated_kaggle_input(tmp_path / "input", shipped, "arena-artifact", sample_files)
    found = find_inputs(root)
    assert found.artifact_dir == root / "arena-artifact"
    assert found.baseline_path == root / "arena-artifact" / "baseline.json"

    ensemble = tmp_path / "ensemble"
    ensemble.mkdir()
    (ensemble / "manifest.json").write_text(json.dumps({"kind": "ensemble", "members": []}))
    assert (
        main(["ship", "--artifact", str(ensemble), "--baseline", str(baseline), "--out", str(tmp_path / "o")])
        == 2
    )
    assert f"{ensemble} is an ensemble: it carries its fallback baseline" in capsys.readouterr().err

    (tmp_path / "damaged.json").write_bytes(baseline.read_bytes() + b" ")
    assert (
        main(
            [
                "ship",
                "--artifact",
                str(artifact),
                "--baseline",
                str(tmp_path / "damaged.json"),
                "--out",
                str(tmp_path / "other"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "other").exists()
