"""The one text generator every part of the project uses (the eval harness, benchmarks, demos).

    outs = generate(model, tokenizer, ["What is the capital of France?"], GenerationConfig(max_new_tokens=32), ctx)
    outs[0].text, outs[0].token_ids, outs[0].finish     # "Paris ...", [...], "eos" | "stop" | "length"

- **Chat.** When the tokenizer has a chat template (and ``chat`` is not False), a prompt string becomes
  ``[system?, user]`` messages rendered with ``add_generation_prompt=True``; a prompt may also be a list
  of ``{"role", "content"}`` messages, or token ids used as given. The ids are exactly those of ``tokenizer.apply_chat_template``.
  Without a template a prompt is conditioned on BOS (else EOS), as our training streams put EOS before
  every document.
- **KV cache** where the model has one (``config.use_cache`` true, e.g. Llama); otherwise (Cognate's
  recurrent refiner has none) every step recomputes the whole sequence. Both give the same tokens.
- **Batches of different lengths** are left-padded, with an attention mask and position ids counted from
  each row's first real token, so a padded row sees what it would see alone. Prompts are sorted by
  length first so a batch holds similar lengths (little padding).
- **Stops** at EOS (the tokenizer's and the model's generation config's), after ``max_new_tokens``, or
  right after the first occurrence of a ``stop`` string (kept in the text).
- **Greedy** (temperature 0) or temperature sampling from an explicit ``torch.Generator`` (no hidden
  global RNG).

Prompts are truncated from the left so prompt + continuation fit the model's ``max_position_embeddings``
(keeping at least one token); if ``max_new_tokens`` alone exceeds it, recomputation slides a window over
the sequence and a cached generation ends when the positions run out.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterator, Literal, Sequence, Union

import torch
from pydantic import BaseModel, ConfigDict, Field

from forge_models.runtime import ConfigError, PhaseContext

Message = dict[str, str]
# A prompt may also be token ids, used exactly as given (the tool loop continues a transcript it tokenized).
Prompt = Union[str, Sequence[Message], Sequence[int]]


class GenerationConfig(BaseModel):
    """How to continue prompts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(32, ge=1, le=32768, description="Most tokens generated per prompt.")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy; above 0 samples from softmax(logits / T).")
    stop: tuple[str, ...] = Field((), description="A continuation ends right after the first of these strings (kept).")
    batch_size: int = Field(8, ge=1, le=4096, description="Prompts decoded together (left-padded).")
    use_cache: bool | None = Field(
        None, description="KV cache: None = where the model has one (config.use_cache); False = recompute every step."
    )
    chat: bool | None = Field(
        None, description="Chat formatting: None = when the tokenizer has a chat template; True requires one."
    )
    system: str | None = Field(None, description="System message put before each string prompt when chatting.")


@dataclass(frozen=True)
class Generation:
    """One continuation: its text (special tokens dropped, cut after a stop string), its ids (no EOS)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish: Literal["eos", "stop", "length"]


def uses_chat(tokenizer: Any, cfg: GenerationConfig) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat and not has_template:
        raise ConfigError("chat=True but the tokenizer has no chat template")
    return has_template if cfg.chat is None else cfg.chat


def prompt_ids(tokenizer: Any, prompt: Prompt, cfg: GenerationConfig) -> list[int]:
    """The token ids a prompt is conditioned on (chat-formatted or BOS + text; token ids as given)."""
    if not isinstance(prompt, str) and len(prompt) > 0 and all(isinstance(t, int) for t in prompt):
        return [int(t) for t in prompt]
    if uses_chat(tokenizer, cfg):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if cfg.system is not None and isinstance(prompt, str):
            messages.insert(0, {"role": "system", "content": cfg.system})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template writes its own special tokens; adding BOS again would change the prompt.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not isinstance(prompt, str):
        raise ConfigError("a list of messages needs a tokenizer with a chat template")
    return [start_token(tokenizer)] + list(tokenizer([prompt], add_special_tokens=False)["input_ids"][0])


def start_token(tokenizer: Any) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        return int(bos)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has neither BOS nor EOS to start a prompt with")
    return int(eos)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise ConfigError("neither the tokenizer nor the model's generation config names an EOS token")
    return ids


def has_kv_cache(model: Any) -> bool:
    """True when the model keeps a KV cache (its config says use_cache); Cognate's says False."""
    return bool(getattr(getattr(model, "config", None), "use_cache", False))


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    cfg: GenerationConfig,
    ctx: PhaseContext,
    *,
    generator: torch.Generator | None = None,
    max_positions: int | None = None,
) -> list[Generation]:
    """Continue every prompt (see the module docstring). The model must already be on ``ctx.device``."""
    if not prompts:
        return []
    if cfg.temperature > 0 and generator is None:
        raise ConfigError("temperature sampling needs an explicit torch.Generator (generator=...)")
    limit = int(max_positions or getattr(getattr(model, "config", None), "max_position_embeddings", None) or 1 << 30)
    keep = max(1, limit - cfg.max_new_tokens)
    chat = uses_chat(tokenizer, cfg)
    contexts = [_truncate(prompt_ids(tokenizer, p, cfg), keep, keep_first=not chat) for p in prompts]
    cached = has_kv_cache(model) if cfg.use_cache is None else cfg.use_cache
    if cached and not has_kv_cache(model):
        raise ConfigError(f"use_cache=True but {type(model).__name__} has no KV cache")
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    outputs: list[Generation | None] = [None] * len(contexts)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad():
            for chunk in _batched(order, cfg.batch_size):
                for i, g in zip(chunk, _generate_batch(model, tokenizer, [contexts[i] for i in chunk], cfg, ctx,
                                                       cached, generator, limit)):
                    outputs[i] = g
    finally:
        model.train(was_training)
    return outputs  # type: ignore[return-value]


