"""Runtime detection: device kind, replicas and compute dtype from a fake hardware probe, config overrides."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kaggle_utils.core import environment
from kaggle_utils.core.config import InferenceConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.inference import inputs
from kaggle_utils.models import runtime as rt


def _gpu(index: int, capability: tuple[int, int], name: str = "Tesla T4") -> rt.GpuInfo:
    return rt.GpuInfo(index, name, capability, 15.0, rt.native_bf16_for(capability))


T4X2 = rt.HardwareProbe(gpus=(_gpu(0, (7, 5)), _gpu(1, (7, 5))))
A100 = rt.HardwareProbe(gpus=(_gpu(0, (8, 0), "A100"),))
TPU = rt.HardwareProbe(tpu_available=True)
CPU = rt.HardwareProbe()


def test_two_t4_give_two_replicas_in_fp16_because_no_native_bf16():
    runtime = rt.detect_runtime(InferenceConfig(), probe=T4X2)
    assert runtime.kind == "cuda"
    assert runtime.devices == ("cuda:0", "cuda:1")
    assert runtime.compute_dtype == torch.float16
    assert "7.5" in runtime.describe()
    assert runtime.to_dict()["compute_dtype"] == "float16"


def test_ampere_gets_bf16_tpu_bf16_cpu_fp32():
    assert rt.detect_runtime(probe=A100).compute_dtype == torch.bfloat16
    tpu = rt.detect_runtime(probe=TPU)
    assert (tpu.kind, tpu.devices, tpu.compute_dtype) == ("tpu", ("xla",), torch.bfloat16)
    cpu = rt.detect_runtime(probe=CPU)
    assert (cpu.kind, cpu.devices, cpu.compute_dtype) == ("cpu", ("cpu",), torch.float32)


def test_mixed_gpus_use_fp16_when_any_lacks_native_bf16():
    mixed = rt.HardwareProbe(gpus=(_gpu(0, (8, 6), "A10"), _gpu(1, (7, 5))))
    assert rt.detect_runtime(probe=mixed).compute_dtype == torch.float16
    assert rt.detect_runtime(InferenceConfig(num_gpus=1), probe=mixed).compute_dtype == torch.bfloat16


def test_config_overrides_every_choice():
    assert rt.detect_runtime(InferenceConfig(device="cpu"), probe=T4X2).devices == ("cpu",)
    assert rt.detect_runtime(InferenceConfig(num_gpus=1), probe=T4X2).devices == ("cuda:0",)
    forced = rt.detect_runtime(InferenceConfig(compute_dtype="float32"), probe=T4X2)
    assert forced.compute_dtype == torch.float32 and "from config" in forced.reason
    assert rt.detect_runtime(InferenceConfig(device="cpu"), probe=TPU).kind == "cpu"


def test_cpu_replicas_give_several_cpu_devices_with_distinct_report_names():
    from kaggle_utils.inference.replicas import worker_names

    runtime = rt.detect_runtime(InferenceConfig(device="cpu", cpu_replicas=2), probe=T4X2)
    assert runtime.devices == ("cpu", "cpu") and worker_names(runtime.devices) == ["cpu#0", "cpu#1"]
    assert worker_names(("cuda:0", "cuda:1")) == ["cuda:0", "cuda:1"]
    assert rt.detect_runtime(InferenceConfig(cpu_replicas=2), probe=T4X2).devices == ("cuda:0", "cuda:1")


@pytest.mark.parametrize(
    ("cfg", "probe", "message"),
    [
        (InferenceConfig(device="cuda"), CPU, "no CUDA GPU"),
        (InferenceConfig(device="tpu"), CPU, "torch_xla"),
        (InferenceConfig(num_gpus=3), T4X2, "num_gpus=3"),
    ],
)
def test_impossible_requests_raise_usage_errors(cfg, probe, message):
    with pytest.raises(UsageError, match=message):
        rt.detect_runtime(cfg, probe=probe)


def test_zero_gpus_is_refused_when_the_config_is_built():
    with pytest.raises(UsageError, match="inference.num_gpus must be >= 1"):
        InferenceConfig(num_gpus=0)


def test_real_probe_on_this_machine_is_consistent():
    probe = rt.probe_hardware()
    runtime = rt.detect_runtime(probe=probe)
    assert runtime.kind == ("cuda" if torch.cuda.is_available() else "tpu" if probe.tpu_available else "cpu")
    assert len(probe.gpus) == torch.cuda.device_count()


def test_probe_asks_torch_for_native_bf16_not_emulation(monkeypatch):
    """On a T4, is_bf16_supported() says True through emulation; the probe must ask without it."""
    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return including_emulation  # what a T4 answers: only emulated

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda index: SimpleNamespace(name="Tesla T4", major=7, minor=5, total_memory=15 * 2**30),
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    probe = rt.probe_hardware()
    assert asked == [False, False]
    assert [gpu.capability for gpu in probe.gpus] == [(7, 5), (7, 5)]
    assert not any(gpu.native_bf16 for gpu in probe.gpus)
    assert rt.detect_runtime(probe=probe).compute_dtype == torch.float16


# --- finding the notebook's inputs under an input root ------------------------------------------------------


def _touch(path, text: str = "x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _kaggle_like(root):
    """A mount as newer Kaggle images lay it out, with decoys: a dataset holding another test.csv, a model
    artifact nested by owner/version (its model/ subfolder is not an artifact), and a wheels dataset."""
    _touch(root / "competitions" / "llm-classification-finetuning" / "test.csv")
    _touch(root / "competitions" / "llm-classification-finetuning" / "sample_submission.csv")
    _touch(root / "lmsys-extra-data" / "test.csv")
    artifact = root / "models" / "me" / "gemma-arena" / "transformers" / "qlora" / "3"
    _touch(artifact / "manifest.json", "{}")
    _touch(artifact / "model" / "config.json", "{}")
    _touch(artifact / "baseline.json")
    _touch(root / "arena-wheels" / "kaggle_utils-0.1.0-py3-none-any.whl")
    return artifact


def test_find_inputs_searches_instead_of_assuming_a_layout(tmp_path):
    artifact = _kaggle_like(tmp_path)
    found = inputs.find_inputs(tmp_path)
    assert found.artifact_dir == artifact
    assert found.test_path == tmp_path / "competitions" / "llm-classification-finetuning" / "test.csv"
    assert found.wheels_dir == tmp_path / "arena-wheels"
    assert found.baseline_path == artifact / "baseline.json"
    assert "arena-wheels" in found.describe()


def test_find_inputs_old_layout_without_extras(tmp_path):
    _touch(tmp_path / "lmsys-chatbot-arena" / "test.csv")
    _touch(tmp_path / "my-artifact" / "manifest.json", "{}")
    found = inputs.find_inputs(tmp_path)
    assert found.test_path == tmp_path / "lmsys-chatbot-arena" / "test.csv"
    assert found.wheels_dir is None and found.baseline_path is None


def test_find_inputs_never_takes_a_baseline_from_another_artifact(tmp_path):
    _touch(tmp_path / "comp" / "test.csv")
    _touch(tmp_path / "mine" / "manifest.json", "{}")
    _touch(tmp_path / "theirs" / "manifest.json", "{}")
    _touch(tmp_path / "theirs" / "baseline.json")
    _touch(tmp_path / "mine" / "baseline.joblib")  # pickles are not baselines any more
    found = inputs.find_inputs(tmp_path, artifact_hint="mine")
    assert found.artifact_dir == tmp_path / "mine" and found.baseline_path is None
    _touch(tmp_path / "standalone" / "baseline.json")
    assert (
        inputs.find_inputs(tmp_path, artifact_hint="mine").baseline_path
        == tmp_path / "standalone" / "baseline.json"
    )


def test_find_inputs_ambiguity_is_an_error_naming_candidates_and_a_hint_resolves_it(tmp_path):
    _kaggle_like(tmp_path)
    second = tmp_path / "other-artifact"
    _touch(second / "manifest.json", "{}")
    with pytest.raises(UsageError, match="2 candidates for the artifact.*other-artifact"):
        inputs.find_inputs(tmp_path)
    assert inputs.find_inputs(tmp_path, artifact_hint="other-artifact").artifact_dir == second
    assert (
        inputs.find_inputs(
            tmp_path, artifact_hint="qlora", test_hint="lmsys-extra-data"
        ).test_path.parent.name
        == "lmsys-extra-data"
    )
    with pytest.raises(UsageError, match="matches 'nothing-like-this'"):
        inputs.find_inputs(tmp_path, artifact_hint="nothing-like-this")


def test_find_inputs_reports_what_is_missing(tmp_path):
    with pytest.raises(UsageError, match="not a directory"):
        inputs.find_inputs(tmp_path / "absent")
    _touch(tmp_path / "comp" / "test.csv")
    with pytest.raises(UsageError, match="no model artifact"):
        inputs.find_inputs(tmp_path)
    _touch(tmp_path / "art" / "manifest.json", "{}")
    (tmp_path / "comp" / "test.csv").unlink()
    with pytest.raises(UsageError, match="no test file"):
        inputs.find_inputs(tmp_path)


def test_default_paths_follow_the_environment(monkeypatch):
    monkeypatch.setattr(environment, "KAGGLE_WORKING", Path("/nonexistent-kaggle-working"))
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    assert not environment.on_kaggle()
    assert environment.default_submission_path() == Path("submissions") / "submission.csv"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert environment.on_kaggle()
    assert environment.default_submission_path() == Path("/nonexistent-kaggle-working") / "submission.csv"


def test_competition_file_is_found_in_either_mount_layout_then_locally(tmp_path, monkeypatch):
    monkeypatch.setattr(environment, "KAGGLE_INPUT", tmp_path / "input")
    local = tmp_path / "data"
    with pytest.raises(UsageError, match=r"no train\.csv in .*competitions/arena.*data"):
        environment.find_competition_file("arena", "train.csv", local_dir=local)
    on_disk = _touch(local / "train.csv")
    assert environment.find_competition_file("arena", local_dir=local) == on_disk
    newer = _touch(tmp_path / "input" / "competitions" / "arena" / "train.csv")
    assert environment.find_competition_file("arena", local_dir=local) == newer
    older = _touch(tmp_path / "input" / "arena" / "train.csv")
    assert environment.find_competition_file("arena", local_dir=local) == older
    with pytest.raises(UsageError, match="no test.csv"):
        environment.find_competition_file("arena", "test.csv", local_dir=local)


def test_run_output_dir_follows_the_environment_unless_given(monkeypatch):
    monkeypatch.setattr(environment, "KAGGLE_WORKING", Path("/nonexistent-kaggle-working"))
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    assert environment.run_output_dir("cv_report") == Path("runs") / "cv_report"
    assert environment.run_output_dir("cv_report", "elsewhere/out") == Path("elsewhere/out")
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert (
        environment.run_output_dir("ft-then-quant") == Path("/nonexistent-kaggle-working") / "ft-then-quant"
    )


def test_machine_facts_for_records_are_readable_here():
    from kaggle_utils.core.machine import cpu_name as cpu_model
    from kaggle_utils.core.machine import total_memory_gb

    assert isinstance(cpu_model(), str) and cpu_model()
    memory = total_memory_gb()
    assert memory is None or memory > 0


def test_find_inputs_hints_match_whole_names_not_substrings(tmp_path):
    """`arena-ensemble` names that folder, not `arena-ensemble2` too; several names (a/b) are consecutive."""
    _touch(tmp_path / "comp" / "test.csv")
    wanted = tmp_path / "me" / "arena-ensemble"
    _touch(wanted / "manifest.json", "{}")
    _touch(tmp_path / "me" / "arena-ensemble2" / "manifest.json", "{}")
    assert inputs.find_inputs(tmp_path, artifact_hint="arena-ensemble").artifact_dir == wanted
    assert inputs.find_inputs(tmp_path, artifact_hint="me/arena-ensemble").artifact_dir == wanted
    with pytest.raises(UsageError, match=r"no artifact under .* matches 'arena-ens' \(whole names"):
        inputs.find_inputs(tmp_path, artifact_hint="arena-ens")
    with pytest.raises(UsageError, match="no artifact under .* matches 'arena-ensemble/me'"):
        inputs.find_inputs(tmp_path, artifact_hint="arena-ensemble/me")


def test_find_inputs_takes_a_given_artifact_or_test_file_without_searching_for_it(tmp_path):
    """Two artifacts attached and the artifact given: only the test file is looked for, so no ambiguity."""
    artifact = _kaggle_like(tmp_path)
    _touch(tmp_path / "other-artifact" / "manifest.json", "{}")
    with pytest.raises(UsageError, match="2 candidates for the artifact"):
        inputs.find_inputs(tmp_path)
    found = inputs.find_inputs(tmp_path, artifact_dir=artifact)
    assert found.artifact_dir == artifact and found.baseline_path == artifact / "baseline.json"
    assert found.test_path == tmp_path / "competitions" / "llm-classification-finetuning" / "test.csv"
    given_test = tmp_path / "lmsys-extra-data" / "test.csv"
    found = inputs.find_inputs(tmp_path, artifact_hint="qlora", test_path=given_test)
    assert found.test_path == given_test and found.artifact_dir == artifact
    # an explicit artifact outside the root is taken as it is
    outside = tmp_path.parent / f"{tmp_path.name}-outside-artifact"
    assert inputs.find_inputs(tmp_path, artifact_dir=outside).artifact_dir == outside


def test_offline_hub_sets_what_the_user_did_not(monkeypatch):
    import huggingface_hub.constants

    for name in environment.OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # the user's own choice stays
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert environment.use_offline_hub() == ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # read once at import: set for an imported hub too
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    environment.use_offline_hub()
    assert not huggingface_hub.constants.HF_HUB_OFFLINE  # HF_HUB_OFFLINE=0 set by the user wins
