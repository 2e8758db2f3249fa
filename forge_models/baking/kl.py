"""The prompt-baking estimator: contexts with and without the prompt, fresh trajectories, forward KL.

For a prompt u, an input x and a trajectory y sampled from the prompted model P_theta(.|u, x):

    L = (1/N) sum_n sum_t sum_v P_theta(v|u,x,y<t) [log P_theta(v|u,x,y<t) - log P_theta'(v|x,y<t)]

(Bhargava et al. 2024; the authors' ``train_loop.py``: ``kl_div`` with the student's log-softmax as input and
the teacher's as target, ``log_target=True``, summed over vocabulary and tokens, divided by the batch). Only
positions that predict a generated token count; positions after the first EOS do not.

``kl_div(input, target)`` computes D(target || input) — the trap named in the reference (bakery ``kl.py``):
:func:`token_kl` takes (teacher, student) in that order and its golden values pin the direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from forge_models.generation import GenerationConfig, prompt_ids, start_token, uses_chat
from forge_models.runtime import ConfigError

__all__ = ["LogitFn", "Contexts", "token_kl", "kl_from_probs", "context_ids", "sample_trajectories",
           "eos_mask", "generated_logits", "trajectory_kl", "ModelLogits", "model_logits", "teacher_logits"]

LogitFn = Callable[[torch.Tensor], torch.Tensor]
"""``ids (n, L) -> logits (n, L, V)``: a model seen as a function (a PeftModel with or without its adapter)."""


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL D(P_teacher || P_student) in nats at every position (summed over the last, vocabulary dim)."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    # kl_div(input=student, target=teacher) = sum_v p_teacher (log p_teacher - log p_student): forward KL.
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1)


def kl_from_probs(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """D(p || q) of two probability vectors, through the same code path as training (golden-value tests)."""
    return token_kl(p.log(), q.log())


@dataclass(frozen=True)
class Contexts:
    """Token ids one input is conditioned on: with the prompt (teacher) and exactly as at inference (student)."""

    prompted: tuple[int, ...]
    plain: tuple[int, ...]


def context_ids(tokenizer: Any, prompt: str, x: str) -> Contexts:
    """The prompted and unprompted contexts of input ``x``.

    The unprompted one is exactly what inference conditions on (:func:`forge_models.generation.prompt_ids`
    with no system message): with a chat template that is the template without a system message (which
    may differ from an empty one, and some templates insert a default system prompt: that is what
    inference sees, so it is what the student sees). The prompted one puts ``prompt`` in the system slot:
    the template's, or without a template the plain transcript's ``System: prompt`` line (as the tool
    runtime and the corpus's system dialogues write it): ``start + ids("System: " + prompt + "\n") + ids(x)``,
    so the unprompted context minus its start token is a suffix of it. A dialogue turn
    ``"User: Q\nAssistant:"`` is sent to a chat template as the user message ``Q``, as a user would type it.
    An empty prompt gives identical contexts (nothing to bake).
    """
    from forge_models.data.system_prompts import SYSTEM_PREFIX, dialogue_question

    gen = GenerationConfig()
    chat = uses_chat(tokenizer, gen)
    user = (dialogue_question(x) or x) if chat else x
    plain = tuple(prompt_ids(tokenizer, user, gen))
    if prompt == "":
        return Contexts(plain, plain)
    if chat:
        prompted = tuple(prompt_ids(tokenizer, user, GenerationConfig(system=prompt)))
    else:
        head = list(tokenizer([f"{SYSTEM_PREFIX}{prompt}\n"], add_special_tokens=False)["input_ids"][0])
        prompted = (start_token(tokenizer), *head, *plain[1:])
    return Contexts(prompted, plain)


class ModelLogits:
    """A causal LM seen as a :data:`LogitFn`, which can also decode step by step with its KV cache.

    ``adapter_off``: the PeftModel with its adapter disabled and no gradients (the teacher, as in the paper's
    code). :func:`sample_trajectories` uses :meth:`step` where the model keeps a KV cache (Llama-family,
    BitNet-converted Llama), so a trajectory token costs one token's forward instead of the whole sequence's;
    Cognate has no cache and is recomputed.
    """

    def __init__(self, model: Any, adapter_off: bool = False) -> None:
        self.model, self.adapter_off = model, adapter_off
        config = getattr(model, "config", None)
        self.cached = bool(getattr(config, "use_cache", False)) and getattr(config, "model_type", "") != "cognate"

    def _forward(self, **kwargs: Any) -> Any:
        if self.adapter_off:
            with torch.no_grad(), self.model.disable_adapter():
                return self.model(**kwargs)
        return self.model(**kwargs)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self._forward(input_ids=ids).logits

    def step(self, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """Logits of the last position after feeding ``ids`` on top of ``cache`` (None: a new cache)."""
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        # the cache object is filled in place (transformers 5 names the argument ``cache``)
        return self._forward(input_ids=ids, cache=cache, use_cache=True).logits[:, -1], cache


def model_logits(model: Any) -> LogitFn:
    return ModelLogits(model)


def teacher_logits(peft_model: Any) -> LogitFn:
    """The teacher: the same PeftModel with its adapter disabled, without gradients (the paper's code)."""
    return ModelLogits(peft_model, adapter_off=True)


def eos_mask(y: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """1.0 at every generated position up to and including the first EOS, 0.0 after it."""
    is_eos = torch.zeros_like(y, dtype=torch.bool)
    for e in eos:
        is_eos |= y == e
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # positions strictly after the first EOS
    return (~after).float()


@torch.no_grad()
def sample_trajectories(
    logits_fn: LogitFn, context: tuple[int, ...], n: int, length: int, temperature: float,
    generator: torch.Generator, device: torch.device,
) -> torch.Tensor:
    """``n`` trajectories of ``length`` tokens sampled at ``temperature`` after ``context``: ``(n, length)``.

    A :class:`ModelLogits` over a model with a KV cache decodes one token per step; anything else (Cognate, a
    plain function) recomputes the whole sequence every step. Same draws from ``generator`` either way.
    Sampling continues past EOS so the batch stays rectangular; :func:`eos_mask` drops those positions.
    """
    ids = torch.tensor([list(context)] * n, dtype=torch.long, device=device)
    cached = isinstance(logits_fn, ModelLogits) and logits_fn.cached
    cache, feed = None, ids
    for _ in range(length):
        if cached:
            last, cache = logits_fn.step(feed, cache)
        else:
            last = logits_fn(ids)[:, -1]
        nxt = torch.multinomial(torch.softmax(last.float() / temperature, -1), 1, generator=generator)
        ids = torch.cat([ids, nxt], 1)
        feed = nxt
    return ids[:, len(context):]


def generated_logits(logits_fn: LogitFn, context: tuple[int, ...], y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict ``y`` after ``context``, and the tokens those positions predict.

    Returns ``(logits (n, T, V), targets (n, T))``; the targets are read back from the sequence so a caller
    can check that two contexts select the same generated tokens.
    """
    c = len(context)
    seq = torch.cat([torch.tensor([list(context)] * y.shape[0], dtype=torch.long, device=y.device), y], 1)
    logits = logits_fn(seq)
    t = y.shape[1]
    return logits[:, c - 1 : c - 1 + t], seq[:, c : c + t]


def trajectory_kl(
    teacher: LogitFn, student: LogitFn, ctxs: Contexts, y: torch.Tensor, mask: torch.Tensor,
    student_prompted: bool = False,
) -> torch.Tensor:
    """Masked forward KL summed over each trajectory's generated positions: ``(n,)``.

    Raises:
        ConfigError: the two branches would score different tokens (a misaligned mask; the authors'
            script asserts the same).
    """
    t_logits, t_tok = generated_logits(teacher, ctxs.prompted, y)
    s_logits, s_tok = generated_logits(student, ctxs.prompted if student_prompted else ctxs.plain, y)
    if not torch.equal(t_tok, s_tok):
        raise ConfigError("prompted and unprompted branches select different tokens: the mask is misaligned")
    return (token_kl(t_logits.detach(), s_logits) * mask).sum(1)


def trajectory_logprob(logits_fn: LogitFn, context: tuple[int, ...], y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each trajectory's generated tokens under a model: ``(n,)``."""
    logits, tok = generated_logits(logits_fn, context, y)
    lp = torch.log_softmax(logits.float(), -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(1)