def _truncate(ids: list[int], keep: int, keep_first: bool) -> list[int]:
    """The last ``keep`` ids (the end of a prompt matters most); a plain prompt keeps its start token."""
    if len(ids) <= keep:
        return ids
    if keep_first and keep > 1:
        return [ids[0]] + ids[len(ids) - keep + 1:]
    return ids[len(ids) - keep:]


def _batched(items: Sequence[int], size: int) -> Iterator[list[int]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _accepts(model: Any, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _generate_batch(
    model: Any,
    tokenizer: Any,
    contexts: list[list[int]],
    cfg: GenerationConfig,
    ctx: PhaseContext,
    cached: bool,
    generator: torch.Generator | None,
    limit: int,
) -> list[Generation]:
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = eos_ids(model, tokenizer)
    pad = int(pad) if pad is not None else min(eos)
    b, width = len(contexts), max(len(c) for c in contexts)
    ids = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for row, c in enumerate(contexts):
        ids[row, width - len(c):] = torch.tensor(c, dtype=torch.long)
        mask[row, width - len(c):] = 1
    padded = width * b != sum(len(c) for c in contexts)
    with_positions = _accepts(model, "position_ids")
    # transformers >= 5.2x names the cache argument `cache` (`past_key_values` is deprecated there).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    # Only the last position's logits are used: skipping the rest saves most of the LM head's work.
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    generated: list[list[int]] = [[] for _ in contexts]
    texts = [""] * b
    finish: list[str] = ["length"] * b
    active = list(range(b))
    past = None
    for _ in range(cfg.max_new_tokens):
        if cached and ids.shape[1] > limit:
            break  # the model has no positions left; a cache cannot slide, so the continuation ends here
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if cached:
            # Every row stays in the batch (the cache holds them all); finished rows feed masked padding.
            step = ids if past is None else ids[:, -1:]
            kwargs: dict[str, Any] = {"input_ids": step, "attention_mask": mask, "use_cache": True,
                                      cache_arg: past, "position_ids": positions[:, -step.shape[1]:]}
            rows = list(range(b))
        else:
            # Finished rows leave the batch: nothing is recomputed for them.
            # Beyond the model's positions the window slides (only when max_new_tokens >= max positions).
            window = mask[active][:, -limit:]
            kwargs = {"input_ids": ids[active][:, -limit:], "attention_mask": window}
            if with_positions and padded:
                kwargs["position_ids"] = (window.cumsum(-1) - 1).clamp(min=0)
            rows = active
        kwargs.update(last_only)
        with ctx.autocast():
            out = model(**{k: (v.to(ctx.device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
        if cached:
            past = getattr(out, "cache", None) or out.past_key_values
        logits = out.logits[:, -1].float().cpu()
        if cfg.temperature > 0:
            probs = torch.softmax(logits / cfg.temperature, dim=-1)
            chosen = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            chosen = logits.argmax(-1)
        column = torch.full((b, 1), pad, dtype=torch.long)
        grow = torch.zeros((b, 1), dtype=torch.long)
        still = []
        for token, row in zip(chosen.tolist(), rows):
            if row not in active:
                continue
            column[row, 0], grow[row, 0] = token, 1
            if token in eos:
                finish[row] = "eos"
                continue
            generated[row].append(token)
            text = tokenizer.decode(generated[row], skip_special_tokens=True)
            cut = _cut_after_stop(text, cfg.stop)
            texts[row] = text if cut is None else cut
            if cut is None:
                still.append(row)
            else:
                finish[row] = "stop"
        ids = torch.cat([ids, column], dim=1)
        mask = torch.cat([mask, grow], dim=1)
        active = still
        if not active:
            break
    return [Generation(text=texts[r], token_ids=generated[r], prompt_tokens=len(contexts[r]),
                       finish=finish[r]) for r in range(b)]  # type: ignore[arg-type]


def _cut_after_stop(text: str, stops: Sequence[str]) -> str | None:
    """``text`` up to and including the earliest stop string, or None if it contains none."""
    ends = [text.find(s) + len(s) for s in stops if s and s in text]
    return text[: min(ends)] if ends else None
