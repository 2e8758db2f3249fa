"""Quiet-STaR's machinery: thought tokens, parallel thought generation, the mixing head, the losses, inference.

Shapes: a batch ``x`` is (B, T) token ids. Every position j gets its own continuation ("thought stream")
``x_{<=j}, <|startthought|>, t_1..t_m, <|endthought|>, x_{j+1}..x_{j+k-1}``; stream step s of all T positions
is one block of T tokens. Block s attends to block 0 (the text) causally and to blocks 1..s only on the
diagonal (its own position), so one forward pass per step advances every position's thought at once
(Zelikman et al. 2024, sec. 4.2). Position ids advance by one per step (j + s).

Llama-family models keep a KV cache between steps (each step feeds only the T new tokens). Cognate has no
cache (its ACT refiner recomputes every token at every refinement step), so each step re-runs the whole
concatenated sequence under the same 4-D block mask: identical outputs, quadratic cost in the thought length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge_models.quietstar.config import QuietStarConfig
from forge_models.runtime import ArtifactIntegrityError, ConfigError

START, END = "<|startthought|>", "<|endthought|>"
HEAD_FILE = "quietstar_head.safetensors"
META_FILE = "quietstar.json"
NEG = -1e10  # logit given to the thought delimiters wherever they must not be sampled (released value)


# ------------------------------------------------------------------------------ tokens and the mixing head


def add_thought_tokens(model: Any, tokenizer: Any, init_token: str = "---") -> tuple[int, int, torch.Tensor]:
    """Add <|startthought|>/<|endthought|> to ``tokenizer`` and the (possibly tied) embeddings of ``model``.

    Both new rows are initialised to the mean embedding of ``init_token``'s tokens (released: "---"); an
    untied output head gets the same rows of its own matrix. Returns (start id, end id, init vector).
    """
    tokenizer.add_tokens([START, END], special_tokens=True)
    start, end = tokenizer.convert_tokens_to_ids([START, END])
    init_ids = [i for i in tokenizer.encode(init_token, add_special_tokens=False) if i not in (start, end)]
    if not init_ids:
        raise ConfigError(f"init_token {init_token!r} encodes to no token")
    emb = model.get_input_embeddings()
    if max(start, end) >= emb.weight.shape[0]:
        model.resize_token_embeddings(max(start, end) + 1, mean_resizing=False)
        emb = model.get_input_embeddings()
    with torch.no_grad():
        vec = emb.weight[init_ids].float().mean(0)
        emb.weight[[start, end]] = vec.to(emb.weight.dtype)
        out = model.get_output_embeddings()
        if out is not None and out.weight is not emb.weight:
            out.weight[[start, end]] = out.weight[init_ids].float().mean(0).to(out.weight.dtype)
    return int(start), int(end), vec


class MixingHead(nn.Module):
    """w = MLP([h_base; h_post]): Linear 2h->d, ReLU, Linear d->d, ReLU, Linear d->1, last layer zero (w = 0
    at the start, so the mixed prediction is exactly the base model's). No sigmoid, as released."""

    def __init__(self, hidden: int, width: int | None = None) -> None:
        super().__init__()
        d = width or hidden
        self.net = nn.Sequential(nn.Linear(2 * hidden, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h_base: torch.Tensor, h_post: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([h_base, h_post], dim=-1).float())


class QuietStar(nn.Module):
    """A causal LM plus the two learned thought embeddings and the mixing head (all trainable)."""

    def __init__(self, model: Any, start_id: int, end_id: int, init: torch.Tensor, cfg: QuietStarConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.start_id, self.end_id = start_id, end_id
        hidden = model.get_input_embeddings().weight.shape[1]
        # Stored divided by embedding_scale and multiplied back at use: ~scale x the learning rate (released).
        self.thought_embed = nn.Parameter(init.detach().float().repeat(2, 1) / cfg.embedding_scale)
        self.head = MixingHead(hidden, cfg.mixing_hidden)
        self.cached = bool(getattr(model.config, "use_cache", False))

    @classmethod
    def wrap(cls, model: Any, tokenizer: Any, cfg: QuietStarConfig) -> "QuietStar":
        start, end, init = add_thought_tokens(model, tokenizer, cfg.init_token)
        torch.manual_seed(cfg.seed)
        return cls(model, start, end, init, cfg)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "QuietStar":
        """The thinking model of a folder written by :func:`save_quietstar` (its tokenizer as ``.tokenizer``).

        The folder itself stays a plain model of the base architecture, so ``AutoModelForCausalLM`` and the
        later phases load it as an LM without thoughts; this loader adds the thought embeddings and the head.
        """
        qs, tokenizer = load_quietstar(Path(path), dtype)
        qs.tokenizer = tokenizer
        return qs.eval()

    def generate(self, prompt: list[int], max_new_tokens: int, budget: int | None = None,
                 eos: set[int] | None = None, seed: int = 0) -> list[int]:
        """Greedy continuation with ``budget`` thought tokens before each token (0: no thoughts)."""
        return generate_ids(self, prompt, max_new_tokens, budget, eos, seed)

    # -------------------------------------------------------------------------- pieces
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.model.get_input_embeddings()(ids)
        is_start, is_end = (ids == self.start_id)[..., None], (ids == self.end_id)[..., None]
        scaled = (self.thought_embed * self.cfg.embedding_scale).to(e.dtype)
        return torch.where(is_start, scaled[0], torch.where(is_end, scaled[1], e))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden).float()

    def trunk(self, embeds: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache: Any = None):
        kwargs: dict[str, Any] = dict(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        if self.cached:
            kwargs.update(cache=cache, use_cache=True)
        return self.model.model(**kwargs)


def block_mask(length: int, blocks: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (1, 1, blocks*L, blocks*L) mask: block 0 causal; block s>0 sees block 0 causally and blocks
    1..s on the diagonal only."""
    L = length
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    eye = torch.eye(L, dtype=torch.bool, device=device)
    allowed = torch.zeros(blocks * L, blocks * L, dtype=torch.bool, device=device)
    for q in range(blocks):
        allowed[q * L:(q + 1) * L, :L] = causal
        for k in range(1, q + 1):
            allowed[q * L:(q + 1) * L, k * L:(k + 1) * L] = eye
    mask = torch.zeros(blocks * L, blocks * L, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


class Streams:
    """Grows every position's thought stream by one block per :meth:`step`; ``base`` is the text's hidden."""

    def __init__(self, qs: QuietStar, x: torch.Tensor) -> None:
        self.qs, self.L = qs, x.shape[1]
        self.embeds = [qs.embed(x)]
        pos = torch.arange(self.L, device=x.device)[None].expand(x.shape[0], -1)
        self.positions = [pos]
        self.cache = None
        if qs.cached:
            from transformers import DynamicCache

            self.cache = DynamicCache()
        out = qs.trunk(self.embeds[0], None, pos, self.cache)
        self.base = out.last_hidden_state

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        s, L = len(self.embeds), self.L
        e = self.qs.embed(tokens)
        pos = self.positions[0] + s
        self.embeds.append(e)
        self.positions.append(pos)
        mask = block_mask(L, s + 1, e.dtype, e.device)
        if self.qs.cached:
            return self.qs.trunk(e, mask[:, :, s * L:], pos, self.cache).last_hidden_state
        out = self.qs.trunk(torch.cat(self.embeds, 1), mask, torch.cat(self.positions, 1))
        return out.last_hidden_state[:, s * L:]


def stream_hidden(qs: QuietStar, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, T, S, H) of teacher-forced streams ``tokens`` (B, T, S): the parallel pass."""
    st = Streams(qs, x)
    return torch.stack([st.step(tokens[:, :, s]) for s in range(tokens.shape[2])], dim=2)


def sequential_hidden(qs: QuietStar, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Reference loop: for every position j a separate causal forward of x_{<=j} + its stream."""
    B, T, S = tokens.shape
    out = torch.empty(B, T, S, qs.model.config.hidden_size, dtype=torch.float32)
    for j in range(T):
        seq = torch.cat([x[:, :j + 1], tokens[:, j]], dim=1)
        pos = torch.arange(seq.shape[1], device=x.device)[None].expand(B, -1)
        h = qs.model.model(inputs_embeds=qs.embed(seq), position_ids=pos).last_hidden_state
        out[:, j] = h[:, j + 1:].float()
    return out


# ------------------------------------------------------------------------------ the Quiet-STaR objective


def talk_targets(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (B, T, k) of the non-myopic talk loss, target[:, j, i] = x[:, j + 1 + i], and their validity."""
    B, T = x.shape
    idx = torch.arange(T, device=x.device)[:, None] + 1 + torch.arange(k, device=x.device)[None]
    valid = idx < T
    return x[:, idx.clamp(max=T - 1)], valid[None].expand(B, -1, -1)


def advantages(rewards: torch.Tensor, clamp: bool) -> torch.Tensor:
    """rewards (P, ...) -> reward minus the mean over the P passes (trice baseline); negatives to 0 if clamp."""
    adv = rewards - rewards.mean(0, keepdim=True)
    return adv.clamp(min=0) if clamp else adv


def sample_thought_token(logits: torch.Tensor, qs: QuietStar, temperature: float, gen: torch.Generator | None):
    """Gumbel-max sample (= hard Gumbel-softmax forward value), delimiters excluded; detached."""
    logits = logits.detach().clone()
    logits[..., [qs.start_id, qs.end_id]] = NEG
    u = torch.rand(logits.shape, generator=gen, device=logits.device).clamp_(1e-20, 1.0)
    return (logits / temperature - torch.log(-torch.log(u))).argmax(-1)


def quietstar_loss(qs: QuietStar, x: torch.Tensor, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One Quiet-STaR objective on a batch: think (n_passes thoughts at every position), talk, learn."""
    cfg = qs.cfg
    P, (B, T) = cfg.n_passes, x.shape
    X = x.repeat(P, 1)
    st = Streams(qs, X)
    hb = st.base
    base_logits = qs.logits(hb[:B])
    plain_nll = F.cross_entropy(base_logits[:, :-1].reshape(-1, base_logits.shape[-1]), x[:, 1:].reshape(-1))

    fill = lambda t: torch.full_like(X, t)  # noqa: E731
    h = st.step(fill(qs.start_id))
    logp = torch.zeros(P * B, T, device=x.device)
    for _ in range(cfg.thought_tokens):
        lg = qs.logits(h)
        tok = sample_thought_token(lg, qs, cfg.gumbel_temperature, gen)
        lg = lg.clone()
        lg[..., [qs.start_id, qs.end_id]] = NEG
        logp = logp + F.log_softmax(lg / cfg.policy_temperature, -1).gather(-1, tok[..., None]).squeeze(-1)
        h = st.step(tok)
    h = st.step(fill(qs.end_id))

    targets, valid = talk_targets(X, cfg.n_ahead_talk)
    hidden = hb.shape[-1]
    nll_mixed, nll_base, weights = [], [], []
    for i in range(cfg.n_ahead_talk):
        if i > 0:  # teacher-force the true token x_{j+i} into position j's stream
            h = st.step(torch.cat([X[:, i:], X[:, :i]], dim=1))
        hb_i = torch.cat([hb[:, i:], hb.new_zeros(P * B, i, hidden)], dim=1)  # base hidden at position j+i
        w = qs.head(hb_i, h)
        mixed = (1 - w) * hb_i.float() + w * h.float()
        nll_mixed.append(F.cross_entropy(qs.logits(mixed.to(h.dtype)).transpose(1, 2), targets[..., i], reduction="none"))
        with torch.no_grad():
            nll_base.append(F.cross_entropy(qs.logits(hb_i).transpose(1, 2), targets[..., i], reduction="none"))
        weights.append(w.squeeze(-1))
    nll_mixed_t, nll_base_t = torch.stack(nll_mixed, -1), torch.stack(nll_base, -1)  # (PB, T, k)
    vf = valid.float()
    talk_nll = (nll_mixed_t * vf).sum() / vf.sum()
    reward = ((nll_base_t - nll_mixed_t.detach()) * vf).sum(-1).view(P, B, T)
    adv = advantages(reward, cfg.remove_negative_rewards)
    thinks = valid[..., 0].float().view(P, B, T)  # positions with at least one target
    policy = -(adv * logp.view(P, B, T) * thinks).sum() / thinks.sum()
    lm = cfg.original_loss_weight * plain_nll + (1 - cfg.original_loss_weight) * talk_nll
    w_all = torch.stack(weights, -1)
    return {
        "loss": lm + cfg.policy_loss_beta * policy, "lm": lm.detach(), "plain_nll": plain_nll.detach(),
        "talk_nll": talk_nll.detach(), "policy": policy.detach(), "reward": (reward * thinks).sum() / thinks.sum(),
        "w_mean": (w_all.detach() * vf).sum() / vf.sum(), "w_abs": (w_all.detach().abs() * vf).sum() / vf.sum(),
    }


# ------------------------------------------------------------------------------ inference


@torch.no_grad()
def thought_logits(qs: QuietStar, x: torch.Tensor, budget: int | None = None,
                   gen: torch.Generator | None = None) -> torch.Tensor:
    """Next-token logits (B, T, V) at every position after thinking ``budget`` tokens there (None: the
    trained count; 0: the plain model). Thoughts sampled at eval_temperature; delimiters never predicted."""
    budget = qs.cfg.thought_tokens if budget is None else budget
    st = Streams(qs, x)
    if budget == 0:
        out = qs.logits(st.base)
    else:
        h = st.step(torch.full_like(x, qs.start_id))
        for _ in range(budget):
            h = st.step(sample_thought_token(qs.logits(h), qs, qs.cfg.eval_temperature, gen))
        h = st.step(torch.full_like(x, qs.end_id))
        w = qs.head(st.base, h)
        out = qs.logits(((1 - w) * st.base.float() + w * h.float()).to(h.dtype))
    out[..., [qs.start_id, qs.end_id]] = float("-inf")
    return out


class ThoughtDecoder:
    """Next-token logits after a thought at the **last** position only: what generation needs.

    :func:`thought_logits` thinks at every position of ``x`` (right for scoring a text, T times the work for
    generating one token). Here the stream of the last position j is fed token by token: start at position
    j + 1, the sampled thought tokens, end — the same stream, positions and attention as block s of
    :class:`Streams` at position j (tested against it). A Llama-family model keeps the text's KV cache
    across generated tokens and crops the thought off it after each prediction, so a token costs one text
    step plus ``budget + 2`` single-token steps; Cognate (no cache) re-runs the text + stream each step.
    """

    def __init__(self, qs: QuietStar, budget: int | None = None, gen: torch.Generator | None = None) -> None:
        self.qs, self.gen = qs, gen
        self.budget = qs.cfg.thought_tokens if budget is None else budget
        self.device = qs.model.get_input_embeddings().weight.device
        self.ids: list[int] = []
        self.cache = None
        if qs.cached:
            from transformers import DynamicCache

            self.cache = DynamicCache()

    def _run(self, ids: list[int], start: int) -> torch.Tensor:
        """Hidden state of the last of ``ids``, fed at positions start.. (after the cache, when there is one)."""
        x = torch.tensor([ids], device=self.device)
        pos = torch.arange(start, start + len(ids), device=self.device)[None]
        return self.qs.trunk(self.qs.embed(x), None, pos, self.cache).last_hidden_state[:, -1:]

    @torch.no_grad()
    def next_logits(self, new_ids: list[int]) -> torch.Tensor:
        """Append ``new_ids`` to the text; logits (V,) of the token after it (delimiters masked to -inf)."""
        qs, n0 = self.qs, len(self.ids)
        self.ids.extend(new_ids)
        if self.cache is not None:
            h_base = self._run(list(new_ids), n0)
        else:
            h_base = self._run(self.ids, 0)
        if self.budget == 0:
            out = qs.logits(h_base)
        else:
            T, stream, tok, h = len(self.ids), [], qs.start_id, h_base
            for s in range(self.budget + 2):  # start, the thought tokens, end
                stream.append(tok)
                h = self._run([tok], T + s) if self.cache is not None else self._run(self.ids + stream, 0)
                if s < self.budget:
                    tok = int(sample_thought_token(qs.logits(h), qs, qs.cfg.eval_temperature, self.gen)[0, -1])
                else:
                    tok = qs.end_id
            if self.cache is not None:
                # the thought is never part of the context (transformers 5: crop(-n) removes the last n)
                self.cache.crop(-(self.budget + 2))
                if self.cache.get_seq_length() != T:
                    raise RuntimeError(f"KV cache holds {self.cache.get_seq_length()} positions after the thought, "
                                       f"expected the text's {T}")
            w = qs.head(h_base, h)
            out = qs.logits(((1 - w) * h_base.float() + w * h.float()).to(h.dtype))
        out = out[0, -1]
        out[[qs.start_id, qs.end_id]] = float("-inf")
        return out


@torch.no_grad()
def generate_ids(qs: QuietStar, prompt: list[int], max_new_tokens: int, budget: int | None = None,
                 eos: set[int] | None = None, seed: int = 0,
                 should_stop: Callable[[list[int]], bool] | None = None) -> list[int]:
    """Greedy continuation of ``prompt``; each new token is predicted after a thought at the last position
    (:class:`ThoughtDecoder`). Thoughts are never part of the context or the output (released code did not
    teach the model not to emit them, so the delimiters are masked). ``should_stop(new_ids)`` ends early."""
    if not prompt:
        raise ConfigError("generate_ids needs a non-empty prompt")
    dec = ThoughtDecoder(qs, budget, torch.Generator(device=qs.model.get_input_embeddings().weight.device).manual_seed(seed))
    out: list[int] = []
    nxt = list(prompt)
    for _ in range(max_new_tokens):
        tok = int(dec.next_logits(nxt).argmax())
        out.append(tok)
        nxt = [tok]
        if (eos and tok in eos) or (should_stop is not None and should_stop(out)):
            break
    return out


# ------------------------------------------------------------------------------ storage


def save_quietstar(qs: QuietStar, tokenizer: Any, out: Path) -> None:
    """The model folder (thought rows written into the embeddings) + tokenizer + mixing head (safetensors)."""
    from safetensors.torch import save_file

    out = Path(out)
    with torch.no_grad():
        emb = qs.model.get_input_embeddings().weight
        emb[[qs.start_id, qs.end_id]] = (qs.thought_embed * qs.cfg.embedding_scale).to(emb.dtype)
    qs.model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    save_file({k: v.detach().contiguous() for k, v in qs.head.state_dict().items()}, str(out / HEAD_FILE))
    meta = {"start_id": qs.start_id, "end_id": qs.end_id, "config": qs.cfg.model_dump(mode="json")}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


THOUGHT_FILES = (META_FILE, HEAD_FILE)
"""What a Quiet-STaR folder holds besides the plain model: later phases copy both into their output folder."""


def read_thoughts(folder: str | Path) -> dict[str, Any] | None:
    """The stored thought machinery of a model folder: ``quietstar.json`` parsed (``start_id``, ``end_id``,
    ``config``), or None when the folder holds neither file (a plain model).

    Raises ArtifactIntegrityError when only one of the two files is there or ``quietstar.json`` is not valid.
    """
    folder = Path(folder)
    present = [n for n in THOUGHT_FILES if (folder / n).is_file()]
    if not present:
        return None
    if len(present) != len(THOUGHT_FILES):
        missing = sorted(set(THOUGHT_FILES) - set(present))
        raise ArtifactIntegrityError(f"{folder} holds {present} but not {missing}: an incomplete Quiet-STaR folder")
    try:
        meta = json.loads((folder / META_FILE).read_text())
        ids = int(meta["start_id"]), int(meta["end_id"])
        QuietStarConfig(**meta["config"])
    except Exception as exc:  # noqa: BLE001 - malformed JSON, missing keys, an invalid config
        raise ArtifactIntegrityError(f"{folder / META_FILE} is not a valid Quiet-STaR description: {exc}") from None
    if ids[0] == ids[1] or min(ids) < 0:
        raise ArtifactIntegrityError(f"{folder / META_FILE}: invalid thought token ids {ids}")
    return meta


def check_thought_ids(meta: dict[str, Any], tokenizer: Any = None, vocab_rows: int | None = None,
                      where: str = "quietstar.json") -> None:
    """Refuse (ArtifactIntegrityError) stored thought ids that the tokenizer's ``<|startthought|>`` /
    ``<|endthought|>`` do not have, or that the model's embedding matrix (``vocab_rows`` rows) lacks."""
    ids = (int(meta["start_id"]), int(meta["end_id"]))
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        got = (vocab.get(START), vocab.get(END))
        if got != ids:
            raise ArtifactIntegrityError(
                f"{where} names thought tokens {START}={ids[0]}, {END}={ids[1]}, but the model's tokenizer has "
                f"{START}={got[0]}, {END}={got[1]}: the tokenizer is not the one Quiet-STaR trained with (a later "
                "phase must keep phase 3's tokenizer)")
    if vocab_rows is not None and max(ids) >= vocab_rows:
        raise ArtifactIntegrityError(f"{where} names thought token id {max(ids)}, but the model's embeddings have "
                                     f"only {vocab_rows} rows")


def attach_thoughts(model: Any, folder: str | Path, tokenizer: Any = None) -> QuietStar:
    """The thinking model around an already-loaded causal LM, with the thought ids and mixing head stored in
    ``folder`` (``quietstar.json`` + ``quietstar_head.safetensors``).

    ``model`` is any causal LM of the trained architecture whose vocabulary holds the two thought rows: the
    plain Hugging Face model, a BitNet-converted one (``BitLinear``), a packed one (``PackedBitLinear``) or a
    decoded compressed one. Only its trunk forward (embeddings in, a 4-D additive mask, explicit position ids)
    and its LM head are used. The thought embeddings are the model's **own** rows at the stored ids (what a
    later phase stored there is what thinks); the mixing head is loaded in float32 as stored. ``tokenizer``
    (when given) must map the delimiters to the stored ids. Returns the QuietStar in eval mode, on the
    model's device.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_thoughts(folder)
    if meta is None:
        raise ArtifactIntegrityError(f"{folder} is not a Quiet-STaR folder (no {META_FILE} / {HEAD_FILE})")
    emb = model.get_input_embeddings().weight
    check_thought_ids(meta, tokenizer, emb.shape[0], str(folder / META_FILE))
    cfg = QuietStarConfig(**meta["config"])
    start, end = int(meta["start_id"]), int(meta["end_id"])
    with torch.random.fork_rng(devices=[]):  # the head's throw-away initialisation draws no global randomness
        qs = QuietStar(model, start, end, emb[start].detach().float(), cfg)
    with torch.no_grad():
        qs.thought_embed.copy_(emb[[start, end]].detach().float() / cfg.embedding_scale)
    try:
        qs.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    except RuntimeError as exc:
        raise ArtifactIntegrityError(f"{folder / HEAD_FILE} does not fit this model's mixing head: {exc}") from None
    qs.head.to(emb.device)
    return qs.eval()


def copy_thoughts(src: str | Path, dst: str | Path) -> list[str]:
    """Copy ``quietstar.json`` and the mixing head (byte for byte: it stays float32, never quantised) from the
    model folder ``src`` into ``dst``; returns the names copied (none when ``src`` is a plain model)."""
    import shutil

    if read_thoughts(src) is None:
        return []
    Path(dst).mkdir(parents=True, exist_ok=True)
    for name in THOUGHT_FILES:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return list(THOUGHT_FILES)


def load_quietstar(path: Path, dtype: torch.dtype = torch.float32) -> tuple[QuietStar, Any]:
    """(QuietStar, tokenizer) from a folder written by :func:`save_quietstar` (or carried by a later phase
    whose folder ``from_pretrained`` loads)."""
    from transformers import AutoModelForCausalLM

    import forge_models  # noqa: F401  (registers Cognate)
    from forge_models.tokenizer import load_tokenizer

    path = Path(path)
    if read_thoughts(path) is None:
        raise ArtifactIntegrityError(f"{path} is not a Quiet-STaR folder (no {META_FILE} / {HEAD_FILE})")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = load_tokenizer(path)
    return attach_thoughts(model, path, tokenizer), tokenizer
