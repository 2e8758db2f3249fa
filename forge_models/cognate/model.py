"""The Cognate architecture: a Llama-style decoder whose block stack is a recurrent refiner with ACT halting.

Shape of one forward pass::

    h_0 = embed(tokens)
    for n = 1 .. max_refine_steps:              # the *same* block stack applied again and again
        h_n = blocks(h_{n-1})                   # pre-norm attention + SwiGLU, RoPE, causal SDPA
        p_n = sigmoid(halt(rms(h_n)))           # per-token halting probability (Graves 2016)
        a token halts at the first n where sum_{i<=n} p_i >= act_threshold (or n = max_refine_steps);
        its remainder R = 1 - sum_{i<n} p_i takes the place of p_n
    out = sum_n w_n h_n                         # w_n = p_n before halting, R at the halting step
    logits = lm_head(norm(out))                 # lm_head tied to the embedding

The ponder cost of a token is N + R (Graves' rho): N is a constant per token, R carries the gradient that
teaches the halting head to stop earlier. Its mean times ``ponder_weight`` is added to the LM loss.

Halted tokens keep the state they halted with (other tokens still attend to it) and contribute nothing
further. As soon as every real token in the batch has halted the loop stops: later steps could change no
output, so the skipped stack applications are pure savings (in training as well as at inference).

With ``max_refine_steps=1`` the model is a plain decoder: one stack application, no halting head call,
and a constant ponder cost of 2 (N = 1, R = 1) with no gradient.

The class is registered with ``AutoConfig`` / ``AutoModelForCausalLM`` under model_type "cognate" when
this module is imported (``import forge_models`` does it), so ``save_pretrained`` / ``from_pretrained``
and every later phase can treat it as any Hugging Face causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from forge_models.config import CognateArchConfig

__all__ = [
    "CognateModelConfig",
    "CognateModel",
    "CognateForCausalLM",
    "CognateCausalLMOutput",
    "CognateModelOutput",
    "count_parameters",
]


class CognateModelConfig(PretrainedConfig):
    """Hugging Face config of a Cognate model (model_type "cognate").

    Fields mirror :class:`forge_models.config.CognateArchConfig` plus the vocabulary and special tokens.
    ``act_threshold`` / ``max_refine_steps`` / ``ponder_weight`` are read at every forward pass, so a
    variant can change them on a copy of the trunk without touching its weights.
    """

    model_type = "cognate"
    # Standard names that generic HF utilities (caches, peft, generation) look up.
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}

    vocab_size: int = 8192
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    intermediate_size: int = 1376
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_refine_steps: int = 2
    act_threshold: float = 0.99
    ponder_weight: float = 0.01
    # sigmoid(-1.0) ~ 0.27: a fresh model pauses ~2-4 steps at threshold 0.99, so halting has to be learned.
    halt_bias_init: float = -1.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    # There is no KV cache: a recurrent refiner recomputes every position at every step.
    use_cache: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = 1

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"hidden_size {self.hidden_size} must divide into num_heads {self.num_heads} heads of even size"
            )
        if self.max_refine_steps < 1:
            raise ValueError(f"max_refine_steps must be >= 1, got {self.max_refine_steps}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_arch(
        cls,
        arch: CognateArchConfig,
        vocab_size: int,
        *,
        bos_token_id: int | None = 0,
        eos_token_id: int | None = 0,
        pad_token_id: int | None = 1,
        **overrides: Any,
    ) -> "CognateModelConfig":
        """Build the HF config from the phase's architecture config and a tokenizer's vocabulary."""
        fields = dict(
            vocab_size=vocab_size,
            hidden_size=arch.hidden_size,
            num_layers=arch.num_layers,
            num_heads=arch.num_heads,
            intermediate_size=arch.intermediate_size,
            max_position_embeddings=arch.max_position_embeddings,
            rope_theta=arch.rope_theta,
            max_refine_steps=arch.max_refine_steps,
            act_threshold=arch.act_threshold,
            ponder_weight=arch.ponder_weight,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        fields.update(overrides)
        return cls(**fields)


# ------------------------------------------------------------------------------------------ outputs


@dataclass
class CognateModelOutput(ModelOutput):
    """Output of the base model (before the LM head).

    Attributes:
        last_hidden_state: the final-normed, ACT-weighted state, (B, T, H).
        ponder_cost: mean N + R over real tokens (differentiable through R), scalar.
        refine_steps: mean number of refinement steps N over real tokens (no gradient), scalar.
        stack_applications: how many times the block stack actually ran in this call.
    """

    last_hidden_state: torch.Tensor | None = None
    ponder_cost: torch.Tensor | None = None
    refine_steps: torch.Tensor | None = None
    stack_applications: int | None = None


@dataclass
class CognateCausalLMOutput(CausalLMOutputWithPast):
    """Causal-LM output with the ACT statistics.

    ``loss`` = ``lm_loss`` + ponder_weight * ``ponder_cost`` when labels are given.
    """

    lm_loss: torch.Tensor | None = None
    ponder_cost: torch.Tensor | None = None
    refine_steps: torch.Tensor | None = None
    stack_applications: int | None = None


# ------------------------------------------------------------------------------------------ modules


class CognateRMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (computed in fp32 for stability under autocast)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x).to(dtype)


def _rope(config: CognateModelConfig, position_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions, shape (B or 1, 1, T, head_dim).

    Computed per call (it is tiny) rather than stored as a buffer, so nothing has to be re-created after
    ``from_pretrained`` builds the model on the meta device.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    freqs = position_ids.to(device=device, dtype=torch.float32)[..., None] * inv_freq  # (B, T, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class CognateAttention(nn.Module):
    """Multi-head causal self-attention with RoPE through torch's scaled_dot_product_attention."""

    def __init__(self, config: CognateModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class CognateMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: CognateModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CognateDecoderLayer(nn.Module):
    """Pre-norm transformer block (Llama layout, so names match what merge/quantise phases expect)."""

    def __init__(self, config: CognateModelConfig) -> None:
        super().__init__()
        self.input_layernorm = CognateRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = CognateAttention(config)
        self.post_attention_layernorm = CognateRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = CognateMLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class CognateHaltingHead(nn.Linear):
    """hidden -> 1 halting logit (a Linear subclass so its initialisation can be told apart)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__(hidden_size, 1, bias=True)


# ------------------------------------------------------------------------------------------- models


class CognatePreTrainedModel(PreTrainedModel):
    """Shared HF plumbing: config class, weight initialisation."""

    config: CognateModelConfig
    config_class = CognateModelConfig
    base_model_prefix = "model"
    _no_split_modules = ["CognateDecoderLayer"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, CognateHaltingHead):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            # A modest initial halting probability: the refiner starts out using its steps.
            init.constant_(module.bias, self.config.halt_bias_init)
        else:
            super()._init_weights(module)


class CognateModel(CognatePreTrainedModel):
    """Embedding + ACT-halted recurrent block stack + final norm (no LM head)."""

    def __init__(self, config: CognateModelConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([CognateDecoderLayer(config) for _ in range(config.num_layers)])
        self.halt = CognateHaltingHead(config.hidden_size)
        self.norm = CognateRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def _stack(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, cos, sin, attn_mask)
        return h

    def _halting_probability(self, h: torch.Tensor) -> torch.Tensor:
        # Parameter-free RMS normalisation: the residual stream grows with depth and refinement steps, and
        # the halting decision should depend on the direction of the state, not its scale.
        x = F.rms_norm(h.float(), (h.shape[-1],), eps=self.config.rms_norm_eps)
        return torch.sigmoid(self.halt(x).float().squeeze(-1))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CognateModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = h.shape
        device = h.device

        real = torch.ones(b, t, dtype=torch.bool, device=device)
        attn_mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            # A prepared additive mask (B or 1, 1, T, T): 0 where a query may attend, a large negative value
            # where not (Quiet-STaR's diagonal thought blocks). The caller owns the positions.
            if attention_mask.shape[-2:] != (t, t) or not attention_mask.is_floating_point():
                raise ValueError(f"a 4-D attention_mask must be an additive float mask of shape (B, 1, {t}, {t}); "
                                 f"got {tuple(attention_mask.shape)} {attention_mask.dtype}")
            if position_ids is None:
                raise ValueError("a 4-D attention_mask needs explicit position_ids")
            attn_mask = attention_mask.to(device=device, dtype=h.dtype)
        elif attention_mask is not None and not bool(attention_mask.all()):
            real = attention_mask.to(device=device, dtype=torch.bool)
            causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
            # Keys that are padding are hidden; every query may see itself so fully padded rows stay finite.
            attn_mask = (causal & real[:, None, None, :]) | torch.eye(t, dtype=torch.bool, device=device)
            if position_ids is None:
                # Left padding: real tokens are numbered from 0 (as HF generation does).
                position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids is None:
            position_ids = torch.arange(t, device=device)[None]
        cos, sin = _rope(self.config, position_ids, device)

        max_steps = int(self.config.max_refine_steps)
        threshold = float(self.config.act_threshold)
        running = torch.ones(b, t, dtype=torch.bool, device=device)
        cumulative = torch.zeros(b, t, device=device)  # sum of p over the steps a token has continued
        remainder = torch.zeros(b, t, device=device)
        n_steps = torch.zeros(b, t, device=device)
        out = torch.zeros(b, t, h.shape[-1], device=device, dtype=torch.float32)
        applications = 0

        for n in range(1, max_steps + 1):
            h_new = self._stack(h, cos, sin, attn_mask)
            applications += 1
            if n == max_steps:
                halt_now = running  # out of steps: everyone still running halts here
                p = torch.zeros_like(cumulative)
            else:
                p = self._halting_probability(h_new)
                halt_now = running & (cumulative + p >= threshold)
            go_on = running & ~halt_now
            r = 1.0 - cumulative
            weight = torch.where(halt_now, r, torch.where(go_on, p, torch.zeros_like(p)))
            out = out + weight.unsqueeze(-1) * h_new.float()
            remainder = torch.where(halt_now, r, remainder)
            n_steps = torch.where(halt_now, torch.full_like(n_steps, n), n_steps)
            cumulative = torch.where(go_on, cumulative + p, cumulative)
            # Tokens running at this step take their new state; halted ones stay frozen for the others to read.
            h = torch.where(running.unsqueeze(-1), h_new, h)
            running = go_on
            if not bool((running & real).any()):
                break

        if bool(running.any()):
            # Only padding can still be running after an early stop: close it on its last state so every
            # output is a proper convex combination.
            r = 1.0 - cumulative
            out = out + torch.where(running, r, torch.zeros_like(r)).unsqueeze(-1) * h.float()
            remainder = torch.where(running, r, remainder)
            n_steps = torch.where(running, torch.full_like(n_steps, applications), n_steps)

        weights = real.float()
        denom = weights.sum().clamp(min=1.0)
        ponder = ((n_steps + remainder) * weights).sum() / denom
        refine_steps = ((n_steps * weights).sum() / denom).detach()
        return CognateModelOutput(
            last_hidden_state=self.norm(out.to(h.dtype)),
            ponder_cost=ponder,
            refine_steps=refine_steps,
            stack_applications=applications,
        )


class CognateForCausalLM(CognatePreTrainedModel, GenerationMixin):
    """Cognate decoder with a tied LM head; loss = next-token cross-entropy + ponder_weight * ponder cost."""

    # transformers v5 convention: {target: source}; tied only when config.tie_word_embeddings is true.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CognateModelConfig) -> None:
        super().__init__(config)
        self.model = CognateModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if getattr(self, "generation_config", None) is not None:
            # No KV cache exists; generation recomputes the whole sequence each step.
            self.generation_config.use_cache = False

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CognateCausalLMOutput:
        """Logits for every position (or the last ``logits_to_keep``); loss when ``labels`` are given.

        Labels follow the HF convention: same shape as input_ids, shifted inside, -100 ignored.
        ``use_cache``, ``cache`` and ``past_key_values`` are accepted and ignored (there is no cache).
        """
        base = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds
        )
        hidden = base.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)

        loss = lm_loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels cannot be combined with logits_to_keep")
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].to(logits.device).reshape(-1)
            lm_loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
            loss = lm_loss + self.config.ponder_weight * base.ponder_cost
        return CognateCausalLMOutput(
            loss=loss,
            logits=logits,
            lm_loss=lm_loss,
            ponder_cost=base.ponder_cost,
            refine_steps=base.refine_steps,
            stack_applications=base.stack_applications,
        )

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Pass the full sequence every step: without a KV cache nothing may be sliced off."""
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "logits_to_keep": 1}
        return inputs


def count_parameters(model: nn.Module) -> int:
    """Exact number of distinct parameters (a tied embedding/head is counted once)."""
    return sum(p.numel() for p in model.parameters())  # .parameters() already de-duplicates shared tensors


AutoConfig.register("cognate", CognateModelConfig, exist_ok=True)
AutoModelForCausalLM.register(CognateModelConfig, CognateForCausalLM, exist_ok=True)
