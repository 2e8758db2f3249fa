"""Edge-of-chaos curriculum: graded task generation, answer-checked success, and the band controller.

**Difficulty** is one number ``d`` in [0, 1] that reaches the data through the synthetic generator's own
knobs (:func:`difficulty_knobs`): the largest operand grows log-uniformly from ``min_operand`` (d = 0) to
``max_operand`` (d = 1), and arithmetic problems get more operations (1 below d = 1/3, up to 2 below
2/3, up to 3 above). Tool-call episodes use the same operand range.

**Fresh samples.** Training tasks and held-out probes come from two disjoint seed streams
(``sha256("forge-curriculum:<stream>:<seed>:<index>")``, streams "train", "probe", "dream"), so a batch
is a pure function of (seed, step, difficulty). Every generated task that shows a canonical key of the
corpus' validation or test split (a calculation ``a op b`` in any wording, see
:mod:`forge_models.data.keys`) is skipped, so curriculum training and dreams never touch a held-out item
and the probes never are validation or test items. (At the lowest difficulty the whole problem space has a
few dozen members, so a probe can repeat a training task there; at that level success measures
memorisation, which is what "easy" means.)

**Success** (:func:`answer_success`) is teacher-forced exact match of every token the model must produce
(the text after the prompt: worked steps and final number, or tool call and final answer; never the
tool's output ``Tool: N``, which the calculator writes, see :func:`forge_models.data.unscored_spans`), with
labels shifted by one and padding ignored. A model that copies its input scores ~0: results must be
computed, not read.

**Controller** (:class:`BandController`): after each measurement, a success above the band raises the
difficulty by ``gain * (success - band_high)``, below it lowers it by ``gain * (band_low - success)``;
inside the band nothing moves. The history of (step, success, difficulty, in band) is kept for plots.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from forge_models.data.keys import canonical_keys
from forge_models.data.stream import unscored_spans
from forge_models.data.synthetic import Example, _arithmetic, _tool
from forge_models.runtime import ConfigError, PhaseContext
from forge_models.tokenizer import eos_token_id

__all__ = ["BandController", "answer_success", "difficulty_knobs", "generate_tasks", "stream_rng"]


def stream_rng(seed: int, stream: str, index: int) -> random.Random:
    """A ``random.Random`` for item ``index`` of a named stream; different streams never share seeds."""
    digest = hashlib.sha256(f"forge-curriculum:{stream}:{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def difficulty_knobs(difficulty: float, min_operand: int, max_operand: int) -> dict[str, int]:
    """The generator settings of a difficulty in [0, 1] (see the module docstring)."""
    d = min(1.0, max(0.0, float(difficulty)))
    largest = round(math.exp(math.log(min_operand) + d * (math.log(max_operand) - math.log(min_operand))))
    return {"max_operand": max(2, largest), "min_ops": 1, "max_ops": 1 + min(2, int(d * 3))}


def generate_tasks(
    rng: random.Random,
    n: int,
    difficulty: float,
    families: Sequence[str],
    min_operand: int,
    max_operand: int,
    exclude_keys: frozenset[str] | set[str] = frozenset(),
) -> list[Example]:
    """``n`` answer-checked tasks at ``difficulty``, families alternating at random.

    A task showing any canonical key in ``exclude_keys`` (:func:`forge_models.data.held_out_keys` of the
    corpus: every calculation, in any wording, of the validation and test splits) is never returned.
    """
    knobs = difficulty_knobs(difficulty, min_operand, max_operand)
    tasks: list[Example] = []
    tries = 0
    while len(tasks) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ConfigError(
                f"could not generate {n} curriculum tasks outside the validation/test calculations at difficulty "
                f"{difficulty:.2f}; raise curriculum.min_operand"
            )
        family = rng.choice(list(families))
        if family == "arithmetic":
            ex = _arithmetic(rng, knobs["max_operand"], knobs["min_ops"], knobs["max_ops"])
        elif family == "tool":
            ex = _tool(rng, knobs["max_operand"])
        else:
            raise ConfigError(f"unknown curriculum family {family!r}; use arithmetic or tool")
        if canonical_keys(ex) & exclude_keys:
            continue
        tasks.append(ex)
    return tasks


def _start_token(tokenizer: Any) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos) if bos is not None else eos_token_id(tokenizer)


def answer_positions(tokenizer: Any, example: Example) -> tuple[list[int], list[int]]:
    """(token ids with the start token first, indices of the answer's tokens in that list).

    The answer is every token that starts at or after the end of the prompt in the full text (offsets
    from the fast tokenizer, so no BPE merge across the boundary can shift it), except tokens that
    overlap the tool's output (``Tool: N`` lines): the model must produce its call and its final answer,
    not the calculator's result.
    """
    enc = tokenizer(example.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [_start_token(tokenizer)] + list(enc["input_ids"])
    cut = len(example.prompt)
    spans = unscored_spans(example.text)
    answer = [
        i + 1
        for i, (start, end) in enumerate(enc["offset_mapping"])
        if start >= cut and not any(start < s_end and end > s_start for s_start, s_end in spans)
    ]
    return ids, answer


@torch.no_grad()
def answer_success(
    model: Any, tokenizer: Any, examples: Sequence[Example], ctx: PhaseContext, batch_size: int = 32
) -> list[bool]:
    """Per example: is every answer token the argmax of the model's prediction from the gold prefix?

    Logits at position i are compared with the token at position i + 1 (shifted labels); right padding
    is masked out of attention and never scored. Runs in eval mode (restored afterwards).
    """
    if not examples:
        raise ConfigError("answer_success got no examples")
    was_training = bool(getattr(model, "training", False))
    model.eval()
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else eos_token_id(tokenizer)
    results: list[bool] = []
    try:
        encoded = [answer_positions(tokenizer, ex) for ex in examples]
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (tokens, _) in enumerate(chunk):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
            with ctx.autocast():
                logits = model(input_ids=ids.to(ctx.device), attention_mask=mask.to(ctx.device)).logits
            predicted = logits.float().argmax(-1).cpu()
            for row, (tokens, answer) in enumerate(chunk):
                if not answer:
                    results.append(False)  # nothing to check is not a success
                    continue
                idx = torch.tensor(answer)
                results.append(bool((predicted[row, idx - 1] == ids[row, idx]).all()))
    finally:
        model.train(was_training)
    return results


@dataclass
class BandController:
    """Moves difficulty so held-out success stays within [band_low, band_high] (proportional, dead band)."""

    band_low: float
    band_high: float
    gain: float
    difficulty: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def update(self, success: float, step: int) -> float:
        """Record a measurement (taken at ``difficulty``) and return the next difficulty."""
        in_band = self.band_low <= success <= self.band_high
        self.history.append({"step": step, "success": success, "difficulty": self.difficulty, "in_band": float(in_band)})
        if success > self.band_high:
            self.difficulty += self.gain * (success - self.band_high)
        elif success < self.band_low:
            self.difficulty -= self.gain * (self.band_low - success)
        self.difficulty = min(1.0, max(0.0, self.difficulty))
        return self.difficulty

    def state(self) -> dict[str, Any]:
        return {"difficulty": self.difficulty, "history": list(self.history)}

    def load(self, state: dict[str, Any]) -> None:
        self.difficulty = float(state["difficulty"])
        self.history = [dict(h) for h in state["history"]]


def task_stats(tasks: Iterable[Example]) -> dict[str, float]:
    """Measured hardness of a task list: mean largest operand, operations per problem, answer digits."""
    tasks = list(tasks)
    numbers, ops, digits = [], [], []
    for ex in tasks:
        question = ex.prompt
        values = [int(t) for t in question.replace("?", " ").replace(".", " ").split() if t.isdigit()]
        numbers.append(max(values) if values else 0)
        ops.append(sum(question.count(f" {o} ") for o in "+-*") if ex.kind == "arithmetic" else 1)
        digits.append(len(ex.answer.lstrip("-")))
    n = max(1, len(tasks))
    return {"max_operand": sum(numbers) / n, "ops": sum(ops) / n, "answer_digits": sum(digits) / n}

