"""The real `tpu.make_forward` under torch_xla's CPU device (PJRT_DEVICE=CPU, 8 virtual devices = a v3-8).

torch_xla pins one torch release, so this runs in its own venv: `make tpu-check` (see README). In the main
venv (no torch_xla) the module is skipped, unless KAGGLE_UTILS_REQUIRE_XLA=1 (set by `make tpu-check`), which
turns a missing torch_xla into a failure so the check can never pass by skipping.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("PJRT_DEVICE", "CPU")  # a real TPU VM sets PJRT_DEVICE=TPU itself
os.environ.setdefault("CPU_NUM_DEVICES", "8")  # 8 virtual CPU devices: the core count of a TPU v3-8
if os.environ.get("KAGGLE_UTILS_REQUIRE_XLA") == "1":
    import torch_xla  # noqa: F401  (a missing torch_xla fails the check)
else:
    pytest.importorskip("torch_xla")

import torch  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402
import torch_xla.runtime as xr  # noqa: E402
from builders import ORDERINGS, build_tiny_artifacts  # noqa: E402  (tests/ is on sys.path)

from kaggle_utils.core.config import InferenceConfig  # noqa: E402
from kaggle_utils.data.load import load_competition  # noqa: E402
from kaggle_utils.inference import tpu  # noqa: E402
from kaggle_utils.models.classifier import predict_probs  # noqa: E402
from kaggle_utils.quant.artifacts import load_artifact  # noqa: E402
from kaggle_utils.text.encode import encode_both_orders  # noqa: E402

V3_8_CORES, V3_CORE_GB = 8, 16.0
GEMMA2_9B_BF16 = int(9.24e9 * 2)  # parameters x 2 bytes
LENGTH_BUCKET, TOKEN_BUDGET, ROWS_PER_CALL = 64, 1024, 8
# XLA's CPU kernels vs torch's CPU kernels on the same bf16 weights: bf16 rounding of the activations
# (8 mantissa bits) differs between the two, so agreement is to a few 1e-3 in probability, not bitwise.
ATOL_VS_CPU_BF16 = 0.01
ATOL_VS_ARTIFACT = 0.03  # the quantized artifact on CPU (bnb kernels) vs its dequantized bf16 copy


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, demo_tokenizer):
    torch.set_num_threads(1)
    return build_tiny_artifacts(tmp_path_factory.mktemp("artifacts"), demo_tokenizer)


def compiles() -> int:
    """Graphs XLA has compiled so far in this process (a cache hit does not count)."""
    data = met.metric_data("CompileTime")
    return 0 if data is None else int(data[0])


def test_runs_on_eight_virtual_devices_with_the_v3_8_mesh_a_9b_model_needs():
    assert xr.global_runtime_device_count() == V3_8_CORES
    # Gemma-2-9B in bf16 (18.5 GB) does not fit one 16 GB core: weights split in two ("model" axis 2),
    # and the 4 pairs of cores each take a quarter of every batch's rows ("data" axis 4).
    assert tpu.choose_mesh(V3_8_CORES, GEMMA2_9B_BF16, V3_CORE_GB * 2**30) == (4, 2)


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_make_forward_shards_like_a_9b_model_on_v3_8_compiles_once_per_shape_and_matches_cpu(
    ordering, artifacts, sample_files
):
    plain = tpu.load_plain(artifacts[ordering])
    weight_bytes = sum(p.numel() * p.element_size() for p in plain.model.parameters())
    # Shrink the "core" so that the tiny model needs the same (data 4, model 2) mesh as Gemma-2-9B on v3-8.
    device_gb = weight_bytes / 2 / 0.6 * 1.1 / 2**30
    assert tpu.choose_mesh(V3_8_CORES, weight_bytes, device_gb * 2**30) == (4, 2)
    frame = load_competition(sample_files.test_csv, split="test").frame
    original, swapped = encode_both_orders(frame, plain.tokenizer, plain.format_config)
    # The sample rows are mostly cut at max_length; shorter cuts give several static shapes (buckets of 64).
    cuts = (40, 90, 150, 256)
    seqs = [list(ids)[: cuts[i % 4]] for i, ids in enumerate([*original.input_ids, *swapped.input_ids])]
    pad = plain.tokenizer.pad_token_id

    cpu_model = tpu.load_plain(artifacts[ordering]).model  # make_forward moves `plain.model` to the device
    want_bf16 = predict_probs(cpu_model, seqs, pad)
    want_artifact = predict_probs(load_artifact(artifacts[ordering], device="cpu").model, seqs, pad)

    forward = tpu.make_forward(
        plain.model,
        pad,
        InferenceConfig(token_budget=TOKEN_BUDGET),
        length_bucket=LENGTH_BUCKET,
        device_memory_gb=device_gb,
    )

    # The weights are split as on a v3-8: column-parallel rows, row-parallel columns, the rest replicated.
    import torch_xla

    specs = {name: torch_xla._XLAC._get_xla_sharding_spec(p) for name, p in plain.model.named_parameters()}
    q_proj = next(s for n, s in specs.items() if n.endswith("self_attn.q_proj.weight"))
    down_proj = next(s for n, s in specs.items() if n.endswith("mlp.down_proj.weight"))
    norm = next(s for n, s in specs.items() if n.endswith("input_layernorm.weight"))
    assert q_proj.startswith("{devices=[2,1,4]") and "last_tile_dim_replicate" in q_proj, q_proj
    assert down_proj.startswith("{devices=[1,2,4]") and "last_tile_dim_replicate" in down_proj, down_proj
    assert norm == "{replicated}", norm

    # Calls of similar-length rows, like the engine's length-sorted batches; several share one static shape.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    calls = [order[i : i + ROWS_PER_CALL] for i in range(0, len(order), ROWS_PER_CALL)]
    shapes = [
        tpu.static_shape(max(len(seqs[i]) for i in call), TOKEN_BUDGET, LENGTH_BUCKET, 4) for call in calls
    ]
    assert 3 <= len(set(shapes)) < len(calls), "the check needs several shapes, several calls per shape"
    assert all(rows % 4 == 0 for rows, _ in shapes)  # every data-axis core gets the same number of rows

    before = compiles()
    got = np.zeros((len(seqs), 3))
    for call in calls:
        got[call] = forward([seqs[i] for i in call])
    first_pass = compiles() - before
    # At most one graph per static shape (the second ordering may reuse the first one's cached graphs).
    assert first_pass <= len(set(shapes)), (first_pass, sorted(set(shapes)))
    for call in calls:  # warm: every shape seen, nothing may compile again
        np.testing.assert_array_equal(forward([seqs[i] for i in call]), got[call])
    assert compiles() - before == first_pass

    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(got, want_bf16, atol=ATOL_VS_CPU_BF16)
    np.testing.assert_allclose(got, want_artifact, atol=ATOL_VS_ARTIFACT)
    print(
        f"\n{ordering}: {len(calls)} calls, {len(set(shapes))} static shapes, {first_pass} compiled graphs; "
        f"max |xla - cpu bf16| = {np.abs(got - want_bf16).max():.2e}, "
        f"max |xla - cpu artifact| = {np.abs(got - want_artifact).max():.2e}"
    )
