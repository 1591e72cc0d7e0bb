"""kernel-metadata.json generation and validation, the kernel-folder builder and the local kernel check."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from kaggle_utils.cli import main as cli
from kaggle_utils.core.config import KaggleConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.kaggle.install_cell import INSTALL_CELL_SOURCE
from kaggle_utils.kaggle.metadata import (
    TRAINING_ORDERINGS,
    dataset_metadata,
    kernel_metadata,
    notebook_kernels,
    submission_metadata,
    validate_dataset_metadata,
    validate_kernel_metadata,
    with_accelerator,
    with_owner,
    write_submission_metadata,
)
from kaggle_utils.kaggle.workflow import build_kernel_folder, check_kernel_folder

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ROOT / "kernel-metadata.json"


def run_cli(argv: list[str], monkeypatch) -> int:
    """The real CLI entry point, with only the kaggle command group registered."""
    monkeypatch.setattr(cli, "COMMAND_GROUPS", ("kaggle",))
    return cli.main(argv)


def write_notebook(path: Path, cells: list[tuple[str, str]]) -> Path:
    """A notebook from (kind, source) pairs; kind "parameters" / "install" is a code cell tagged `parameters`
    /
    `offline-install`."""
    notebook = nbformat.v4.new_notebook()
    for kind, source in cells:
        if kind == "markdown":
            notebook.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            cell = nbformat.v4.new_code_cell(source)
            if kind in ("parameters", "install"):
                cell.metadata["tags"] = ["parameters" if kind == "parameters" else "offline-install"]
            notebook.cells.append(cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, path)
    return path


SUBMISSION_CELLS = [
    ("markdown", "# Submission"),
    (
        "parameters",
        'COMPETITION = "llm-classification-finetuning"\n'
        'ARTIFACT_DATASET = "arena-preference-artifact"\n'
        'WHEELS_DATASET = "kaggle-utils/kaggle-utils-wheels"\n'
        "MAX_ROWS = None\n",
    ),
    ("install", "!pip install -q --no-index --find-links /kaggle/input/kaggle-utils-package kaggle-utils\n"),
    ("code", 'test = "/kaggle/input/competitions/llm-classification-finetuning/test.csv"\nprint(test)\n'),
]


# --------------------------------------------------------------------------- the committed metadata


def test_committed_metadata_is_valid_and_offline():
    metadata = json.loads(TOP_LEVEL.read_text())
    assert validate_kernel_metadata(metadata) == []
    assert metadata["enable_internet"] is False  # explicit: the kaggle CLI defaults it to true
    assert metadata["enable_gpu"] is True and metadata["machine_shape"] == "NvidiaTeslaT4"
    assert metadata["competition_sources"] == ["llm-classification-finetuning"]
    assert metadata["kernel_type"] == "notebook" and metadata["language"] == "python"
    owner = metadata["id"].split("/")[0]
    slugs = {ref.split("/")[1] for ref in metadata["dataset_sources"]}
    assert slugs == {"arena-preference-artifact", "kaggle-utils-wheels", "kaggle-utils-package"}
    assert all(ref.startswith(owner + "/") for ref in metadata["dataset_sources"])
    assert metadata["code_file"] == "notebooks/submission.ipynb"


def test_committed_metadata_matches_the_generator(tmp_path):
    """The reviewed file and the config cannot drift apart: regenerate and compare."""
    committed = json.loads(TOP_LEVEL.read_text())
    owner = committed["id"].split("/")[0]
    assert committed == submission_metadata(KaggleConfig(), owner)
    written = write_submission_metadata(tmp_path / "kernel-metadata.json", KaggleConfig(), owner)
    assert json.loads(written.read_text()) == committed


def test_metadata_command_writes_the_top_level_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "kernel-metadata.json"
    assert run_cli(["kaggle", "metadata", "--owner", "alice", "--out", str(out)], monkeypatch) == 0
    assert json.loads(out.read_text())["id"] == "alice/arena-preference-submission"
    assert run_cli(["kaggle", "metadata", "--out", str(out)], monkeypatch) == 2  # no owner known
    assert "--owner" in capsys.readouterr().err


def test_config_changes_flow_into_the_metadata():
    cfg = KaggleConfig(
        competition="wsdm-cup-multilingual-chatbot-arena", package_dataset=None, is_private=False
    )
    metadata = submission_metadata(cfg, "bob")
    assert metadata["competition_sources"] == ["wsdm-cup-multilingual-chatbot-arena"]
    assert metadata["dataset_sources"] == ["bob/arena-preference-artifact", "bob/kaggle-utils-wheels"]
    assert metadata["is_private"] is False
    assert validate_kernel_metadata(metadata) == []


def test_other_notebooks_get_generated_metadata():
    cfg = KaggleConfig()
    kernels = notebook_kernels(cfg)
    for name in ("train_ft_then_quant", "train_quant_then_ft"):
        metadata = kernel_metadata(kernels[name], cfg, "alice", "train.ipynb")
        assert validate_kernel_metadata(metadata) == []
        assert metadata["enable_gpu"] is True and metadata["enable_internet"] is False
        assert metadata["competition_sources"] == [cfg.competition]
        assert "alice/arena-preference-artifact" not in metadata["dataset_sources"]  # training makes it
    report = kernel_metadata(kernels["cv_report"], cfg, "alice", "cv_report.ipynb")
    assert validate_kernel_metadata(report) == []
    assert report["enable_gpu"] is False and "machine_shape" not in report
    assert report["kernel_sources"] == ["alice/arena-train-ft-then-quant", "alice/arena-train-quant-then-ft"]


def test_both_training_kernels_come_from_the_one_notebook_with_their_ordering():
    kernels = notebook_kernels(KaggleConfig())
    training = {name: kernel for name, kernel in kernels.items() if kernel.notebook == "train"}
    assert {name: (k.slug, dict(k.parameters)) for name, k in training.items()} == {
        "train_ft_then_quant": ("arena-train-ft-then-quant", {"ORDERING": "ft-then-quant"}),
        "train_quant_then_ft": ("arena-train-quant-then-ft", {"ORDERING": "quant-then-ft"}),
    }
    assert kernels["cv_report"].reads_kernels == ("train_ft_then_quant", "train_quant_then_ft")
    from kaggle_utils.variants.registry import ORDERINGS

    assert TRAINING_ORDERINGS == ORDERINGS  # one kernel per ordering the training code knows
    assert not (ROOT / "notebooks" / "train_ft_then_quant.py").exists()  # the two old copies are gone
    assert not (ROOT / "notebooks" / "train_quant_then_ft.ipynb").exists()


# --------------------------------------------------------------------------- validation catches mistakes


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"enable_intenet": False}, "unknown keys ['enable_intenet']"),
        ({"title": "Arena"}, "slugifies to 'arena'"),
        ({"title": "Abc"}, "at least 5 characters"),
        ({"id": "alice"}, "owner/slug"),
        ({"id": "alice/Arena_Submission"}, "lowercase"),
        ({"code_file": "submission.py"}, "needs an .ipynb code_file"),
        ({"enable_internet": "false"}, "'enable_internet' must be true or false"),
        ({"machine_shape": "NvidiaTeslaP100"}, "P100"),
        ({"machine_shape": "TpuV5E8"}, "enable_tpu is not true"),
        ({"machine_shape": "NvidiaA100"}, "not a known accelerator"),
        ({"enable_tpu": True}, "both true"),
        (
            {"model_sources": ["google/gemma-2/transformers/gemma-2-9b-it"]},
            "owner/slug/framework/variation/version",
        ),
        ({"model_sources": ["google/gemma-2/transformers/9b/latest"]}, "must be a number"),
        ({"dataset_sources": "alice/wheels"}, "must be a list of strings"),
        ({"competition_sources": ["LLM Classification"]}, "not a competition slug"),
        ({"language": "r"}, "language must be 'python'"),
        ({"docker_image_pinning_type": "newest"}, "docker_image_pinning_type"),
    ],
)
def test_validation_names_the_problem(change, expected):
    metadata = {**submission_metadata(KaggleConfig(), "alice"), **change}
    problems = validate_kernel_metadata(metadata, "meta.json")
    assert any(expected in problem for problem in problems), problems
    assert all(problem.startswith("meta.json: ") for problem in problems)


def test_required_fields():
    problems = validate_kernel_metadata({}, "meta.json")
    for key in ("id", "title", "code_file", "language", "kernel_type"):
        assert f"meta.json: '{key}' is required" in problems


def test_with_owner_moves_own_sources_only():
    metadata = submission_metadata(KaggleConfig(), "kaggle-utils")
    metadata["dataset_sources"].append("someone/public-wheels")
    moved = with_owner(metadata, "alice")
    assert moved["id"] == "alice/arena-preference-submission"
    assert moved["dataset_sources"] == [
        "alice/arena-preference-artifact",
        "alice/kaggle-utils-wheels",
        "alice/kaggle-utils-package",
        "someone/public-wheels",
    ]
    assert metadata["id"].startswith("kaggle-utils/")  # the input is not modified


def test_with_accelerator():
    metadata = submission_metadata(KaggleConfig(), "alice")
    tpu = with_accelerator(metadata, "TpuV5E8")
    assert (tpu["machine_shape"], tpu["enable_gpu"], tpu["enable_tpu"]) == ("TpuV5E8", False, True)
    assert validate_kernel_metadata(tpu) == []
    with pytest.raises(UsageError, match="--accelerator 'A100'"):
        with_accelerator(metadata, "A100")


def test_dataset_metadata():
    metadata = dataset_metadata("alice", "arena-preference-artifact", existing={"description": "mine"})
    assert metadata == {
        "description": "mine",
        "title": "Arena Preference Artifact",
        "id": "alice/arena-preference-artifact",
        "licenses": [{"name": "CC0-1.0"}],
    }
    assert validate_dataset_metadata(metadata) == []
    bad = {"id": "alice/abc", "title": "Abc", "licenses": []}
    problems = " | ".join(validate_dataset_metadata(bad))
    assert "slug 'abc'" in problems and "title 'Abc'" in problems and "exactly one" in problems


# --------------------------------------------------------------------------- kernel folders and the check


def test_build_submission_folder_from_top_level_metadata(tmp_path):
    notebook = write_notebook(tmp_path / "nb" / "submission.ipynb", SUBMISSION_CELLS)
    cfg = KaggleConfig(build_dir=str(tmp_path / "build"))
    folder = build_kernel_folder(notebook, cfg, owner="alice", submission_metadata_path=TOP_LEVEL)
    assert folder == tmp_path / "build" / "kernels" / "arena-preference-submission"
    metadata = json.loads((folder / "kernel-metadata.json").read_text())
    assert metadata["id"] == "alice/arena-preference-submission"
    assert metadata["code_file"] == "submission.ipynb"
    assert "alice/kaggle-utils-wheels" in metadata["dataset_sources"]
    check = check_kernel_folder(folder)
    assert check.ok, check.summary()
    found = {(ref.kind, ref.ref) for ref in check.inputs}
    assert (
        found
        == {  # the `!pip` line naming kaggle-utils-package was replaced by the canonical install cell
            ("competition", "llm-classification-finetuning"),
            ("dataset", "arena-preference-artifact"),
            ("dataset", "kaggle-utils/kaggle-utils-wheels"),
        }
    )
    built = nbformat.read(folder / "submission.ipynb", as_version=4)
    assert (
        built.cells[2].metadata["tags"] == ["offline-install"]
        and built.cells[2].source == INSTALL_CELL_SOURCE
    )


def test_build_refuses_a_notebook_without_the_install_cell(tmp_path):
    cells = [cell for cell in SUBMISSION_CELLS if cell[0] != "install"]
    notebook = write_notebook(tmp_path / "nb" / "submission.ipynb", cells)
    cfg = KaggleConfig(build_dir=str(tmp_path / "build"))
    with pytest.raises(
        UsageError, match="submission.ipynb: needs exactly one code cell tagged 'offline-install', found 0"
    ):
        build_kernel_folder(notebook, cfg, owner="alice", submission_metadata_path=TOP_LEVEL)


def test_sync_install_cell_rewrites_every_copy_from_the_template(tmp_path, monkeypatch, capsys):
    """After the template changes, one command rewrites the cell in each script and notebook, pairs kept
    equal."""
    import jupytext

    from kaggle_utils.kaggle import install_cell

    for name in ("train", "cv_report", "submission"):
        for suffix in (".py", ".ipynb"):
            (tmp_path / f"{name}{suffix}").write_bytes((ROOT / "notebooks" / f"{name}{suffix}").read_bytes())
    assert all(install_cell.install_cell_problem(path) is None for path in tmp_path.iterdir())
    edited = install_cell.INSTALL_CELL_SOURCE.replace("--no-index", "--no-index --no-cache-dir")
    monkeypatch.setattr(install_cell, "INSTALL_CELL_SOURCE", edited)
    assert "differs from the template" in install_cell.install_cell_problem(tmp_path / "train.py")
    assert run_cli(["kaggle", "sync-install-cell", "--notebooks", str(tmp_path)], monkeypatch) == 0
    assert "rewrote 6 files" in capsys.readouterr().out
    for name in ("train", "cv_report", "submission"):
        script = jupytext.read(tmp_path / f"{name}.py")
        notebook = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
        assert [c.source for c in script.cells] == [c.source for c in notebook.cells]
        assert install_cell.install_cell_problem(tmp_path / f"{name}.py") is None
    assert run_cli(["kaggle", "sync-install-cell", "--notebooks", str(tmp_path)], monkeypatch) == 0
    assert "rewrote 0 files" in capsys.readouterr().out
    (tmp_path / "scratch.py").write_text("# %%\nprint(1)\n")
    assert run_cli(["kaggle", "sync-install-cell", "--notebooks", str(tmp_path)], monkeypatch) == 2
    assert (
        "scratch.py: needs exactly one code cell tagged 'offline-install', found 0" in capsys.readouterr().err
    )


def test_build_from_jupytext_script_with_accelerator(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "# %% [markdown]\n# Train\n\n"
        '# %% tags=["parameters"]\nORDERING = "quant-then-ft"\n'
        'TRAIN_CSV = "/kaggle/input/llm-classification-finetuning/train.csv"\n\n'
        '# %% tags=["offline-install"]\npass\n\n'
        "# %%\nprint(TRAIN_CSV)\n"
    )
    cfg = KaggleConfig(build_dir=str(tmp_path / "build"))
    folder = build_kernel_folder(
        script, cfg, owner="alice", accelerator="NvidiaL4", parameters={"ORDERING": "ft-then-quant"}
    )
    assert folder.name == "arena-train-ft-then-quant"
    notebook = nbformat.read(folder / "train.ipynb", as_version=4)
    assert [cell.cell_type for cell in notebook.cells] == ["markdown", "code", "code", "code", "code"]
    assert notebook.cells[3].source == INSTALL_CELL_SOURCE
    assert notebook.cells[1].metadata["tags"] == ["parameters"]
    assert 'ORDERING = "ft-then-quant"' in notebook.cells[2].source  # the injected parameters
    metadata = json.loads((folder / "kernel-metadata.json").read_text())
    assert metadata["machine_shape"] == "NvidiaL4" and metadata["enable_gpu"] is True
    assert metadata["id"] == "alice/arena-train-ft-then-quant"
    assert check_kernel_folder(folder).ok


def test_training_notebook_needs_a_valid_ordering_to_pick_its_kernel(tmp_path):
    notebook = ROOT / "notebooks" / "train.ipynb"
    cfg = KaggleConfig(build_dir=str(tmp_path))
    with pytest.raises(
        UsageError,
        match="one kernel per ORDERING: pass -p ORDERING=ft-then-quant or -p ORDERING=quant-then-ft",
    ):
        build_kernel_folder(notebook, cfg, owner="alice")
    with pytest.raises(
        UsageError, match="ORDERING='ft-then-qaunt' is not one of \\['ft-then-quant', 'quant-then-ft'\\]"
    ):
        build_kernel_folder(notebook, cfg, owner="alice", parameters={"ORDERING": "ft-then-qaunt"})
    for ordering in ("ft-then-quant", "quant-then-ft"):
        folder = build_kernel_folder(notebook, cfg, owner="alice", parameters={"ORDERING": ordering})
        assert folder.name == f"arena-train-{ordering}"
        assert (
            json.loads((folder / "kernel-metadata.json").read_text())["id"] == f"alice/arena-train-{ordering}"
        )
        built = nbformat.read(folder / "train.ipynb", as_version=4)
        injected = next(c for c in built.cells if "injected-parameters" in c.metadata.get("tags", []))
        assert f'ORDERING = "{ordering}"' in injected.source


def test_unknown_notebook_is_refused(tmp_path):
    notebook = write_notebook(tmp_path / "scratch.ipynb", [("install", "print(1)")])
    with pytest.raises(UsageError, match="not one of the project's notebooks"):
        build_kernel_folder(notebook, KaggleConfig(build_dir=str(tmp_path)), owner="alice")


def make_folder(tmp_path: Path, cells, **metadata_changes) -> Path:
    folder = tmp_path / "kernel"
    write_notebook(folder / "submission.ipynb", cells)
    metadata = {**submission_metadata(KaggleConfig(), "alice"), "code_file": "submission.ipynb"}
    metadata.update(metadata_changes)
    metadata = {key: value for key, value in metadata.items() if value is not None}
    (folder / "kernel-metadata.json").write_text(json.dumps(metadata))
    return folder


def test_check_flags_an_input_no_source_provides(tmp_path):
    cells = [*SUBMISSION_CELLS, ("code", 'model = "/kaggle/input/gemma-2-9b-it-bnb/model"\n')]
    check = check_kernel_folder(make_folder(tmp_path, cells))
    assert not check.ok
    assert any("reads any 'gemma-2-9b-it-bnb'" in problem for problem in check.problems), check.problems


def test_check_flags_a_parameter_dataset_not_attached(tmp_path):
    cells = [("parameters", 'EXTRA_DATASET = "alice/lmsys-33k-deduplicated"\n'), *SUBMISSION_CELLS[2:]]
    check = check_kernel_folder(make_folder(tmp_path, cells))
    assert any("parameters cell: EXTRA_DATASET" in problem for problem in check.problems), check.problems


def test_check_flags_internet_on_or_missing_for_a_competition_kernel(tmp_path):
    check = check_kernel_folder(make_folder(tmp_path, SUBMISSION_CELLS, enable_internet=True))
    assert any("enable_internet must be false" in problem for problem in check.problems)
    check = check_kernel_folder(make_folder(tmp_path, SUBMISSION_CELLS, enable_internet=None))
    assert any("defaults it to true" in problem for problem in check.problems)


def test_check_flags_missing_code_file_and_syntax_errors(tmp_path):
    folder = make_folder(tmp_path, SUBMISSION_CELLS, code_file="other.ipynb")
    assert any("other.ipynb does not exist" in problem for problem in check_kernel_folder(folder).problems)
    folder = make_folder(tmp_path, [*SUBMISSION_CELLS, ("code", "def broken(:\n")])
    assert any("cell 5: syntax error" in problem for problem in check_kernel_folder(folder).problems)
    assert (
        check_kernel_folder(tmp_path / "nowhere").problems[0].endswith("kernel-metadata.json: file not found")
    )


def test_check_kernel_command_exit_codes(tmp_path, monkeypatch, capsys):
    good = make_folder(tmp_path / "good", SUBMISSION_CELLS)
    assert run_cli(["kaggle", "check-kernel", str(good)], monkeypatch) == 0
    assert "OK" in capsys.readouterr().out
    bad = make_folder(tmp_path / "bad", SUBMISSION_CELLS, machine_shape="NvidiaTeslaP100")
    assert run_cli(["kaggle", "check-kernel", str(bad)], monkeypatch) == 1
    assert "P100" in capsys.readouterr().out


def test_repository_root_is_a_valid_kernel_folder_once_the_notebook_exists():
    """`kaggle kernels push -p .` from the root must pass the same check (needs
    notebooks/submission.ipynb)."""
    if not (ROOT / "notebooks" / "submission.ipynb").is_file():
        pytest.skip("notebooks/submission.ipynb is not written yet (inference issue)")
    check = check_kernel_folder(ROOT)
    assert check.ok, check.summary()


def test_parameters_are_injected_and_checked(tmp_path, monkeypatch, capsys):
    from kaggle_utils.kaggle.workflow import parse_parameters

    notebook = ROOT / "notebooks" / "train.ipynb"
    parameters = parse_parameters(
        [
            "ORDERING=quant-then-ft",
            "BASE_MODEL_PATH=/kaggle/input/gemma-2/transformers/gemma-2-9b-it/2",
            "CV_FOLDS=[0, 1]",
        ]
    )
    assert parameters == {
        "ORDERING": "quant-then-ft",
        "BASE_MODEL_PATH": "/kaggle/input/gemma-2/transformers/gemma-2-9b-it/2",
        "CV_FOLDS": [0, 1],
    }
    source = "google/gemma-2/transformers/gemma-2-9b-it/2"
    cfg = KaggleConfig(build_dir=str(tmp_path / "with"), base_model_source=source)
    folder = build_kernel_folder(notebook, cfg, owner="alice", parameters=parameters)
    built = nbformat.read(folder / "train.ipynb", as_version=4)
    tags = [cell.metadata.get("tags", []) for cell in built.cells]
    injected = built.cells[tags.index(["injected-parameters"])]
    assert tags.index(["injected-parameters"]) == tags.index(["parameters"]) + 1
    assert "CV_FOLDS = [0, 1]" in injected.source
    check = check_kernel_folder(folder)
    assert check.ok, check.summary()
    assert ("any", "gemma-2") in {(ref.kind, ref.ref) for ref in check.inputs}
    # The same parameter without the model attached: the check names the missing source.
    folder = build_kernel_folder(
        notebook, KaggleConfig(build_dir=str(tmp_path / "without")), "alice", parameters=parameters
    )
    assert any("'gemma-2'" in problem for problem in check_kernel_folder(folder).problems)
    with pytest.raises(UsageError, match="no parameters \\['BASE_MODEL'\\]"):
        build_kernel_folder(
            notebook, cfg, "alice", parameters={"ORDERING": "quant-then-ft", "BASE_MODEL": "x"}
        )
    with pytest.raises(UsageError, match="expected NAME=VALUE"):
        parse_parameters(["CV_FOLDS"])
    # Through the CLI: a dry run builds and checks without credentials when the owner is given.
    argv = [
        "kaggle",
        "push",
        str(notebook),
        "--dry-run",
        "--owner",
        "alice",
        "-p",
        "ORDERING=quant-then-ft",
        "-p",
        "SEEDS=[1, 2]",
    ]
    config = tmp_path / "config.yaml"
    config.write_text(f"kaggle:\n  build_dir: {tmp_path / 'cli'}\n")
    assert run_cli([*argv, "--config", str(config)], monkeypatch) == 0
    assert "OK" in capsys.readouterr().out
    built = nbformat.read(tmp_path / "cli" / "kernels" / "arena-train-quant-then-ft" / "train.ipynb", 4)
    assert any("SEEDS = [1, 2]" in cell.source for cell in built.cells)


def test_install_cell_installs_from_every_attached_wheel_folder(tmp_path, monkeypatch):
    """The template run as Kaggle runs it, with /kaggle/input pointed at a folder: one --find-links per wheel
    folder (both mount layouts), each requirements.txt, then kaggle_utils; a clear error without its wheel."""
    import importlib.util
    import subprocess

    root = tmp_path / "input"
    wheels = root / "kaggle-utils-wheels"
    package = root / "datasets" / "alice" / "kaggle-utils-package"
    for folder, wheel in (
        (wheels, "peft-0.13.2-py3-none-any.whl"),
        (package, "kaggle_utils-0.1.0-py3-none-any.whl"),
    ):
        folder.mkdir(parents=True)
        (folder / wheel).write_bytes(b"")
    (wheels / "requirements.txt").write_text("peft==0.13.2\n")
    (root / "llm-classification-finetuning").mkdir()  # other inputs are not wheel folders
    source = INSTALL_CELL_SOURCE.replace("/kaggle/input", str(root))
    calls = []
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "kaggle_utils" else object()
    )
    monkeypatch.setattr(subprocess, "run", lambda command, check: calls.append(command))
    exec(compile(source, "install-cell", "exec"), {})
    ((_, *args),) = calls
    assert args == [
        "-m",
        "pip",
        "install",
        "--no-index",
        "--find-links",
        str(package),
        "--find-links",
        str(wheels),
        "-r",
        str(wheels / "requirements.txt"),
        "kaggle_utils",
    ]
    (package / "kaggle_utils-0.1.0-py3-none-any.whl").unlink()
    with pytest.raises(
        RuntimeError, match="no kaggle_utils-\\*.whl is under .*: attach the datasets made by"
    ):
        exec(compile(source, "install-cell", "exec"), {})
