"""What `predict` settles before it writes anything: the settings, the competition dialect, the files it
reads (which no output may be, contain or lie inside), and the runtime. A problem here is a UsageError,
raised before any file is written."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kaggle_utils.core.config import DataConfig, InferenceConfig, validate_section
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.fileio import check_output_apart, check_output_target
from kaggle_utils.data.dialects import dialect_names, dialect_of_manifest, get_dialect
from kaggle_utils.inference.report import fallback_path_for, report_path_for
from kaggle_utils.models.runtime import detect_runtime
from kaggle_utils.quant.artifacts import MANIFEST_NAME
from kaggle_utils.train.baseline import baseline_manifest_path


def validate_inference_config(cfg: InferenceConfig) -> None:
    """Refuse settings that cannot work (a NaN deadline would disable the guard): the config's own rules
    (`config.validate_section`), re-checked because a caller may have changed a field after building it."""
    validate_section(cfg)


def predict_inputs(
    artifact_dir: str | Path | None, test_path: str | Path, fallback_path: str | Path | None = None
) -> list[tuple[str, Path]]:
    """Every file and folder `predict` reads, as (what, path) for `fileio.check_output_apart`: the test file,
    the fallback baseline, the artifact and an ensemble's members (baseline files with their manifests). An
    unreadable manifest names no members (the run then falls back and says why)."""
    inputs: list[tuple[str, Path]] = [("test file", Path(test_path))]
    if fallback_path is not None:
        inputs += [
            ("fallback baseline", Path(fallback_path)),
            ("fallback baseline's manifest", baseline_manifest_path(fallback_path)),
        ]
    if artifact_dir is None:
        return inputs
    inputs.append(("artifact", Path(artifact_dir)))
    try:
        manifest = json.loads((Path(artifact_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return inputs
    if not isinstance(manifest, dict) or manifest.get("kind") != "ensemble":
        return inputs
    for index, entry in enumerate(manifest.get("members") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            continue
        path = Path(entry["path"])
        path = path if path.is_absolute() else Path(os.path.normpath(Path(artifact_dir) / path))
        name = f"ensemble member {entry.get('name') or f'members[{index}]'}"
        inputs.append((name, path))
        if not path.is_dir():  # a baseline member: its sha256 manifest beside it is read too
            inputs.append((f"{name}'s manifest", baseline_manifest_path(path)))
    return inputs


def resolve_dialect(
    artifact_dir: str | Path | None, dialect: str | None = None, test_path: str | Path | None = None
) -> Any:
    """The `Dialect` to read the test file and write the submission with: `dialect` when given (UsageError if
    unknown), else the artifact manifest's (LMSYS when absent); with no readable manifest, the one dialect
    whose test file has `test_path`'s suffix, so even an all-fallback file is the competition's format."""
    if dialect is not None:
        return get_dialect(dialect)
    try:
        manifest = json.loads((Path(artifact_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):  # TypeError: no artifact (None)
        manifest = None
    if isinstance(manifest, dict):
        return dialect_of_manifest(manifest)
    if test_path is not None:
        suffix = Path(test_path).suffix.lower()
        matching = [name for name in dialect_names() if Path(get_dialect(name).test_file).suffix == suffix]
        if len(matching) == 1:
            return get_dialect(matching[0])
    return dialect_of_manifest(None)


def read_manifest_or_record(artifact_dir: str | Path, record: Callable[[str, BaseException], None]) -> dict:
    """The manifest alone (cheap: the fallback needs its class prior before any model is loaded); a manifest
    that cannot be read is passed to `record` and read as {}."""
    path = Path(artifact_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return manifest
    except Exception as error:
        record(f"reading {path}", error)
        return {}


def inference_config(cfg: InferenceConfig | Mapping[str, Any] | None) -> InferenceConfig:
    """`cfg` as an InferenceConfig: None -> the defaults; a mapping -> its fields (unknown names refused)."""
    if cfg is None or isinstance(cfg, InferenceConfig):
        return cfg or InferenceConfig()
    known = {f.name for f in dataclasses.fields(InferenceConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise UsageError(f"unknown inference settings {unknown} (known: {sorted(known)})")
    return InferenceConfig(**cfg)


def check_data_format(data_cfg: DataConfig | None, chosen: Any, dialect_given: bool) -> None:
    """A `data_cfg` whose format is not the chosen dialect's is refused."""
    if data_cfg is not None and data_cfg.format != chosen.name:
        raise UsageError(
            f"data format {data_cfg.format!r} but the dialect is {chosen.name!r} "
            f"({'given' if dialect_given else 'from the artifact manifest'}): they must agree"
        )


def check_outputs(out_path: Path, inputs: list[tuple[str, Path]]) -> None:
    """Every file a run may write (the submission, its report, the fallback beside it and that one's report)
    must be a regular file (or absent) apart from every input (`predict_inputs`)."""
    for output in (
        out_path,
        report_path_for(out_path),
        fallback_path_for(out_path),
        report_path_for(fallback_path_for(out_path)),
    ):
        check_output_target(output)
        check_output_apart(output, inputs)


def detect_runtime_or_error(cfg: InferenceConfig) -> tuple[Any, Exception | None]:
    """(runtime, None), or (None, error) when probing the devices crashed (e.g. a CUDA driver failing to
    initialise: no model runs, but a file is still written). A device asked for but absent raises."""
    try:
        return detect_runtime(cfg), None
    except UsageError:
        raise
    except Exception as error:
        return None, error


def time_budget_s(cfg: InferenceConfig, started_at: float | None) -> float:
    """Seconds left for the whole run: the deadline less the margin, less time spent since `started_at`
    (epoch seconds, e.g. the notebook's first cell)."""
    spent_before = max(0.0, time.time() - started_at) if started_at is not None else 0.0
    return (cfg.deadline_hours - cfg.safety_margin_hours) * 3600.0 - spent_before
