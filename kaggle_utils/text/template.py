"""The versioned prompt templates (gemma, llama3, chatml, plain) and their token ids for a tokenizer.

"gemma" (the default; ``<bos>`` is the tokenizer's bos id, the rest is text)::

    <bos><start_of_turn>user
    {prompt, turn 1}<end_of_turn>
    <start_of_turn>model
    <response_a>
    {response A, turn 1}
    </response_a>
    <response_b>
    {response B, turn 1}
    </response_b><end_of_turn>
    ... one such block per turn ...
    <start_of_turn>user
    Which response is better? A, B or tie?<end_of_turn>
    <start_of_turn>model

The question suffix always closes the sequence, whole (the classifier pools the last token). "llama3" and
"chatml" put the same pieces in those families' turn markup, "plain" uses ``###`` headings, and "auto" picks
the tokenizer's family. ``TEMPLATE_VERSION`` names the template strings and the truncation rules: artifacts
store it and refuse another, so change it whenever the produced ids change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kaggle_utils.core.config import FormatConfig, validate_section
from kaggle_utils.core.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Gemma's turn markers (the gemma template's; the demo tokenizer has them as special tokens).
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

LLAMA3_HEADER_START = "<|start_header_id|>"
LLAMA3_HEADER_END = "<|end_header_id|>"
LLAMA3_EOT = "<|eot_id|>"
CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"
TEMPLATE_VERSION = "arena-pair-v2"
QUESTION = "Which response is better? A, B or tie?"


@dataclass(frozen=True)
class PromptTemplate:
    """The fixed text around each turn's three pieces, and the question suffix."""

    name: str
    turn_open: str  # before the turn's prompt
    prompt_to_a: str  # between the prompt and response A
    a_to_b: str  # between response A and response B
    turn_close: str  # after response B
    suffix: str  # the question; closes every sequence, never cut
    required_tokens: tuple[str, ...] = ()  # tokens the tokenizer must know as single special tokens


TEMPLATES: dict[str, PromptTemplate] = {
    "gemma": PromptTemplate(
        name="gemma",
        turn_open=f"{START_OF_TURN}user\n",
        prompt_to_a=f"{END_OF_TURN}\n{START_OF_TURN}model\n<response_a>\n",
        a_to_b="\n</response_a>\n<response_b>\n",
        turn_close=f"\n</response_b>{END_OF_TURN}\n",
        suffix=f"{START_OF_TURN}user\n{QUESTION}{END_OF_TURN}\n{START_OF_TURN}model\n",
        required_tokens=(START_OF_TURN, END_OF_TURN),
    ),
    # Llama-3 tokenizers: header tokens around the role, <|eot_id|> closes a message.
    "llama3": PromptTemplate(
        name="llama3",
        turn_open=f"{LLAMA3_HEADER_START}user{LLAMA3_HEADER_END}\n\n",
        prompt_to_a=f"{LLAMA3_EOT}{LLAMA3_HEADER_START}assistant{LLAMA3_HEADER_END}\n\n<response_a>\n",
        a_to_b="\n</response_a>\n<response_b>\n",
        turn_close=f"\n</response_b>{LLAMA3_EOT}",
        suffix=f"{LLAMA3_HEADER_START}user{LLAMA3_HEADER_END}\n\n{QUESTION}{LLAMA3_EOT}"
        f"{LLAMA3_HEADER_START}assistant{LLAMA3_HEADER_END}\n\n",
        required_tokens=(LLAMA3_HEADER_START, LLAMA3_HEADER_END, LLAMA3_EOT),
    ),
    # ChatML (Qwen-2, SmolLM2): <|im_start|>role ... <|im_end|>.
    "chatml": PromptTemplate(
        name="chatml",
        turn_open=f"{CHATML_START}user\n",
        prompt_to_a=f"{CHATML_END}\n{CHATML_START}assistant\n<response_a>\n",
        a_to_b="\n</response_a>\n<response_b>\n",
        turn_close=f"\n</response_b>{CHATML_END}\n",
        suffix=f"{CHATML_START}user\n{QUESTION}{CHATML_END}\n{CHATML_START}assistant\n",
        required_tokens=(CHATML_START, CHATML_END),
    ),
    "plain": PromptTemplate(
        name="plain",
        turn_open="### Prompt\n",
        prompt_to_a="\n\n### Response A\n",
        a_to_b="\n\n### Response B\n",
        turn_close="\n\n",
        suffix=f"### Question\n{QUESTION}\n### Answer\n",
    ),
}

