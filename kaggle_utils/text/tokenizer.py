"""Tokenizers: a small byte-level BPE trained locally with Gemma's special tokens, and loading a real one.

Tests and the demo run offline on the trained one (a standard fast tokenizer), laid out like Gemma:

=================  ===  ==================================================
token              id   why
=================  ===  ==================================================
``<pad>``          0    Gemma's ``pad_token_id=0``; the classifier pools the last non-pad token
``<eos>``          1    Gemma's ``eos_token_id``
``<bos>``          2    Gemma's ``bos_token_id``; added at the start of every encoding, like Gemma
``<unk>``          3    as in Gemma (byte-level BPE never needs it)
``<start_of_turn>`` 4   chat template delimiter (id 106 in Gemma; only the string matters)
``<end_of_turn>``  5    chat template delimiter (id 107 in Gemma)
=================  ===  ==================================================

Usage: ``tok = train_demo_tokenizer(texts, out_dir)``; ``load_tokenizer(dir)`` loads any local one (no hub).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kaggle_utils.core.errors import UsageError
from kaggle_utils.text.template import END_OF_TURN, START_OF_TURN

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
BOS_TOKEN = "<bos>"
UNK_TOKEN = "<unk>"
# Order = ids 0..5 in the trained vocabulary (Gemma's layout for pad/eos/bos/unk).
GEMMA_SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    EOS_TOKEN,
    BOS_TOKEN,
    UNK_TOKEN,
    START_OF_TURN,
    END_OF_TURN,
)
# Special-token layouts of the families the classifier supports (ids 0.. in this order in a demo tokenizer):
# the tokens each family's template needs, with its bos / eos / pad / unk roles (None: absent).
FAMILY_SPECIAL_TOKENS: dict[str, dict] = {
    "gemma": {
        "tokens": GEMMA_SPECIAL_TOKENS,
        "bos": BOS_TOKEN,
        "eos": EOS_TOKEN,
        "pad": PAD_TOKEN,
        "unk": UNK_TOKEN,
    },
    "llama3": {
        "tokens": (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|finetune_right_pad_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        "bos": "<|begin_of_text|>",
        "eos": "<|end_of_text|>",
        "pad": "<|finetune_right_pad_id|>",
        "unk": None,
    },
    "chatml": {
        "tokens": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "unk": None,
    },  # Qwen-2: no bos
    "mistral": {
        "tokens": ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        "bos": "<s>",
        "eos": "</s>",
        "pad": None,
        "unk": "<unk>",
    },  # no pad: load_tokenizer pads with eos
}
# Gemma-2's context length; only used as the tokenizer's advertised limit.
DEMO_MODEL_MAX_LENGTH = 8192
# Files of which at least one marks a directory as a Hugging Face tokenizer directory.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Marks a tokenizer trained here in its tokenizer_config.json (transformers keeps unknown keys through
# save/load, so an artifact's copy still carries it): real checkpoints refuse it (kaggle_utils.models.real).
DEMO_TOKENIZER_KEY = "kaggle_utils_demo_tokenizer"


def train_demo_tokenizer(
    texts: Iterable[str], out_dir: str | Path | None = None, vocab_size: int = 2048, family: str = "gemma"
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` as a ``PreTrainedTokenizerFast`` with ``family``'s token layout.

    With ``out_dir`` it is saved there and the copy loaded back from disk is returned (what artifacts ship).
    """
    if family not in FAMILY_SPECIAL_TOKENS:
        raise UsageError(
            f"unknown tokenizer family {family!r}; choose one of {sorted(FAMILY_SPECIAL_TOKENS)}"
        )
    layout = FAMILY_SPECIAL_TOKENS[family]
    special = tuple(layout["tokens"])
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(special)
    if vocab_size < minimum:
        raise UsageError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least {minimum} "
            f"(256 bytes + {len(special)} special tokens)"
        )
    iterator = iter(texts)
    first = next(iterator, None)
    if first is None:
        raise UsageError("train_demo_tokenizer got no texts to train on")
    corpus = itertools.chain([first], iterator)
    tokenizer = _wrap_backend(_train_backend(corpus, layout, vocab_size), layout)
    tokenizer.init_kwargs[DEMO_TOKENIZER_KEY] = True
    if out_dir is None:
        return tokenizer
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_path))
    return load_tokenizer(out_path)


def _train_backend(corpus: Iterable[str], layout: dict, vocab_size: int) -> Tokenizer:
    """The trained byte-level BPE with the layout's special tokens at ids 0.. and its bos post-processor."""
    special = tuple(layout["tokens"])
    backend = Tokenizer(models.BPE(unk_token=layout["unk"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    for expected_id, token in enumerate(special):
        actual = backend.token_to_id(token)
        if actual != expected_id:  # the trainer assigns special tokens first; guard the layout we promise
            raise RuntimeError(f"special token {token} got id {actual}, expected {expected_id}")
    bos = layout["bos"]
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, special.index(bos))]
        )
    return backend


def _wrap_backend(backend: Tokenizer, layout: dict) -> PreTrainedTokenizerFast:
    """The Hugging Face fast tokenizer around ``backend``, with the layout's bos/eos/pad/unk roles."""
    special = tuple(layout["tokens"])
    bos = layout["bos"]
    roles = {
        f"{role}_token": layout[role] for role in ("bos", "eos", "pad", "unk") if layout[role] is not None
    }
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **roles,
        extra_special_tokens=[token for token in special if token not in roles.values()],
        add_bos_token=bos is not None,
        add_eos_token=False,
        padding_side="right",
        model_max_length=DEMO_MODEL_MAX_LENGTH,
    )
    return tokenizer


def load_tokenizer(path: str | Path | None) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a local directory (the demo one or a real Gemma one); never downloads.

    A tokenizer without a pad token gets its eos token as pad (logged), because batching pads with it.
    """
    if path is None:
        raise UsageError(
            "no tokenizer path given: set format.tokenizer_path to a local tokenizer directory, "
            "or train the demo tokenizer with kaggle_utils.text.tokenizer.train_demo_tokenizer"
        )
    directory = Path(path).expanduser()
    if not directory.exists():
        raise UsageError(f"tokenizer directory {directory} does not exist")
    if not directory.is_dir():
        raise UsageError(
            f"tokenizer path {directory} is a file; "
            f"give the directory that holds {' / '.join(_TOKENIZER_FILES)}"
        )
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        found = sorted(p.name for p in directory.iterdir())[:20]
        raise UsageError(
            f"{directory} is not a tokenizer directory: "
            f"none of {list(_TOKENIZER_FILES)} found (it holds {found})"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"could not load the tokenizer in {directory}: {exc}") from exc
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise UsageError(
            f"the tokenizer in {directory} loaded as {type(tokenizer).__name__}, not a fast tokenizer: "
            "add its tokenizer.json (batch tokenisation and truncation need the fast, Rust-backed tokenizer)"
        )
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"the tokenizer in {directory} has neither a pad nor an eos token to pad with")
        logger.warning(
            "tokenizer in %s has no pad token; using its eos token %r as pad", directory, tokenizer.eos_token
        )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
