"""Generated competition files in the exact LMSYS format, with a learnable preference signal and every trap.

Real data can never be downloaded here, so the demo, the tests and the benchmarks run on this. It is shaped
like the real 57,477 rows where that matters to the pipeline: JSON-list cells written as Kaggle wrote them
(CSV-quoted, quotes doubled), about 13% multi-turn conversations, about 10% of rows reusing another row's
prompt (prompt-grouped folds must matter), long-tailed lengths (median response about 1,000 characters, a few
percent over 5,000, a handful over 20,000), model names, class balance near 35/34/31 (A/B/tie).

The label follows a hidden score per response: longer tends to win (what the length baseline picks up),
refusals ("I'm sorry, but I can't ...") lose and markdown formatting helps (lexical signals a tiny transformer
learns in a few hundred steps); a tie when the two scores are close; plus noise. With `traps=True` every
known trap of the real files (COMPETITION.md) is injected at a small rate, at least once per kind whenever the
file has room, in train and test alike; `SampleFiles.traps` says which ids got which trap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kaggle_utils.core.config import LABEL_COLUMNS
from kaggle_utils.core.console import progress_bar

# ------------------------------------------------------------------------------------------------ vocabulary
_NOUNS = (
    "system", "model", "data", "result", "question", "answer", "function", "process", "network", "problem",
    "solution", "example", "approach", "method", "value", "language", "story", "history", "energy", "market",
    "city", "garden", "recipe", "planet", "theory", "library", "project", "team", "budget", "design",
    "strategy", "policy", "experiment", "algorithm", "database", "server", "customer", "product", "feature",
    "memory", "equation", "variable", "sentence", "paragraph", "poem", "character", "journey", "river",
    "mountain", "computer", "engine", "camera", "window", "document", "schedule", "habit", "exercise", "diet",
    "vacation", "election", "economy", "climate", "forest", "ocean", "museum", "painting", "song", "movie",
    "game",
)  # fmt: skip
_ADJECTIVES = (
    "simple", "complex", "important", "useful", "efficient", "modern", "classic", "quick", "careful", "clear",
    "reliable", "flexible", "strong", "small", "large", "common", "rare", "practical", "creative", "accurate",
    "popular", "difficult", "easy", "main", "basic", "advanced", "typical", "specific", "general", "local",
    "global", "healthy", "expensive", "affordable", "quiet", "bright", "ancient", "recent", "natural",
    "digital",
)  # fmt: skip
_VERBS = (
    "improve", "explain", "describe", "build", "create", "compare", "measure", "reduce", "increase",
    "support", "organize", "analyze", "design", "test", "write", "choose", "understand", "change", "protect",
    "manage", "connect", "develop", "review", "plan", "solve", "optimize", "translate", "summarize",
    "evaluate", "learn",
)  # fmt: skip
_ADVERBS = (
    "usually", "often", "carefully", "quickly", "clearly", "rarely", "generally", "directly", "easily",
    "typically", "mostly", "simply", "really", "always", "sometimes",
)  # fmt: skip
_OPENERS = (
    "In general,", "For example,", "However,", "In practice,", "As a result,", "On the other hand,",
    "In many cases,", "To be honest,", "First of all,", "Finally,", "Moreover,", "In short,", "Of course,",
)  # fmt: skip
_EXTRAS = ("café", "naïve", "résumé", "😊", "—", "“quoted”", "e.g.", "50%", "$20", "C++", "3.14")
_CODE_SNIPPETS = (
    'def {v}_{n}(items):\n    """{A} helper."""\n    return [x for x in items if x]\n',
    "for i in range(10):\n    print(f\"{n} {{i}}\\n\")\n",
    "SELECT {n}, COUNT(*) FROM {n}s\nGROUP BY {n};\n",
    "const {n} = items.map((x) => x * 2);\nconsole.log({n}, \"done, ok\");\n",
    'path = "C:\\\\data\\\\{n}.csv"\nwith open(path) as f:\n    rows = f.read().split(",")\n',
)  # fmt: skip
_QUESTIONS = (
    "Can you explain how the {a} {n} works in a {n2}?",
    "What is the difference between a {a} {n} and a {n2}?",
    "Write a short poem about a {a} {n} and a {n2}.",
    "How do I {v} my {a} {n}?",
    "Give me three ideas to {v} a {a} {n}.",
    "Why is the {n} so {a} compared to the {n2}?",
    "Summarize the history of the {a} {n} in a few sentences.",
    "Which {n} should I choose for a {a} {n2}?",
    "Tell me a joke about a {a} {n}.",
    'Translate this sentence, please: "the {a} {n} is near the {n2}".',
    "Is it true that every {n} is {a}?",
    "Write a Python function to {v} a {a} {n}.",
    "What are the pros and cons of a {a} {n} for a {n2}?",
    "How can a {n} {v} the {a} {n2}?",
)
_PREFIXES = ("", "", "", "", "Hi! ", "Hello, ", "Quick question: ", "Please help: ", "I have a question. ")
_SUFFIXES = (
    "", "", "", "", " Keep it short.", " Explain step by step.", " Use simple words.", " Give an example.",
    " Thanks!",
)  # fmt: skip
_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I'm sorry, but I can't provide that information.",
    "I'm sorry, but I can't help with that. If you have another question, I'm happy to help.",
    "I'm sorry, but I can't do that. As an AI, I have to follow my guidelines.",
)
# (name, verbosity multiplier, markdown rate, refusal rate): a weak model-identity signal, like the real data.
_MODELS = (
    ("gpt-4-1106-preview", 1.45, 0.65, 0.05), ("gpt-4-0613", 1.0, 0.35, 0.06),
    ("gpt-4-0314", 1.05, 0.35, 0.05), ("gpt-3.5-turbo-0613", 0.85, 0.3, 0.08),
    ("gpt-3.5-turbo-0125", 0.8, 0.3, 0.08), ("claude-2.1", 1.0, 0.3, 0.16), ("claude-2.0", 1.05, 0.3, 0.12),
    ("claude-1", 1.0, 0.25, 0.1), ("claude-instant-1", 0.9, 0.25, 0.1), ("llama-2-70b-chat", 1.3, 0.35, 0.14),
    ("llama-2-13b-chat", 1.2, 0.3, 0.15), ("llama-2-7b-chat", 1.15, 0.3, 0.16),
    ("mixtral-8x7b-instruct-v0.1", 1.15, 0.45, 0.05), ("mistral-medium", 1.2, 0.45, 0.05),
    ("vicuna-33b", 1.0, 0.3, 0.07), ("vicuna-13b", 0.9, 0.25, 0.07), ("koala-13b", 0.7, 0.15, 0.09),
    ("gemini-pro", 1.1, 0.5, 0.08), ("palm-2", 0.6, 0.25, 0.1), ("zephyr-7b-beta", 1.1, 0.4, 0.05),
    ("openchat-3.5", 1.0, 0.35, 0.06), ("chatglm-6b", 0.8, 0.2, 0.08),
    ("oasst-pythia-12b", 0.75, 0.15, 0.07), ("qwen-14b-chat", 0.95, 0.35, 0.07),
    ("yi-34b-chat", 1.15, 0.45, 0.05),
)  # fmt: skip

# ------------------------------------------------------------------------------------------ shape and signal
MULTI_TURN_RATE = 0.13
TURN_COUNT_PROBS = {2: 0.55, 3: 0.25, 4: 0.12, 5: 0.08}
SHARED_PROMPT_RATE = 0.10
RESPONSE_MEDIAN_CHARS = 950.0  # before model verbosity; the generated median is about 1,050
RESPONSE_SIGMA = 0.85  # log-normal: ~5% of responses over 5,000 characters, ~0.1% over 20,000
PROMPT_MEDIAN_CHARS = 90.0
PROMPT_SIGMA = 1.1
MAX_FIELD_CHARS = 60_000
# score = LENGTH_WEIGHT * ln(chars / median) + MARKDOWN_WEIGHT * markdown + REFUSAL_WEIGHT * refusal + noise
LENGTH_WEIGHT = 0.3
MARKDOWN_WEIGHT = 0.6
REFUSAL_WEIGHT = -3.0
SCORE_NOISE = 0.8
POSITION_BIAS = 0.01  # A wins slightly more often than B (34.9% vs 34.2% in the real data)
TIE_MARGIN = 0.62  # |score_a - score_b| below this is a tie (about 31% ties overall)
LABEL_NOISE = 0.08  # share of labels replaced by a draw from the class prior

# Placeholders (letters only, so json.dumps keeps them) replaced by raw JSON escapes after serialisation.
_LONE_SURROGATE_MARK = "QQLONESURROGATEQQ"
_SURROGATE_PAIR_MARK = "QQSURROGATEPAIRQQ"
_NUL_MARK = "QQNULCHARQQ"
_ESCAPE_MARKS = {
    _LONE_SURROGATE_MARK: "\\ud83d",
    _SURROGATE_PAIR_MARK: "\\ud83d\\ude0a",
    _NUL_MARK: "\\u0000",
}

# Trap kinds, in priority order (a file with fewer rows than kinds gets the first ones), with their rates.
TRAP_RATES: dict[str, float] = {
    "unparseable": 0.0005,  # unquoted list items: nothing can recover them (train: dropped; test: kept)
    "null_turn": 0.002,  # [null] or a null inside a multi-turn list
    "both_responses_null": 0.002,
    "empty_list": 0.001,
    "both_responses_empty": 0.001,
    "empty_prompt": 0.0005,
    "missing_cell": 0.0005,  # an empty CSV field
    "lone_surrogate": 0.002,  # "\ud83d" escape with no partner
    "surrogate_pair": 0.002,  # "\ud83d\ude0a" escape pair: must decode to one emoji, no repair
    "nul_character": 0.0005,  # "\u0000" escape
    "special_characters": 0.002,  # escaped quotes, backslashes, newlines, commas, tabs
    "very_long_field": 0.0005,  # a response of 25,000-60,000 characters
    "turn_count_mismatch": 0.001,
    "python_literal_list": 0.001,  # ['...', "it's", None]
    "truncated_list": 0.001,  # JSON text cut off
    "unescaped_quotes": 0.001,  # ["He said "yes", then left"]
    "bare_string": 0.0005,  # "text" instead of ["text"]
    "identical_responses_non_tie": 0.002,  # label noise (train); identical responses (test)
}


@dataclass
class SampleFiles:
    """Paths of the written files; `traps` maps split -> trap kind -> ids that carry it."""

    train_csv: Path
    test_csv: Path
    sample_submission_csv: Path
    traps: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    # The generic names: for a parquet dialect (WSDM) the `*_csv` fields hold the parquet paths.
    @property
    def train_path(self) -> Path:
        return self.train_csv

    @property
    def test_path(self) -> Path:
        return self.test_csv


@dataclass
class SampleData:
    """The generated files in memory, cells exactly as written (JSON text; None is an empty CSV field)."""

    train: pl.DataFrame
    test: pl.DataFrame
    sample_submission: pl.DataFrame
    traps: dict[str, dict[str, list[int]]]


@dataclass
class _Row:
    prompt: list[str]
    response_a: list[str]
    response_b: list[str]
    model_a: str
    model_b: str
    label: int
    raw: dict[str, str | None] = field(default_factory=dict)  # cells overridden by a trap (exact text)


# ------------------------------------------------------------------------------------------------- text
class _TextMaker:
    """English-like text from word lists: a fixed pool of sentences per seed, drawn in bulk (fast)."""

    def __init__(self, rng: np.random.Generator, pool_size: int = 4000) -> None:
        self.rng = rng
        self.sentences = [self._sentence() for _ in range(pool_size)]
        self.lengths = np.array([len(s) + 1 for s in self.sentences], dtype=np.int64)
        self._stream = np.empty(0, dtype=np.int64)
        self._cumulative = np.empty(0, dtype=np.int64)
        self._pos = 0

    def _pick(self, words: tuple[str, ...]) -> str:
        return words[int(self.rng.integers(len(words)))]

    def _sentence(self) -> str:
        n, n2, a = self._pick(_NOUNS), self._pick(_NOUNS), self._pick(_ADJECTIVES)
        v, adv = self._pick(_VERBS), self._pick(_ADVERBS)
        templates = (
            f"The {a} {n} {adv} helps to {v} the {n2}.",
            f"{self._pick(_OPENERS)} a {a} {n} can {v} your {n2}, but it takes time.",
            f"You should {v} the {n} before you {self._pick(_VERBS)} the {n2}.",
            f"Many people think the {n} is {a}, and they are {adv} right.",
            f"A {n} is {adv} more {a} than a {n2}, especially in a {self._pick(_ADJECTIVES)} {n2}.",
            f'As the saying goes, "a {a} {n} is worth two {n2}s".',
            f"If you want to {v} a {n}, start with the {a} parts first.",
            f"{self._pick(_OPENERS)} the {n2} depends on the {n}, the {a} {n2}, and the budget.",
            f"Why does the {n} {v} the {n2}? Because it is {a}.",
            f"The {n} ({self._pick(_EXTRAS)}) is {adv} used to {v} {a} {n2}s.",
        )
        return templates[int(self.rng.integers(len(templates)))]

    def _refill(self, needed: int) -> None:
        size = max(needed, 200_000)
        self._stream = self.rng.integers(len(self.sentences), size=size)
        self._cumulative = np.cumsum(self.lengths[self._stream])
        self._pos = 0

    def sentences_for(self, n_chars: int) -> list[str]:
        """Consecutive pool sentences whose total length first reaches `n_chars` (at least one)."""
        if self._pos >= len(self._stream) or self._cumulative[-1] - self._offset() < n_chars:
            self._refill(int(n_chars / self.lengths.mean() * 2) + 10)
        start = self._pos
        end = int(np.searchsorted(self._cumulative, self._offset() + n_chars, side="left")) + 1
        end = max(min(end, len(self._stream)), start + 1)
        self._pos = end
        return [self.sentences[i] for i in self._stream[start:end]]

    def _offset(self) -> int:
        return int(self._cumulative[self._pos - 1]) if self._pos else 0

    def plain(self, n_chars: int) -> str:
        sentences = self.sentences_for(n_chars)
        per_paragraph = 2 + int(self.rng.integers(4))
        return "\n\n".join(
            " ".join(sentences[i : i + per_paragraph]) for i in range(0, len(sentences), per_paragraph)
        )

    def markdown(self, n_chars: int) -> str:
        topic = f"{self._pick(_ADJECTIVES).title()} {self._pick(_NOUNS).title()}"
        sentences = self.sentences_for(max(n_chars - 60, 40))
        parts = [f"## {topic}\n", sentences[0], ""]
        body = sentences[1:] or [sentences[0]]
        numbered = bool(self.rng.integers(2))
        for i, sentence in enumerate(body):
            if i and i % 6 == 0:
                parts += ["", f"### {self._pick(_NOUNS).title()} {i // 6 + 1}", ""]
            marker = f"{i % 6 + 1}." if numbered else "-"
            parts.append(f"{marker} **{self._pick(_NOUNS).title()}**: {sentence}")
        if n_chars > 600 and self.rng.random() < 0.35:
            snippet = _CODE_SNIPPETS[int(self.rng.integers(len(_CODE_SNIPPETS)))]
            code = snippet.format(
                n=self._pick(_NOUNS), v=self._pick(_VERBS), A=self._pick(_ADJECTIVES).title()
            )
            parts += [
                "",
                "```python" if "def " in code or "print" in code else "```",
                code.rstrip("\n"),
                "```",
            ]
        parts += ["", f"**Summary:** the {self._pick(_ADJECTIVES)} {self._pick(_NOUNS)} matters most."]
        return "\n".join(parts)

    def question(self, n_chars: int) -> str:
        template = _QUESTIONS[int(self.rng.integers(len(_QUESTIONS)))]
        text = template.format(
            a=self._pick(_ADJECTIVES), n=self._pick(_NOUNS), n2=self._pick(_NOUNS), v=self._pick(_VERBS)
        )
        text = self._pick(_PREFIXES) + text + self._pick(_SUFFIXES)
        if n_chars > len(text) + 40:
            context = " ".join(self.sentences_for(n_chars - len(text)))
            text = f"{context}\n\n{text}" if self.rng.random() < 0.5 else f"{text} {context}"
        return text


# ------------------------------------------------------------------------------------------------ generation
def generate_competition_frames(
    n_train: int = 2000, n_test: int = 200, seed: int = 0, traps: bool = True
) -> SampleData:
    """The three competition files as polars frames of raw cells: what `generate_competition_files` writes."""
    rng = np.random.default_rng(seed)
    text = _TextMaker(rng)
    all_ids = _make_ids(rng, n_train + n_test)
    test_mask = np.zeros(n_train + n_test, dtype=bool)
    test_mask[rng.choice(n_train + n_test, size=n_test, replace=False)] = True
    train_ids, test_ids = all_ids[~test_mask].tolist(), all_ids[test_mask].tolist()

    trap_ids: dict[str, dict[str, list[int]]] = {}
    frames = {}
    for split, ids in (("train", train_ids), ("test", test_ids)):
        plan = _plan_traps(rng, len(ids)) if traps else {}
        long_rows = set(plan.get("very_long_field", []))
        rows = _generate_rows(rng, text, len(ids), long_rows, desc=f"generating {split}")
        for kind, indices in plan.items():
            for index in indices:
                _apply_trap(kind, rows[index], rng, split)
        trap_ids[split] = {kind: [ids[i] for i in indices] for kind, indices in plan.items()}
        frames[split] = _to_frame(rows, ids, with_labels=split == "train")
    submission = pl.DataFrame(
        {"id": test_ids, **{c: [1 / 3] * n_test for c in LABEL_COLUMNS}},
        schema={"id": pl.Int64, **dict.fromkeys(LABEL_COLUMNS, pl.Float64)},
    )
    return SampleData(
        train=frames["train"], test=frames["test"], sample_submission=submission, traps=trap_ids
    )


def generate_competition_files(
    out_dir: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0, traps: bool = True
) -> SampleFiles:
    """Write train.csv, test.csv, sample_submission.csv (LMSYS format) in `out_dir`; same seed, same bytes."""
    data = generate_competition_frames(n_train=n_train, n_test=n_test, seed=seed, traps=traps)
    return _write_sample_files(out_dir, data, ".csv")


def _write_sample_files(out_dir: str | Path, data: Any, suffix: str) -> SampleFiles:
    """train/test in the competition's file type (`.csv` LMSYS, `.parquet` WSDM) and sample_submission.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = SampleFiles(
        train_csv=out / f"train{suffix}",
        test_csv=out / f"test{suffix}",
        sample_submission_csv=out / "sample_submission.csv",
        traps=data.traps,
    )
    for frame, path in ((data.train, files.train_csv), (data.test, files.test_csv)):
        if suffix == ".parquet":
            frame.write_parquet(path)
        else:
            frame.write_csv(path)
    data.sample_submission.write_csv(files.sample_submission_csv, float_precision=6)
    return files


