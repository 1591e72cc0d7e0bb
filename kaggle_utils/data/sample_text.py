"""Generated conversations: English-like text, responses with a hidden quality score, labelled rows.

The label follows the score (longer wins, refusals lose, markdown helps, ties when close, plus noise); the
constants below set the real-data shape. Usage: `rows = generate_rows(rng, TextMaker(rng), n, set(), "rows")`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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


@dataclass
class SampleRow:
    """One generated conversation: turns per side, model names, label (0 A, 1 B, 2 tie), trap overrides."""

    prompt: list[str]
    response_a: list[str]
    response_b: list[str]
    model_a: str
    model_b: str
    label: int
    raw: dict[str, str | None] = field(default_factory=dict)  # cells overridden by a trap (exact text)


# ------------------------------------------------------------------------------------------------- text
class TextMaker:
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


def _lognormal_chars(rng: np.random.Generator, median: float, sigma: float, size: int) -> np.ndarray:
    values = rng.lognormal(mean=np.log(median), sigma=sigma, size=size)
    return np.clip(values, 1, MAX_FIELD_CHARS).astype(np.int64)


def generate_rows(
    rng: np.random.Generator, text: TextMaker, n: int, long_rows: set[int], desc: str
) -> list[SampleRow]:
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
    rows: list[SampleRow] = []
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
        rows.append(SampleRow(prompt, side_a, side_b, model_a[0], model_b[0], label))
    return rows


def _response(
    rng: np.random.Generator,
    text: TextMaker,
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
