"""Generation with a thought budget, behind the project's ``generate`` signature.

    gen_fn = thought_generate(qs, budget=4)
    outs = gen_fn(model, tokenizer, prompts, GenerationConfig(max_new_tokens=32, stop=("\\n",)), ctx)

so the tool runtime (:func:`forge_models.tools.run_agent_batch`'s ``generate_fn``), the agent search's client and
the served agent run a Quiet-STaR model exactly as they run a plain one. Each new token is predicted after a
thought of ``budget`` tokens at the last position (:class:`~forge_models.quietstar.thoughts.ThoughtDecoder`:
the mixing head weighs the with-thought and plain logits); thoughts are never part of the context or the
output. Greedy at temperature 0, else sampled from the caller's generator. One prompt at a time: the decoder
keeps one stream (and, on Llama-family models, one KV cache). Budget 0 gives the plain model's tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from forge_models.generation import Generation, GenerationConfig, Prompt, _cut_after_stop, eos_ids, prompt_ids
from forge_models.runtime import ConfigError, PhaseContext
from forge_models.quietstar.thoughts import QuietStar, ThoughtDecoder

__all__ = ["thought_generate"]

GenerateFn = Callable[..., list[Generation]]


def _unwrapped(model: Any) -> Any:
    """The model behind a wrapper that keeps it as ``_model`` (the served agent's deadline guard)."""
    return getattr(model, "_model", model)


def thought_generate(qs: QuietStar, budget: int, step_hook: Callable[[], None] | None = None) -> GenerateFn:
    """A ``generate``-compatible function that thinks ``budget`` tokens before every generated token.

    ``step_hook`` is called before each token (the served agent's deadline check: the decoder runs the
    model's trunk directly, so a wrapper around ``model.__call__`` never sees these steps).
    """
    if budget < 0:
        raise ConfigError(f"thought budget must be >= 0, got {budget}")

    @torch.no_grad()
    def generate_with_thoughts(model: Any, tokenizer: Any, prompts: Sequence[Prompt], cfg: GenerationConfig,
                               ctx: PhaseContext, *, generator: torch.Generator | None = None,
                               max_positions: int | None = None) -> list[Generation]:
        if _unwrapped(model) is not qs.model:
            raise ConfigError("thought_generate: the model asked to generate is not the thinking model's")
        eos = eos_ids(qs.model, tokenizer)
        limit = max_positions or int(getattr(qs.model.config, "max_position_embeddings", 1 << 30))
        device = qs.model.get_input_embeddings().weight.device
        outs = []
        for i, prompt in enumerate(prompts):
            ids = prompt_ids(tokenizer, prompt, cfg)
            # The thought of the last token sits after it: positions up to len + new + budget + 2 are used.
            room = min(cfg.max_new_tokens, limit - len(ids) - budget - 2)
            if room < 1:
                raise ConfigError(f"prompt of {len(ids)} tokens leaves no room for a {budget}-token thought within "
                                  f"{limit} positions")
            seed = ctx.seed * 1_000_003 + i if generator is None else int(generator.initial_seed()) + i
            dec = ThoughtDecoder(qs, budget, torch.Generator(device=device).manual_seed(seed % (2**63)))
            new: list[int] = []
            nxt, text, finish = list(ids), "", "length"
            for _ in range(room):
                if step_hook is not None:
                    step_hook()
                logits = dec.next_logits(nxt).float()
                if cfg.temperature > 0:
                    probs = torch.softmax(logits / cfg.temperature, dim=-1).cpu()
                    tok = int(torch.multinomial(probs, 1, generator=generator)[0])
                else:
                    tok = int(logits.argmax())
                if tok in eos:
                    finish = "eos"
                    break
                new.append(tok)
                nxt = [tok]
                text = tokenizer.decode(new, skip_special_tokens=True)
                cut = _cut_after_stop(text, cfg.stop)
                if cut is not None:
                    text, finish = cut, "stop"
                    break
            outs.append(Generation(text=text, token_ids=new, prompt_tokens=len(ids), finish=finish))
        return outs

    return generate_with_thoughts