def _make_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Increasing, unique, Kaggle-looking integer ids (the real train file is sorted by id)."""
    return 30_000 + np.cumsum(rng.integers(1, 150_000, size=n))


def _lognormal_chars(rng: np.random.Generator, median: float, sigma: float, size: int) -> np.ndarray:
    values = rng.lognormal(mean=np.log(median), sigma=sigma, size=size)
    return np.clip(values, 1, MAX_FIELD_CHARS).astype(np.int64)


def _generate_rows(
    rng: np.random.Generator, text: _TextMaker, n: int, long_rows: set[int], desc: str
) -> list[_Row]:
    """Clean rows with labels from the hidden score; traps are applied afterwards."""
    n_models = len(_MODELS)
    multi = rng.random(n) < MULTI_TURN_RATE
    turn_choices = np.array(list(TURN_COUNT_PROBS))
    turns = np.where(multi, rng.choice(turn_choices, size=n, p=list(TURN_COUNT_PROBS.values())), 1)
    shared = rng.random(n) < SHARED_PROMPT_RATE
    first_model = rng.integers(n_models, size=n)
    second_model = (first_model + 1 + rng.integers(n_models - 1, size=n)) % n_models
    label_noise = rng.random(n) < LABEL_NOISE
    noise_labels = rng.choice(3, size=n, p=[0.349, 0.342, 0.309])
    rows: list[_Row] = []
    for i in progress_bar(range(n), desc=desc, unit="row", enabled=n >= 20_000, mininterval=1.0):
        if shared[i] and rows:
            source = rows[int(rng.integers(len(rows)))]
            prompt = list(source.prompt)
        else:
            lengths = _lognormal_chars(rng, PROMPT_MEDIAN_CHARS, PROMPT_SIGMA, int(turns[i]))
            prompt = [text.question(int(length)) for length in lengths]
        model_a, model_b = _MODELS[int(first_model[i])], _MODELS[int(second_model[i])]
        side_a, score_a = _response(rng, text, model_a, len(prompt), long=i in long_rows)
        side_b, score_b = _response(rng, text, model_b, len(prompt), long=False)
        diff = score_a - score_b + POSITION_BIAS
        label = 2 if abs(diff) < TIE_MARGIN else (0 if diff > 0 else 1)
        if label_noise[i]:
            label = int(noise_labels[i])
        rows.append(_Row(prompt, side_a, side_b, model_a[0], model_b[0], label))
    return rows


def _response(
    rng: np.random.Generator,
    text: _TextMaker,
    model: tuple[str, float, float, float],
    n_turns: int,
    long: bool,
) -> tuple[list[str], float]:
    """One side of a conversation and its hidden quality score (judged on the last turn, like the voters)."""
    _, verbosity, markdown_rate, refusal_rate = model
    refusal = rng.random() < refusal_rate * 1.1
    markdown = (not refusal) and rng.random() < markdown_rate
    turn_median = RESPONSE_MEDIAN_CHARS * verbosity * (0.75 if n_turns > 1 else 1.0)
    lengths = _lognormal_chars(rng, turn_median, RESPONSE_SIGMA, n_turns)
    if long:
        lengths[-1] = int(rng.integers(25_000, MAX_FIELD_CHARS))
    turns = []
    for t, length in enumerate(lengths):
        last = t == n_turns - 1
        if last and refusal:
            turns.append(_REFUSALS[int(rng.integers(len(_REFUSALS)))])
        elif markdown if last else rng.random() < markdown_rate:
            turns.append(text.markdown(int(length)))
        else:
            turns.append(text.plain(int(length)))
    total_chars = sum(len(turn) for turn in turns)
    score = (
        LENGTH_WEIGHT * float(np.log(max(total_chars, 1) / RESPONSE_MEDIAN_CHARS))
        + MARKDOWN_WEIGHT * markdown
        + REFUSAL_WEIGHT * refusal
        + SCORE_NOISE * float(rng.normal())
    )
    return turns, score


def _plan_traps(rng: np.random.Generator, n: int) -> dict[str, list[int]]:
    """Distinct row indices per trap kind: rate * n rows, at least one each while the file has room."""
    counts = {kind: max(1, round(rate * n)) for kind, rate in TRAP_RATES.items()}
    order = rng.permutation(n).tolist()
    plan: dict[str, list[int]] = {}
    used = 0
    for kind, count in counts.items():
        take = order[used : used + count]
        if not take:
            break
        plan[kind] = sorted(take)
        used += len(take)
    return plan


def _apply_trap(kind: str, row: _Row, rng: np.random.Generator, split: str) -> None:
    """Turn a clean row into one carrying `kind` (raw cells are the exact text written to the CSV)."""
    if kind == "unparseable":
        words = row.response_b[-1].split()[:8] or ["Hello", "there"]
        row.raw["response_b"] = "[" + " ".join(words).replace('"', "") + ", and so on]"
    elif kind == "null_turn":
        if len(row.prompt) > 1:
            row.raw["response_a"] = json.dumps([*row.response_a[:-1], None], ensure_ascii=False)
        else:
            row.raw["response_a"] = "[null]"
    elif kind == "both_responses_null":
        row.raw["response_a"] = row.raw["response_b"] = json.dumps([None] * len(row.prompt))
    elif kind == "empty_list":
        row.raw["response_b"] = "[]"
    elif kind == "both_responses_empty":
        row.response_a = [""] * len(row.prompt)
        row.response_b = [""] * len(row.prompt)
    elif kind == "empty_prompt":
        row.prompt = [""] * len(row.prompt)
    elif kind == "missing_cell":
        row.raw["response_a"] = None
    elif kind == "lone_surrogate":
        row.response_a[-1] = _insert(row.response_a[-1], f" {_LONE_SURROGATE_MARK} ", rng)
    elif kind == "surrogate_pair":
        row.response_b[-1] = _insert(row.response_b[-1], f" {_SURROGATE_PAIR_MARK} ", rng)
    elif kind == "nul_character":
        row.response_a[-1] = _insert(row.response_a[-1], _NUL_MARK, rng)
    elif kind == "special_characters":
        tricky = ' She said "yes, of course", then left.\n\tPath: C:\\temp\\new, "quoted, text"\n\n'
        row.response_a[-1] = _insert(row.response_a[-1], tricky, rng)
        row.prompt[-1] = row.prompt[-1] + " Answer with \"a, b\" or 'c'.\nThanks,\n"
    elif kind == "very_long_field":
        pass  # generated long in _generate_rows
    elif kind == "turn_count_mismatch":
        row.prompt = [*row.prompt, "Can you say more about that?"]
    elif kind == "python_literal_list":
        # both quote kinds in the text make repr() use single quotes with \' escapes: not JSON
        row.raw["prompt"] = repr([*row.prompt[:-1], row.prompt[-1] + " It's \"fine\", isn't it?"])
    elif kind == "truncated_list":
        full = json.dumps(row.response_b, ensure_ascii=False)
        row.raw["response_b"] = full[: max(3, int(len(full) * 0.6))]
    elif kind == "unescaped_quotes":
        content = row.response_a[-1].replace('"', "")
        row.raw["response_a"] = (
            '["He said "yes" to the plan, then left. ' + content.replace("\n", "\\n") + '"]'
        )
        if len(row.prompt) > 1:
            row.prompt = row.prompt[-1:]
            row.response_b = row.response_b[-1:]
    elif kind == "bare_string":
        row.raw["response_b"] = json.dumps(row.response_b[-1], ensure_ascii=False)
        if len(row.prompt) > 1:
            row.prompt = row.prompt[-1:]
            row.response_a = row.response_a[-1:]
    elif kind == "identical_responses_non_tie":
        row.response_b = list(row.response_a)
        row.label = int(rng.integers(2)) if split == "train" else row.label
    else:
        raise ValueError(f"unknown trap kind {kind!r}")


def _insert(text: str, piece: str, rng: np.random.Generator) -> str:
    """Insert `piece` at a word boundary inside `text` (or append it)."""
    spaces = [i for i, c in enumerate(text[:2000]) if c == " "]
    if not spaces:
        return text + piece
    at = spaces[int(rng.integers(len(spaces)))]
    return text[:at] + piece + text[at:]


def _to_json(turns: list[str]) -> str:
    dumped = json.dumps(turns, ensure_ascii=False)
    if "QQ" in dumped:
        for mark, escape in _ESCAPE_MARKS.items():
            dumped = dumped.replace(mark, escape)
    return dumped


def _to_frame(rows: list[_Row], ids: list[int], with_labels: bool) -> pl.DataFrame:
    columns: dict[str, list[Any]] = {"id": ids}
    if with_labels:
        columns["model_a"] = [row.model_a for row in rows]
        columns["model_b"] = [row.model_b for row in rows]
    for name in ("prompt", "response_a", "response_b"):
        columns[name] = [row.raw[name] if name in row.raw else _to_json(getattr(row, name)) for row in rows]
    if with_labels:
        for k, column in enumerate(LABEL_COLUMNS):
            columns[column] = [int(row.label == k) for row in rows]
    schema = {name: pl.String for name in columns}
    schema["id"] = pl.Int64
    if with_labels:
        schema.update(dict.fromkeys(LABEL_COLUMNS, pl.Int64))
    return pl.DataFrame(columns, schema=schema)


# ------------------------------------------------------------------------------------------------------ WSDM
WSDM_LANGUAGES: dict[
    str, tuple[float, str]
] = {  # language -> (share of rows, a phrase in it added to the prompt)
    "English": (0.55, ""),
    "Russian": (0.12, "Пожалуйста, ответь подробно. "),
    "Chinese": (0.12, "请详细回答这个问题。"),
    "Spanish": (0.11, "Por favor, responde con detalle. "),
    "German": (0.10, "Bitte antworte ausführlich. "),
}
# WSDM cells are plain parquet strings: no JSON traps; these are the traps that format still has.
WSDM_TRAP_RATES: dict[str, float] = {
    "null_response": 0.005,  # a missing response (parquet null)
    "empty_prompt": 0.002,
    "both_responses_empty": 0.002,
    "nul_character": 0.002,
    "identical_responses_non_tie": 0.003,
}


def generate_wsdm_frames(
    n_train: int = 2000, n_test: int = 200, seed: int = 0, traps: bool = True
) -> SampleData:
    """The WSDM Cup files as polars frames: train (`id` strings, plain-string prompt/responses, `winner`
    model_a|model_b, model names, `language`), test (`id` integers, `scored`), sample_submission (`id, winner`).

    Same hidden-score signal as the LMSYS sample; rows the score calls a tie are not kept (WSDM has no tie
    class), so rows are generated until `n_train + n_test` remain. Multi-turn rows are joined into one string
    per side (WSDM cells hold one turn)."""
    rng = np.random.default_rng(seed)
    text = _TextMaker(rng)
    needed = n_train + n_test
    rows: list[_Row] = []
    while len(rows) < needed:
        batch = _generate_rows(
            rng, text, max(64, int((needed - len(rows)) * 1.6)), set(), desc="generating wsdm"
        )
        rows += [row for row in batch if row.label != 2]
    rows = rows[:needed]
    languages = list(WSDM_LANGUAGES)
    shares = np.array([share for share, _ in WSDM_LANGUAGES.values()])
    language = rng.choice(len(languages), size=needed, p=shares / shares.sum())
    cells: list[dict[str, Any]] = []
    for row, lang in zip(rows, language, strict=True):
        phrase = WSDM_LANGUAGES[languages[lang]][1]
        cells.append(
            {
                "prompt": phrase + "\n\n".join(row.prompt),
                "response_a": "\n\n".join(row.response_a),
                "response_b": "\n\n".join(row.response_b),
                "winner": ("model_a", "model_b")[row.label],
                "model_a": row.model_a,
                "model_b": row.model_b,
                "language": languages[lang],
            }
        )
    order = rng.permutation(needed)
    train_cells = [cells[i] for i in order[:n_train]]
    test_cells = [cells[i] for i in order[n_train:]]
    train_ids = [rng.bytes(20).hex() for _ in range(n_train)]
    test_ids = (1_000_000 + np.cumsum(rng.integers(1, 5_000, size=n_test))).tolist()
    trap_ids: dict[str, dict[str, list]] = {}
    for split, split_cells, ids in (("train", train_cells, train_ids), ("test", test_cells, test_ids)):
        plan = _plan_wsdm_traps(rng, len(split_cells)) if traps else {}
        for kind, indices in plan.items():
            for index in indices:
                _apply_wsdm_trap(kind, split_cells[index], rng)
        trap_ids[split] = {kind: [ids[i] for i in indices] for kind, indices in plan.items()}
    train = pl.DataFrame(
        {
            "id": train_ids,
            **{
                c: [cell[c] for cell in train_cells]
                for c in ("prompt", "response_a", "response_b", "winner", "model_a", "model_b", "language")
            },
        },
        schema={
            "id": pl.String,
            **dict.fromkeys(
                ("prompt", "response_a", "response_b", "winner", "model_a", "model_b", "language"), pl.String
            ),
        },
    )
    test = pl.DataFrame(
        {
            "id": test_ids,
            **{c: [cell[c] for cell in test_cells] for c in ("prompt", "response_a", "response_b")},
            "scored": (rng.random(n_test) < 0.5).tolist(),
        },
        schema={
            "id": pl.Int64,
            "prompt": pl.String,
            "response_a": pl.String,
            "response_b": pl.String,
            "scored": pl.Boolean,
        },
    )
    submission = pl.DataFrame(
        {"id": test_ids, "winner": ["model_a"] * n_test}, schema={"id": pl.Int64, "winner": pl.String}
    )
    return SampleData(train=train, test=test, sample_submission=submission, traps=trap_ids)


def generate_wsdm_files(
    out_dir: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0, traps: bool = True
) -> SampleFiles:
    """Write train.parquet, test.parquet, sample_submission.csv (WSDM Cup format) in `out_dir`."""
    data = generate_wsdm_frames(n_train=n_train, n_test=n_test, seed=seed, traps=traps)
    return _write_sample_files(out_dir, data, ".parquet")


def _plan_wsdm_traps(rng: np.random.Generator, n: int) -> dict[str, list[int]]:
    counts = {kind: max(1, round(rate * n)) for kind, rate in WSDM_TRAP_RATES.items()}
    order = rng.permutation(n).tolist()
    plan: dict[str, list[int]] = {}
    used = 0
    for kind, count in counts.items():
        take = order[used : used + count]
        if not take:
            break
        plan[kind] = sorted(take)
        used += len(take)
    return plan


def _apply_wsdm_trap(kind: str, cell: dict[str, Any], rng: np.random.Generator) -> None:
    if kind == "null_response":
        cell["response_b" if rng.random() < 0.5 else "response_a"] = None
    elif kind == "empty_prompt":
        cell["prompt"] = ""
    elif kind == "both_responses_empty":
        cell["response_a"] = cell["response_b"] = ""
    elif kind == "nul_character":
        cell["response_a"] = _insert(cell["response_a"], "\x00", rng)
    elif kind == "identical_responses_non_tie":
        cell["response_b"] = cell["response_a"]
    else:
        raise ValueError(f"unknown WSDM trap kind {kind!r}")


# ----------------------------------------------------------------------------------------------------- stats
def sample_stats(frame: pl.DataFrame) -> dict[str, Any]:
    """Shape of a loaded frame (ARCHITECTURE.md layout): class balance, turns, shared prompts, lengths."""
    prompt_key = frame["prompt"].list.join("\n")
    response_chars = pl.concat(
        [frame[c].list.join("\n").str.len_chars() for c in ("response_a", "response_b")]
    ).cast(pl.Float64)
    stats: dict[str, Any] = {
        "rows": frame.height,
        "distinct_prompts": prompt_key.n_unique(),
        "multi_turn_share": float((frame["prompt"].list.len() > 1).mean() or 0.0),
        "response_chars_median": float(response_chars.median() or 0.0),
        "response_share_over_5000": float((response_chars > 5000).mean() or 0.0),
        "responses_over_20000": int((response_chars > 20000).sum()),
        "prompt_chars_median": float(frame["prompt"].list.join("\n").str.len_chars().median() or 0.0),
    }
    labels = frame["label"].drop_nulls()
    if labels.len():
        stats["class_balance"] = {
            name: float((labels == k).mean()) for k, name in enumerate(("a", "b", "tie"))
        }
    return stats