# format.template="auto": the first family whose turn tokens the tokenizer has as single tokens, else "plain".
AUTO_TEMPLATE = "auto"
_AUTO_ORDER: tuple[str, ...] = ("gemma", "llama3", "chatml")


def template_for_tokenizer(tokenizer: PreTrainedTokenizerFast) -> str:
    """The template of the tokenizer's family: Gemma turn tokens, Llama-3 headers, ChatML, else plain."""
    for name in _AUTO_ORDER:
        if all(_single_token(tokenizer, token) for token in TEMPLATES[name].required_tokens):
            return name
    return "plain"


def resolve_template(tokenizer: PreTrainedTokenizerFast, cfg: FormatConfig) -> PromptTemplate:
    """`cfg.template`, with "auto" resolved from the tokenizer (an artifact ships its tokenizer)."""
    name = template_for_tokenizer(tokenizer) if cfg.template == AUTO_TEMPLATE else cfg.template
    return TEMPLATES[name]


def _single_token(tokenizer: PreTrainedTokenizerFast, token: str) -> bool:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def minimum_max_length(tokenizer: PreTrainedTokenizerFast, cfg: FormatConfig) -> int:
    """The smallest ``max_length`` this tokenizer and template can honour (delimiters, suffix, markers)."""
    ids = template_ids(tokenizer, cfg)
    return minimum_length(ids)


@dataclass(frozen=True)
class TemplateIds:
    bos: list[int]
    turn_open: list[int]
    prompt_to_a: list[int]
    a_to_b: list[int]
    turn_close: list[int]
    suffix: list[int]
    marker: list[int]

    @property
    def turn_overhead(self) -> int:
        return len(self.turn_open) + len(self.prompt_to_a) + len(self.a_to_b) + len(self.turn_close)


def minimum_length(ids: TemplateIds) -> int:
    # One turn's delimiters, a marker in each piece plus the dropped-turns marker, and one text token each.
    return len(ids.bos) + len(ids.suffix) + ids.turn_overhead + 4 * len(ids.marker) + 3


def _check_config(cfg: FormatConfig) -> None:
    """The config's own rules (`config.validate_section`), re-checked: a caller may change a field after
    building the config. The template must also be one this module renders."""
    validate_section(cfg)
    if cfg.template not in TEMPLATES and cfg.template != AUTO_TEMPLATE:
        raise UsageError(
            f"format.template={cfg.template!r} is unknown; choose one of "
            f"{sorted(TEMPLATES) + [AUTO_TEMPLATE]}"
        )


def template_ids(tokenizer: PreTrainedTokenizerFast, cfg: FormatConfig) -> TemplateIds:
    _check_config(cfg)
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; encode_rows needs a tokenizer.json one"
        )
    template = resolve_template(tokenizer, cfg)
    for token in template.required_tokens:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise UsageError(
                f"template {template.name!r} needs {token} as one special token, but this tokenizer "
                f"splits it into {len(ids)} ids; this tokenizer's family uses "
                f"format.template={template_for_tokenizer(tokenizer)!r} "
                "(or 'auto'; 'plain' fits any tokenizer)"
            )
    fixed = tokenizer(
        [template.turn_open, template.prompt_to_a, template.a_to_b, template.turn_close, template.suffix],
        add_special_tokens=False,
    )["input_ids"]
    marker = tokenizer([cfg.truncation_marker], add_special_tokens=False, split_special_tokens=True)[
        "input_ids"
    ][0]
    bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    return TemplateIds(bos, *fixed, marker=marker)
