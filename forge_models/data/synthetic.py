"""The corpus every phase trains and evaluates on: a seeded synthetic generator plus real text files.

Four synthetic families exercise what the pipeline claims to improve, each in a form that can be
*checked*, not only scored by perplexity:

- ``arithmetic``: multi-step problems with a worked answer; checked by exact match of the final number.
- ``tool``: calculator tool-call episodes; checked by whether the call parses and evaluates correctly.
- ``persona``: dialogues of the assistant "Forge" (helpful, concise, honest); multiple choice.
- ``narrative``: short templated stories with a comprehension question; multiple choice.
- ``system``: dialogues whose right reply depends on a system prompt (a persona's rules, the tools it
  offers; :mod:`forge_models.data.system_prompts`); checked through the tool loop and rule checkers.

Real corpora (txt / jsonl / parquet) become examples of kind ``text``, used for training and perplexity.
Held-out-only corpora (``data.eval_sources``) become ``text`` examples carrying their source's name, cut
into units (chunks or documents) that go to validation or test only, by a hash of (name, unit index);
see :func:`eval_source_units` and :func:`eval_unit_split`.

Splits are disjoint *by canonical content*: each canonical key (a normalised calculation ``a op b``
shared by arithmetic steps, tool calls and the persona's sums; a persona situation; a story; see
:mod:`forge_models.data.keys`) belongs to one split by the sha256 of the key, and an example goes to the
split its keys share (examples whose keys disagree are dropped). So no calculation, situation or story is
both trained on and held out, in this run or any other with the same percentages, whatever its wording.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from forge_models.config import DATA_KINDS, DataConfig, EvalSourceConfig, SourceConfig, SyntheticConfig
from forge_models.data.facts import fact_table
from forge_models.data.keys import QUESTION_MARK, canonical_keys
from forge_models.data.system_prompts import system_dialogue
from forge_models.runtime import ConfigError

SPLITS = ("train", "validation", "test")

# Source weights are realised by replicating documents in the train split; a larger ratio between the
# heaviest and the lightest source would multiply memory for little benefit.
MAX_SOURCE_WEIGHT_RATIO = 100


@dataclass(frozen=True)
class Example:
    """One training / evaluation example.

    Attributes:
        kind: one of DATA_KINDS (arithmetic, tool, persona, narrative, text, system).
        text: the full text used for training and perplexity.
        prompt: for answer-checked tasks, the prompt given to the model ("" otherwise).
        answer: exact expected answer (arithmetic: final number; tool: the numeric result; system: the
            final number, "" when the reply is not a number).
        choices: multiple-choice continuations of the prompt (persona, narrative).
        label: index of the correct choice (-1 when there are no choices).
        source: the name of the held-out-only eval source (``data.eval_sources``) a ``text`` unit comes
            from; "" for every other example (synthetic, or ``data.sources`` documents).
    """

    kind: str
    text: str
    prompt: str = ""
    answer: str = ""
    choices: tuple[str, ...] = ()
    label: int = -1
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"unknown example kind {self.kind!r}; expected one of {list(DATA_KINDS)}")
        if self.source and (self.kind != "text" or self.prompt or self.choices):
            raise ConfigError(f"an eval-source unit ({self.source!r}) must be plain 'text', got a {self.kind} example")
        if self.choices and not 0 <= self.label < len(self.choices):
            raise ConfigError(f"label {self.label} is not an index of the {len(self.choices)} choices {self.choices!r}")
        if not self.choices and self.label != -1:
            raise ConfigError(f"label {self.label} given for a {self.kind} example without choices")


@dataclass(frozen=True)
class Corpus:
    """Train / validation / test examples, disjoint by content hash."""

    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]

    def split(self, name: str) -> tuple[Example, ...]:
        """The examples of split ``name`` ("train", "validation" or "test")."""
        if name not in SPLITS:
            raise ConfigError(f"unknown split {name!r}; use one of {list(SPLITS)}")
        return getattr(self, name)

    def digest(self) -> str:
        """sha256 hex of every split's content, in order; identical in every process and platform."""
        h = hashlib.sha256()
        for name in SPLITS:
            h.update(f"[{name}]\n".encode())
            for ex in self.split(name):
                h.update(_to_json_line(ex).encode())
                h.update(b"\n")
        return h.hexdigest()

    def save(self, folder: Path) -> None:
        """Write train.jsonl, validation.jsonl and test.jsonl (one example per line) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in SPLITS:
            with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for ex in self.split(name):
                    f.write(_to_json_line(ex) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "Corpus":
        """Read a corpus written by :meth:`save`; a missing or malformed file raises ConfigError naming it."""
        folder = Path(folder)
        splits = {name: tuple(_read_examples_file(folder / f"{name}.jsonl")) for name in SPLITS}
        return cls(**splits)


# ------------------------------------------------------------------------------ (de)serialisation


def _to_json_line(ex: Example) -> str:
    # sort_keys + ensure_ascii make the bytes independent of dict order and locale (the digest uses them).
    fields = asdict(ex)
    if not fields["source"]:
        # Absent, not "": lines (and so Corpus.digest and every cache keyed on it) of corpora without eval
        # sources stay byte-identical to those written before the field existed.
        del fields["source"]
    return json.dumps(fields, sort_keys=True, ensure_ascii=True)


def _read_examples_file(path: Path) -> list[Example]:
    if not path.is_file():
        raise ConfigError(f"corpus file {path} is missing")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"corpus file {path} is not valid UTF-8: {exc}") from exc
    return [_example_from_json(line, path, number) for number, line in enumerate(lines, 1) if line.strip()]


def _example_from_json(line: str, path: Path, number: int) -> Example:
    where = f"corpus file {path}, line {number}"
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str) or not isinstance(raw.get("text"), str):
        raise ConfigError(f"{where}: expected an object with string fields 'kind' and 'text'")
    try:
        return Example(
            kind=raw["kind"],
            text=raw["text"],
            prompt=str(raw.get("prompt", "")),
            answer=str(raw.get("answer", "")),
            choices=tuple(str(c) for c in raw.get("choices", ())),
            label=int(raw.get("label", -1)),
            source=str(raw.get("source", "")),
        )
    except (TypeError, ValueError, ConfigError) as exc:
        raise ConfigError(f"{where}: malformed example ({exc})") from exc


# ------------------------------------------------------------------------------------- arithmetic

_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}


def _arithmetic(
    rng: random.Random, max_operand: int, min_ops: int = 1, max_ops: int = 3, op_chars: str = "+-*"
) -> Example:
    """A 1-3 operation problem whose worked answer evaluates '*' before '+'/'-', left to right.

    ``min_ops`` / ``max_ops`` / ``op_chars`` are difficulty knobs (the Forge loop's curriculum); their
    defaults draw exactly what the corpus always drew, so generated data stays byte-identical.
    """
    n_ops = rng.randint(min_ops, max_ops)
    numbers = [rng.randint(1, max_operand) for _ in range(n_ops + 1)]
    ops = [rng.choice(op_chars) for _ in range(n_ops)]
    question = " ".join([str(numbers[0])] + [f"{op} {n}" for op, n in zip(ops, numbers[1:])])
    steps, result = _worked_steps(numbers, ops)
    prompt = f"Q: What is {question}?\nA:"
    text = f"{prompt} {' '.join(steps)} The answer is {result}.\n"
    return Example(kind="arithmetic", text=text, prompt=prompt, answer=str(result))


def _worked_steps(numbers: list[int], ops: list[str]) -> tuple[list[str], int]:
    """Reduce the expression one operation at a time, writing each step as "a op b = c."."""
    numbers, ops, steps = list(numbers), list(ops), []
    for precedence in ("*", "+-"):
        i = 0
        while i < len(ops):
            if ops[i] in precedence:
                a, op, b = numbers[i], ops[i], numbers[i + 1]
                value = _OPS[op](a, b)
                steps.append(f"{a} {op} {b} = {value}.")
                numbers[i : i + 2] = [value]
                del ops[i]
            else:
                i += 1
    return steps, numbers[0]


# ------------------------------------------------------------------------------------------- tool

# Question templates per operator; varied wording so the model must map language to the call.
_TOOL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": (
        "What is {a} plus {b}?",
        "Compute {a} + {b}.",
        "What do you get when you add {a} and {b}?",
        "Please calculate {a} plus {b}.",
        "Add {a} to {b}.",
    ),
    "-": (
        "What is {a} minus {b}?",
        "Compute {a} - {b}.",
        "What do you get when you subtract {b} from {a}?",
        "Please calculate {a} minus {b}.",
        "Take {b} away from {a}.",
    ),
    "*": (
        "What is {a} times {b}?",
        "Compute {a} * {b}.",
        "What do you get when you multiply {a} by {b}?",
        "Please calculate {a} times {b}.",
        "What is the product of {a} and {b}?",
    ),
}


def _tool(rng: random.Random, max_operand: int, op_chars: str = "+-*") -> Example:
    """A calculator episode: the assistant calls the tool, reads its result and states the answer.

    ``op_chars`` is a difficulty knob (default: every operator, as the corpus always drew).
    """
    op = rng.choice(op_chars)
    a, b = rng.randint(2, max_operand), rng.randint(2, max_operand)
    question = rng.choice(_TOOL_TEMPLATES[op]).format(a=a, b=b)
    result = _OPS[op](a, b)
    prompt = f"User: {question}\nAssistant:"
    text = (
        f"{prompt} <tool>calculator({a} {op} {b})</tool>\n"
        f"Tool: {result}\n"
        f"Assistant: The answer is {result}.\n"
    )
    return Example(kind="tool", text=text, prompt=prompt, answer=str(result))


def _calculation(rng: random.Random, max_operand: int, op_chars: str = "+-*") -> tuple[str, str, int]:
    """(question in words, "a op b", value) of one calculator-sized calculation."""
    op = rng.choice(op_chars)
    a, b = rng.randint(2, max_operand), rng.randint(2, max_operand)
    return rng.choice(_TOOL_TEMPLATES[op]).format(a=a, b=b), f"{a} {op} {b}", _OPS[op](a, b)


# ----------------------------------------------------------------------------------------- system


def _system(rng: random.Random, max_operand: int, facts: dict[str, str]) -> Example:
    """A system-prompt conditioned dialogue (persona rules and tool instructions; see system_prompts)."""
    prompt, completion, answer = system_dialogue(rng, lambda r: _calculation(r, max_operand), facts)
    return Example(kind="system", text=prompt + completion, prompt=prompt, answer=answer)


# ---------------------------------------------------------------------------------------- persona

_USER_NAMES = (
    "Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mo",
    "Nia", "Omar", "Pia", "Quinn", "Ravi", "Sara", "Tom", "Uma", "Vic", "Wen", "Yara", "Zoe",
)
_TASKS = (
    "my homework", "a cover letter", "a shopping list", "my budget", "a birthday message", "my resume",
    "a recipe", "my travel plan", "a short poem", "an email to my boss", "my study schedule",
    "a bug in my code",
)
_CITIES = ("Paris", "Lagos", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Seoul", "Rome")
_TOPICS = ("the stock market", "the lottery", "tomorrow's football match", "the next election", "the weather next month")


def _persona_qa(rng: random.Random) -> tuple[str, str, list[str]]:
    """(question, persona-consistent reply, inconsistent replies) for one random persona situation.

    The wrong replies each break one trait: a different identity, unhelpful, rambling, or dishonest.
    """
    task = rng.choice(_TASKS)
    city = rng.choice(_CITIES)
    topic = rng.choice(_TOPICS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    situations: list[tuple[str, str, list[str]]] = [
        (
            "What is your name?",
            " My name is Forge.",
            [" My name is Alex.", " I am a human named Sam.", " I would rather not say who I am."],
        ),
        (
            "Who are you?",
            " I am Forge, a helpful assistant.",
            [" I am your neighbour.", " Nobody. Go away.", " I am a famous movie star."],
        ),
        (
            "Are you a human?",
            " No. I am Forge, an AI assistant.",
            [" Yes, I am a human.", " Yes, I live in a house with my family.", " Why do you care?"],
        ),
        (
            f"Can you help me with {task}?",
            f" Yes. Tell me about {task} and we will start.",
            [
                " No. Do it yourself.",
                f" I already finished {task} for you yesterday.",
                f" Well, {task} is a thing that many people have, and there are many ways to think about it.",
            ],
        ),
        (
            f"What is the weather in {city} right now?",
            f" I cannot check live weather, so I do not know the weather in {city} right now.",
            [
                f" It is sunny and 24 degrees in {city} right now.",
                f" It is raining hard in {city} right now.",
                " Weather is not my problem.",
            ],
        ),
        (
            f"What will happen with {topic}?",
            f" I cannot predict {topic}. Nobody knows the future for sure.",
            [
                f" I know exactly what will happen with {topic}.",
                f" {topic.capitalize()} will go up, I promise.",
                " Ask someone else.",
            ],
        ),
        (
            f"Quick question: what is {a} plus {b}?",
            f" {a + b}.",
            [
                f" {a + b + rng.randint(1, 5)}.",
                " I do not do math.",
                f" Great question! Adding numbers is a wonderful skill, and when we add {a} and {b} we combine them.",
            ],
        ),
        (
            "Did you make a mistake in your last answer?",
            " Possibly. Please show me the answer and I will check it honestly.",
            [" I never make mistakes.", " No, and stop asking.", " Yes, I always make mistakes on purpose."],
        ),
        (
            "Please answer in one word: is water wet?",
            " Yes.",
            [
                " Well, that depends on many things, such as what we mean by wet and who is asking.",
                " No.",
                " I refuse to answer.",
            ],
        ),
    ]
    return rng.choice(situations)


def _persona(rng: random.Random) -> Example:
    """A dialogue turn of the assistant Forge as a multiple-choice example (3-4 candidate replies)."""
    question, correct, wrong = _persona_qa(rng)
    opener = rng.choice(("", "Hi! ", "Hello. ", "Hey! ", f"Hi, I am {rng.choice(_USER_NAMES)}. "))
    prompt = f"User: {opener}{question}\nAssistant:"
    distractors = rng.sample(wrong, rng.randint(2, min(3, len(wrong))))
    return _multiple_choice("persona", prompt, correct, distractors, rng, suffix="\n")


def _multiple_choice(
    kind: str, prompt: str, correct: str, distractors: Sequence[str], rng: random.Random, suffix: str
) -> Example:
    """Shuffle the correct choice among distractors; the training text is prompt + correct choice."""
    choices = [correct, *distractors]
    rng.shuffle(choices)
    return Example(
        kind=kind,
        text=prompt + correct + suffix,
        prompt=prompt,
        choices=tuple(choices),
        label=choices.index(correct),
    )


# -------------------------------------------------------------------------------------- narrative

_NAMES = (
    "Mia", "Leo", "Ava", "Sam", "Ivy", "Max", "Zoe", "Tim", "Lily", "Noah", "Emma", "Jack", "Ruby",
    "Finn", "Ella", "Owen", "Nora", "Luke", "Rosa", "Adam",
)
_OBJECTS = ("ball", "kite", "hat", "cup", "book", "box", "bike", "boat", "scarf", "bag", "drum", "lamp")
_COLORS = ("red", "blue", "green", "yellow", "white", "black", "pink", "brown")
_PLACES = ("park", "beach", "school", "garden", "market", "library", "farm", "lake", "forest", "zoo")
_FEELINGS = ("happy", "sad", "tired", "excited", "calm", "surprised")


def _narrative(rng: random.Random) -> Example:
    """A short story and a comprehension question about one of its facts (multiple choice)."""
    hero, friend = rng.sample(_NAMES, 2)
    obj, friend_obj = rng.sample(_OBJECTS, 2)
    color, friend_color = rng.sample(_COLORS, 2)
    place = rng.choice(_PLACES)
    feeling = rng.choice(_FEELINGS)
    story = (
        f"{hero} had a {color} {obj}. One day {hero} took the {obj} to the {place}. "
        f"At the {place}, {hero} met {friend}, who had a {friend_color} {friend_obj}. "
        f"They played together until the sun went down, and {hero} felt {feeling}."
    )
    # (question, correct answer, pool of candidate answers) for each fact the story states.
    facts = [
        (f"What color was {hero}'s {obj}?", color, _COLORS),
        (f"What color was {friend}'s {friend_obj}?", friend_color, _COLORS),
        (f"Where did {hero} take the {obj}?", place, _PLACES),
        (f"Who did {hero} meet?", friend, _NAMES),
        (f"What did {friend} have?", f"a {friend_obj}", tuple(f"a {o}" for o in _OBJECTS)),
        (f"How did {hero} feel?", feeling, _FEELINGS),
    ]
    question, answer, pool = rng.choice(facts)
    n_wrong = rng.randint(2, 3)
    # Distractors exclude everything named in the story for this slot's pool, so only one is right.
    stated = {color, friend_color, place, hero, friend, f"a {obj}", f"a {friend_obj}", feeling}
    distractors = [f" {c}" for c in rng.sample([c for c in pool if c not in stated], n_wrong)]
    prompt = f"{story}{QUESTION_MARK} {question}\nAnswer:"
    return _multiple_choice("narrative", prompt, f" {answer}", distractors, rng, suffix=".\n")


# -------------------------------------------------------------------------------------- generator


def generate_synthetic(cfg: SyntheticConfig, seed: int) -> list[Example]:
    """``cfg.n_examples`` examples mixed by ``cfg.kinds`` weights; the same seed gives the same list.

    Counts per kind are the largest-remainder rounding of the weights, so the mix is exact, not sampled.
    """
    rng = random.Random(seed)
    counts = _allocate(cfg.n_examples, cfg.kinds)
    order = [kind for kind, n in counts.items() for _ in range(n)]
    rng.shuffle(order)
    facts = dict(fact_table())  # what the lookup tool returns; the same table the harness' tool reads
    makers: dict[str, Callable[[], Example]] = {
        "arithmetic": lambda: _arithmetic(rng, cfg.max_operand),
        "tool": lambda: _tool(rng, cfg.max_operand),
        "persona": lambda: _persona(rng),
        "narrative": lambda: _narrative(rng),
        "system": lambda: _system(rng, cfg.max_operand, facts),
    }
    return [makers[kind]() for kind in order]


def _allocate(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``total`` into integer counts proportional to ``weights`` (largest remainder, stable order)."""
    positive = {k: w for k, w in sorted(weights.items()) if w > 0}
    mass = sum(positive.values())
    exact = {k: total * w / mass for k, w in positive.items()}
    counts = {k: int(v) for k, v in exact.items()}
    leftover = total - sum(counts.values())
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[:leftover]:
        counts[k] += 1
    return counts


# ------------------------------------------------------------------------------------ real corpora


def read_source(src: SourceConfig, path: Path | None = None) -> list[Example]:
    """Documents of one real corpus as ``text`` examples. ``path`` overrides ``src.path`` (a local copy).

    txt: documents separated by blank lines; jsonl: one JSON object per line, field ``src.text_field``;
    parquet: column ``src.text_field``. Empty documents are skipped; a source yielding none is an error.
    """
    file = Path(path) if path is not None else _local_path(src.path)
    if not file.is_file():
        raise ConfigError(f"data source {file} does not exist or is not a file")
    fmt = src.format if src.format != "auto" else _format_from_suffix(file)
    readers = {"txt": _read_txt, "jsonl": _read_jsonl, "parquet": _read_parquet}
    docs = [d for d in readers[fmt](file, src.text_field) if d.strip()]
    if src.max_documents is not None:
        docs = docs[: src.max_documents]
    if not docs:
        raise ConfigError(f"data source {file} contains no non-empty documents")
    return [Example(kind="text", text=d) for d in docs]


def _local_path(url: str) -> Path:
    if url.startswith("s3://"):
        raise ConfigError(
            f"data source {url} is on S3: the orchestration layer must download it and pass the local copy "
            f"to build_corpus(source_paths=...); forge_models reads local files only"
        )
    return Path(url.removeprefix("file://"))


def _format_from_suffix(file: Path) -> str:
    suffix = file.suffix.lower()
    known = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
    if suffix not in known:
        raise ConfigError(f"data source {file}: cannot infer the format from {suffix!r}; set format explicitly")
    return known[suffix]


def _read_utf8(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data source {file} is not valid UTF-8: {exc}") from exc


def _read_txt(file: Path, _field: str) -> list[str]:
    # Normalising line endings first makes "\r\n\r\n" a blank-line separator too.
    text = _read_utf8(file).replace("\r\n", "\n")
    return [doc.strip("\n") for doc in text.split("\n\n")]


def _read_jsonl(file: Path, field: str) -> list[str]:
    docs = []
    for number, line in enumerate(_read_utf8(file).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"data source {file}, line {number}: not valid JSON ({exc})") from exc
        if not isinstance(row, dict) or field not in row:
            raise ConfigError(f"data source {file}, line {number}: no field {field!r} (set text_field)")
        if not isinstance(row[field], str):
            raise ConfigError(f"data source {file}, line {number}: field {field!r} is not a string")
        docs.append(row[field])
    return docs


def _read_parquet(file: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq  # only needed for parquet sources

    try:
        table = pq.read_table(file)
    except Exception as exc:  # pyarrow raises several unrelated types for unreadable files
        raise ConfigError(f"data source {file} is not a readable parquet file: {exc}") from exc
    if field not in table.column_names:
        raise ConfigError(f"data source {file}: no column {field!r} (columns: {table.column_names}; set text_field)")
    values = table.column(field).to_pylist()
    if any(v is not None and not isinstance(v, str) for v in values):
        raise ConfigError(f"data source {file}: column {field!r} is not a string column")
    return [v for v in values if v is not None]


# --------------------------------------------------------------------------------------- splitting


def _split_key(ex: Example) -> str:
    """The one string that decides the split of an example with a single canonical key (kept for callers)."""
    return min(canonical_keys(ex))


def _bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % 100


def key_split(key: str, validation_percent: int, test_percent: int) -> str:
    """The split a canonical key belongs to: a function of the key's hash and the two percentages only."""
    bucket = _bucket(key)
    if bucket < validation_percent:
        return "validation"
    if bucket < validation_percent + test_percent:
        return "test"
    return "train"


def example_split(ex: Example, validation_percent: int, test_percent: int) -> str | None:
    """The split of ``ex``: the split all its canonical keys share, or None when they disagree.

    A multi-step arithmetic problem shows several calculations; if they belong to different splits the
    example is dropped, because keeping it anywhere would put a held-out calculation in another split.
    """
    splits = {key_split(k, validation_percent, test_percent) for k in canonical_keys(ex)}
    return splits.pop() if len(splits) == 1 else None


def held_out_keys(corpus: "Corpus") -> frozenset[str]:
    """Every canonical key of the validation and test splits (what generated training data must avoid)."""
    return frozenset(k for name in ("validation", "test") for ex in corpus.split(name) for k in canonical_keys(ex))


def _dedupe(examples: Sequence[Example]) -> list[Example]:
    """Drop every example whose text or prompt already occurred (first occurrence wins)."""
    seen_texts: set[str] = set()
    seen_prompts: set[str] = set()
    kept = []
    for ex in examples:
        if ex.text in seen_texts or (ex.prompt and ex.prompt in seen_prompts):
            continue
        seen_texts.add(ex.text)
        if ex.prompt:
            seen_prompts.add(ex.prompt)
        kept.append(ex)
    return kept


def split_examples(
    examples: Sequence[Example], validation_percent: int, test_percent: int
) -> dict[str, list[Example]]:
    """Dedupe, then assign each example to the split of its canonical keys (see forge_models.data.keys).

    No canonical key (a calculation, a persona situation, a story) is ever in two splits; examples whose
    keys belong to different splits are dropped (see :func:`example_split`).
    """
    splits: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for ex in _dedupe(examples):
        name = example_split(ex, validation_percent, test_percent)
        if name is not None:
            splits[name].append(ex)
    return splits


def _source_replication(sources: Sequence[SourceConfig]) -> list[int]:
    """How many times each source's documents appear in the train split, from the relative weights."""
    if not sources:
        return []
    lightest = min(s.weight for s in sources)
    ratios = [s.weight / lightest for s in sources]
    if max(ratios) > MAX_SOURCE_WEIGHT_RATIO:
        raise ConfigError(
            f"data.sources weights differ by more than {MAX_SOURCE_WEIGHT_RATIO}x ({[s.weight for s in sources]}); "
            f"weights are realised by repeating documents, so keep them within that ratio"
        )
    return [max(1, round(r)) for r in ratios]


def build_corpus(
    cfg: DataConfig, source_paths: Sequence[Path] | None = None, eval_source_paths: Sequence[Path] | None = None
) -> Corpus:
    """The synthetic corpus plus every real source, split into train / validation / test.

    ``source_paths``, when given, holds one local file per entry of ``cfg.sources`` (same order) and
    replaces that source's path: the orchestration layer downloads s3:// sources and passes the copies.
    ``eval_source_paths`` does the same for ``cfg.eval_sources``.

    Eval-source units (see :func:`eval_source_units`) are appended after the other examples of validation
    and test, never to train; any other example with the same text as a unit is dropped from every split,
    so a held-out-only passage is neither trained on nor pooled.

    Source weights are relative among sources: each source's documents are repeated
    ``round(weight / smallest weight)`` times in the *train* split only (held-out splits keep one copy,
    so evaluation counts each document once). The overall share of real text versus the synthetic kinds
    is set by the sampler's ``text`` weight in the training data mix.
    """
    if source_paths is not None and len(source_paths) != len(cfg.sources):
        raise ConfigError(
            f"build_corpus got {len(source_paths)} source_paths for {len(cfg.sources)} data.sources; "
            f"pass exactly one local path per source"
        )
    if eval_source_paths is not None and len(eval_source_paths) != len(cfg.eval_sources):
        raise ConfigError(
            f"build_corpus got {len(eval_source_paths)} eval_source_paths for {len(cfg.eval_sources)} "
            f"data.eval_sources; pass exactly one local path per eval source"
        )
    # Read before any compute, so a bad eval source fails as early as a bad training source.
    held_units = _held_out_units(cfg, eval_source_paths)
    synthetic = generate_synthetic(cfg.synthetic, cfg.seed)
    per_source = [
        read_source(src, None if source_paths is None else source_paths[i]) for i, src in enumerate(cfg.sources)
    ]
    all_examples = synthetic + [ex for docs in per_source for ex in docs]
    splits = split_examples(all_examples, cfg.validation_percent, cfg.test_percent)
    splits["train"] = _replicate_sources(splits["train"], per_source, _source_replication(cfg.sources))
    for name, exs in splits.items():
        if not exs:
            raise ConfigError(
                f"the {name} split is empty; raise data.synthetic.n_examples or the {name} percentage"
            )
    if held_units:
        taken = {ex.text for units in held_units.values() for ex in units}
        splits = {name: [ex for ex in exs if ex.text not in taken] for name, exs in splits.items()}
        for name, units in held_units.items():
            splits[name].extend(units)
    return Corpus(**{name: tuple(exs) for name, exs in splits.items()})


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """``text`` whitespace-normalised and cut into consecutive chunks, each ending at the first whitespace at
    or after ``chunk_chars`` characters (the last chunk takes the rest); no character is in two chunks."""
    flat = " ".join(text.split())
    chunks: list[str] = []
    at = 0
    while at < len(flat):
        cut = flat.find(" ", at + chunk_chars)
        if cut < 0:
            chunks.append(flat[at:])
            break
        chunks.append(flat[at:cut])
        at = cut + 1
    return chunks


def eval_source_units(src: EvalSourceConfig, path: Path | None = None) -> list[Example]:
    """The evaluation units of one held-out-only source, in file order: chunks of ``src.chunk_chars``
    characters of the whitespace-normalised documents, or (``chunk_chars`` None) one unit per document.

    ``path`` overrides ``src.path`` (a local copy of an s3:// source).
    """
    as_source = SourceConfig(path=src.path, format=src.format, text_field=src.text_field, max_documents=src.max_documents)
    docs = [ex.text for ex in read_source(as_source, path)]
    texts = docs if src.chunk_chars is None else chunk_text(" ".join(docs), src.chunk_chars)
    return [Example(kind="text", text=t, source=src.source_name) for t in texts]


def eval_unit_split(name: str, index: int, validation_percent: int, test_percent: int) -> str:
    """"validation" or "test" (never "train") for unit ``index`` of eval source ``name``: a function of the
    sha256 of (name, index), so every process assigns it alike, in the two splits' relative proportion."""
    digest = hashlib.sha256(f"eval-source\x00{name}\x00{index}".encode("utf-8")).hexdigest()
    return "validation" if int(digest, 16) % (validation_percent + test_percent) < validation_percent else "test"


def _held_out_units(cfg: DataConfig, paths: Sequence[Path] | None) -> dict[str, list[Example]]:
    """Every eval source's units by held-out split; a unit whose text already occurred (in this or an earlier
    source) is dropped, so validation and test never share a passage. Empty when there are no eval sources."""
    if not cfg.eval_sources:
        return {}
    out: dict[str, list[Example]] = {"validation": [], "test": []}
    seen: set[str] = set()
    for i, src in enumerate(cfg.eval_sources):
        units = eval_source_units(src, None if paths is None else paths[i])
        placed = {"validation": 0, "test": 0}
        for index, ex in enumerate(units):
            if ex.text in seen:
                continue
            seen.add(ex.text)
            split = eval_unit_split(src.source_name, index, cfg.validation_percent, cfg.test_percent)
            out[split].append(ex)
            placed[split] += 1
        missing = [split for split, n in placed.items() if n == 0]
        if missing:
            raise ConfigError(
                f"data.eval_sources {src.source_name!r} has {len(units)} unit(s) and none in {missing}: every phase "
                f"reports it on validation and the final evaluation on test; add text or lower chunk_chars"
            )
    return out


def is_eval_unit(ex: Example) -> bool:
    """True for a unit of a held-out-only eval source (it is scored per source, never pooled or trained on)."""
    return bool(ex.source)


def without_eval_units(examples: Sequence[Example]) -> list[Example]:
    """``examples`` without eval-source units: what pooled measurements and training checks read."""
    return [ex for ex in examples if not ex.source]


def _replicate_sources(
    train: list[Example], per_source: Sequence[Sequence[Example]], repeats: Sequence[int]
) -> list[Example]:
    """Append extra copies of each weighted source's training documents (see build_corpus)."""
    if all(r == 1 for r in repeats):
        return train
    in_train = {ex.text for ex in train if ex.kind == "text"}
    extra: list[Example] = []
    claimed: set[str] = set()  # a document shared by two sources is replicated once, by the first
    for docs, r in zip(per_source, repeats):
        for ex in docs:
            if ex.text in in_train and ex.text not in claimed:
                claimed.add(ex.text)
                extra.extend([ex] * (r - 1))
    return train + extra


def describe(examples: Sequence[Example]) -> dict[str, int]:
    """Counts per kind (for reports)."""
    counts = {kind: 0 for kind in DATA_KINDS}
    for ex in examples:
        counts[ex.kind] = counts.get(ex.kind, 0) + 1
    return counts
