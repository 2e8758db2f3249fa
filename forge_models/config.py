"""Typed, documented, frozen configs of the ML library (data, tokenizer, evaluation, phases).

Every model here is `frozen=True, extra="forbid"`, and every field has a description: the same classes
become the CLI schema, the Prefect UI form and part of the cache key (through `model_dump_json`).
Cross-field checks live in validators so a bad config fails before any data is read.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

HEADLINE_METRICS = ("loss", "ppl", "arith_em", "tool_valid", "tool_correct", "choice_acc")
"""The harness metrics every phase reports and every summary table shows, in this order."""

DATA_KINDS = ("arithmetic", "tool", "persona", "narrative", "text", "system")
"""Example kinds: the synthetic families (system: system-prompt conditioned dialogues) plus "text" for
examples read from real corpora."""


class Frozen(BaseModel):
    """Base of every config: immutable, unknown keys refused, defaults validated too."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


def _check_mix(mix: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(mix) - set(DATA_KINDS))
    if unknown:
        raise ValueError(f"unknown data kinds {unknown} in data_mix; use {list(DATA_KINDS)}")
    if not any(w > 0 for w in mix.values()) or any(w < 0 for w in mix.values()):
        raise ValueError("data_mix weights must be >= 0 with at least one > 0")
    return mix


DataMix = Annotated[dict[str, float], AfterValidator(_check_mix)]
"""Sampling weight per data kind (of DATA_KINDS): all >= 0, at least one > 0."""


def data_mix_field(description: str = "Sampling weight of each data kind (kinds absent from the corpus are ignored)."):
    """The ``data_mix`` field of a training config: every kind weighted 1 by default."""
    return Field(default_factory=lambda: {k: 1.0 for k in DATA_KINDS}, description=description)


# --------------------------------------------------------------------------------------------- data


class SourceConfig(Frozen):
    """One real corpus file mixed into the training data."""

    path: str = Field(description="Local path or URL (file://, s3://) of a .txt, .jsonl or .parquet file.")
    format: Literal["auto", "txt", "jsonl", "parquet"] = Field(
        "auto", description="File format; 'auto' uses the file extension."
    )
    text_field: str = Field("text", description="Column / JSON key holding the text (jsonl and parquet).")
    weight: float = Field(1.0, gt=0, description="Relative sampling weight of this source in the 'text' kind.")
    max_documents: int | None = Field(
        None, gt=0, description="Read at most this many documents (None: all)."
    )


EVAL_SOURCE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Names an eval source may have: they become metric keys (``ppl_src_<name>``), so no spaces or slashes."""


class EvalSourceConfig(Frozen):
    """One real corpus file used only for held-out evaluation: its units go to validation or test, never train."""

    path: str = Field(description="Local path or URL (file://, s3://) of a .txt, .jsonl or .parquet file.")
    format: Literal["auto", "txt", "jsonl", "parquet"] = Field(
        "auto", description="File format; 'auto' uses the file extension."
    )
    text_field: str = Field("text", description="Column / JSON key holding the text (jsonl and parquet).")
    max_documents: int | None = Field(
        None, gt=0, description="Read at most this many documents (None: all)."
    )
    name: str | None = Field(
        None,
        description=(
            "Name in metric keys (ppl_src_<name>, loss_src_<name>, ppl_tokens_src_<name>) and reports; letters, "
            "digits, '_', '.', '-'. None: the file stem. Names must be unique among data.eval_sources."
        ),
    )
    chunk_chars: int | None = Field(
        2000,
        ge=32,
        le=1_000_000,
        description=(
            "Evaluation unit size: the whitespace-normalised concatenation of the documents is cut into "
            "consecutive chunks, each ending at the first whitespace at or after this many characters. "
            "None: one unit per document."
        ),
    )

    @property
    def source_name(self) -> str:
        """The name this source reports under: ``name``, else the file stem."""
        if self.name:
            return self.name
        return PurePosixPath(self.path.removeprefix("file://")).stem

    @model_validator(mode="after")
    def _name_is_a_metric_key(self) -> "EvalSourceConfig":
        if not re.fullmatch(EVAL_SOURCE_NAME, self.source_name):
            raise ValueError(
                f"eval source {self.path!r}: name {self.source_name!r} cannot be a metric key; set `name` to "
                f"letters, digits, '_', '.' or '-' (at most 64 characters)"
            )
        return self


def same_file(url: str) -> str:
    """A comparable identity of a source path: s3:// URLs as written, local paths absolute and resolved."""
    if url.startswith("s3://"):
        return url.rstrip("/")
    return str(Path(url.removeprefix("file://")).expanduser().resolve(strict=False))


class SyntheticConfig(Frozen):
    """The seeded synthetic corpus shipped as code."""

    n_examples: int = Field(
        20000, ge=100, le=10_000_000, description="Number of synthetic examples generated before splitting."
    )
    kinds: dict[str, float] = Field(
        default_factory=lambda: {"arithmetic": 1.0, "tool": 1.0, "persona": 1.0, "narrative": 1.0},
        description="Relative share of each synthetic kind (arithmetic, tool, persona, narrative, system).",
    )
    max_operand: int = Field(
        20, ge=2, le=10_000, description="Largest operand in arithmetic and tool-call problems."
    )

    @model_validator(mode="after")
    def _kinds_known(self) -> "SyntheticConfig":
        unknown = sorted(set(self.kinds) - {"arithmetic", "tool", "persona", "narrative", "system"})
        if unknown:
            raise ValueError(f"unknown synthetic kinds {unknown}; use arithmetic, tool, persona, narrative, system")
        if not any(w > 0 for w in self.kinds.values()) or any(w < 0 for w in self.kinds.values()):
            raise ValueError("synthetic kind weights must be >= 0 with at least one > 0")
        return self


class TokenizerConfig(Frozen):
    """How the tokenizer is obtained."""

    kind: Literal["bpe", "pretrained"] = Field(
        "bpe",
        description="'bpe': train a byte-level BPE on the training split; 'pretrained': load from `path`.",
    )
    vocab_size: int = Field(2048, ge=300, le=262_144, description="Target vocabulary size of the trained BPE.")
    path: str | None = Field(
        None, description="Hugging Face model/tokenizer folder for kind 'pretrained'."
    )

    @model_validator(mode="after")
    def _path_for_pretrained(self) -> "TokenizerConfig":
        if self.kind == "pretrained" and not self.path:
            raise ValueError("tokenizer.kind 'pretrained' needs tokenizer.path (a local tokenizer folder)")
        return self


class DataConfig(Frozen):
    """Training corpus, held-out splits and tokenizer."""

    seed: int = Field(1234, description="Seed of the synthetic generator (also decides nothing else).")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="Synthetic corpus.")
    sources: list[SourceConfig] = Field(
        default_factory=list, description="Real corpora (txt/jsonl/parquet, local or s3://) mixed in as kind 'text'."
    )
    eval_sources: list[EvalSourceConfig] = Field(
        default_factory=list,
        description=(
            "Held-out-only real corpora: cut into units that go to validation or test (never train) and are "
            "scored per source (ppl_src_<name>), outside the pooled loss/ppl."
        ),
    )
    validation_percent: int = Field(
        5, ge=1, le=40, description="Percent of examples (by content hash) in the validation split."
    )
    test_percent: int = Field(
        5, ge=1, le=40, description="Percent of examples (by content hash) in the test split."
    )
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer.")

    @model_validator(mode="after")
    def _splits_leave_training(self) -> "DataConfig":
        if self.validation_percent + self.test_percent > 60:
            raise ValueError(
                "validation_percent + test_percent must be <= 60 so most data is left for training"
            )
        names = [s.source_name for s in self.eval_sources]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"data.eval_sources names {repeated} are used more than once; set a distinct `name` on each, "
                f"so no source's metrics overwrite another's"
            )
        trained = {same_file(s.path) for s in self.sources}
        both = [s.path for s in self.eval_sources if same_file(s.path) in trained]
        if both:
            raise ValueError(
                f"data.eval_sources {both} are also in data.sources: a held-out-only source can never be trained "
                f"on; remove it from one of the two lists"
            )
        return self


# --------------------------------------------------------------------------------------- evaluation


EvalTask = Literal["perplexity", "arithmetic", "tool", "tool_loop", "system", "choice"]
EVAL_TASKS: tuple[EvalTask, ...] = ("perplexity", "arithmetic", "tool", "tool_loop", "system", "choice")


class EvalConfig(Frozen):
    """The one evaluation harness used before and after every phase."""

    split: Literal["validation", "test"] = Field(
        "validation",
        description=(
            "Held-out split phases report on and gate with: 'validation' (the only accepted value; 'test' is "
            "refused, because the test split is read only by the pipeline's final evaluation)."
        ),
    )
    max_examples: int = Field(
        64, ge=1, le=100_000, description="Answer-checked examples per task (arithmetic, tool, choice) in phase evaluations."
    )
    final_max_examples: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Answer-checked examples per task in the final test evaluation; None scores every one.",
    )
    ppl_max_tokens: int = Field(
        16384, ge=64, le=100_000_000, description="Held-out tokens scored for perplexity."
    )
    max_new_tokens: int = Field(
        32, ge=1, le=1024, description="Generation budget for answer-checked tasks (greedy decoding)."
    )
    batch_size: int = Field(8, ge=1, le=1024, description="Sequences per forward pass while evaluating.")
    seq_len: int = Field(256, ge=16, le=32768, description="Window length for perplexity.")
    bootstrap_samples: int = Field(
        2000, ge=100, le=100_000, description="Bootstrap resamples behind every 95% interval the harness reports."
    )
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap resampling (intervals are reproducible).")
    tasks: tuple[EvalTask, ...] = Field(
        EVAL_TASKS,
        min_length=1,
        description=(
            "Harness task families to run: 'perplexity', 'arithmetic', 'tool' (the first step of tool episodes: "
            "tool_valid / tool_correct), 'tool_loop' (the whole episode through the tool runtime: "
            "tool_call_valid / tool_success / tool_answer_correct), 'system' (system-prompt dialogues) and "
            "'choice'. Default: all. EvoMerge's fitness narrows it to the families its weights read."
        ),
    )

    @model_validator(mode="after")
    def _not_test(self) -> "EvalConfig":
        if self.split == "test":
            raise ValueError(
                "eval.split 'test' is refused: phases evaluate and gate on 'validation'; the test split is read "
                "only by the final evaluation (so no choice is ever made on it)"
            )
        return self

    def for_split(self, split: str) -> "EvalConfig":
        """This config as the evaluation of ``split`` uses it: the final test evaluation scores
        ``final_max_examples`` (None: all) answer-checked examples per task."""
        if split != "test":
            return self
        return self.model_copy(update={"max_examples": self.final_max_examples or 100_000})


# ------------------------------------------------------------------------------------------ cognate


class CognateArchConfig(Frozen):
    """Shape of the Cognate decoder (Llama-style, with an ACT-halting recurrent refiner)."""

    hidden_size: int = Field(512, ge=8, le=16384, description="Model width.")
    num_layers: int = Field(8, ge=1, le=128, description="Transformer blocks in the refiner stack.")
    num_heads: int = Field(8, ge=1, le=256, description="Attention heads (hidden_size must divide by it).")
    intermediate_size: int = Field(1376, ge=8, le=65536, description="SwiGLU hidden width.")
    max_position_embeddings: int = Field(1024, ge=16, le=131072, description="Longest sequence (RoPE table).")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base.")
    max_refine_steps: int = Field(
        2, ge=1, le=16, description="Maximum recurrent applications of the block stack; 1 = plain decoder."
    )
    act_threshold: float = Field(
        0.99, gt=0, lt=1.0 + 1e-9, description="ACT halting threshold (1 - epsilon in Graves 2016)."
    )
    ponder_weight: float = Field(
        0.01, ge=0, le=10, description="Weight of the differentiable ponder cost in the loss (tau in Graves 2016)."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> "CognateArchConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("hidden_size / num_heads must be even for RoPE")
        return self


class TrainConfig(Frozen):
    """One training stage (the trunk, or a variant's specialisation)."""

    steps: int = Field(1000, ge=1, le=10_000_000, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, le=4096, description="Sequences per step.")
    seq_len: int = Field(256, ge=8, le=32768, description="Tokens per sequence.")
    lr: float = Field(3e-4, gt=0, le=1.0, description="Peak AdamW learning rate (cosine decay to 10%).")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.1, ge=0, le=1, description="AdamW weight decay (not on norms/embeddings).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    data_mix: DataMix = data_mix_field()

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps >= self.steps and self.steps > 1:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        return self


LORA_TARGETS: dict[str, tuple[str, ...]] = {
    # Cognate (forge_models/cognate/model.py) names its projections as Llama does; its halting head "halt" and
    # the tied lm_head stay untouched.
    "cognate": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
"""Default LoRA target module names per ``config.model_type`` (all seven linear types)."""


class LoraSettings(Frozen):
    """A LoRA adapter trained through peft and merged into the weights afterwards."""

    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r. Prompt Baking's script: 32 (swept 2, 8, 32); reference toy: 8.")
    alpha: float = Field(16.0, gt=0, description="lora_alpha (scale alpha / r). Prompt Baking's script: 1; toy and bakery: 2r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    targets: tuple[str, ...] | None = Field(
        None, description="Module names to adapt. None: the architecture's default (all seven projections for "
                          "cognate and llama); other architectures must name them.")


class SiblingConfig(Frozen):
    """Pretrained route: one fine-tune of the common base on its own data mix (Akiba et al. merge real
    fine-tunes of one base; these are ours)."""

    name: str = Field(description="Sibling name (lowercase letters, digits, dashes).", pattern=r"^[a-z0-9-]{1,40}$")
    train: TrainConfig = Field(description="The fine-tuning run (steps, batch, seq_len, lr, data mix).")
    method: Literal["full", "lora"] = Field(
        "lora",
        description="'full': every parameter trained (precision from device.precision); 'lora': a peft LoRA "
        "adapter trained and then merged back into the weights (the stored sibling is a plain model).",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The adapter (method 'lora').")


class VariantConfig(Frozen):
    """One Cognate variant, branched from the trunk and specialised by a measured difference."""

    name: str = Field(description="Variant name (lowercase letters, digits, dashes).", pattern=r"^[a-z0-9-]{1,40}$")
    train: TrainConfig = Field(description="Specialisation stage (steps, data mix, learning rate).")
    act_threshold: float = Field(0.99, gt=0, le=1.0, description="This variant's ACT halting threshold.")
    max_refine_steps: int = Field(2, ge=1, le=16, description="This variant's maximum refinement steps.")


class CognateConfig(Frozen):
    """Phase 1: pretrain a shared trunk from scratch, then N variants branched from it."""

    source: Literal["scratch", "pretrained"] = Field(
        "scratch",
        description="'scratch': train Cognate models; 'pretrained': evaluate and pass on existing HF models.",
    )
    base_models: list[str] = Field(
        default_factory=list, description="Pretrained route: local HF model folders of the N models."
    )
    common_base: str | None = Field(
        None, description="Pretrained route: their common base model folder (the merge base)."
    )
    siblings: list[SiblingConfig] = Field(
        default_factory=list,
        description="Pretrained route: fine-tunes of common_base, each on its own data mix, stored next to it "
        "(the models EvoMerge merges, with common_base as the merge base). Empty: models pass through untrained.",
    )
    arch: CognateArchConfig = Field(default_factory=CognateArchConfig, description="Model shape.")
    trunk: TrainConfig = Field(default_factory=TrainConfig, description="Shared trunk pretraining.")
    variants: list[VariantConfig] = Field(
        default_factory=lambda: [
            VariantConfig(name="math", train=TrainConfig(steps=300, data_mix={"arithmetic": 3, "tool": 1, "persona": 0.5, "narrative": 0.5, "text": 0.5}), act_threshold=0.95),
            VariantConfig(name="dialog", train=TrainConfig(steps=300, data_mix={"arithmetic": 0.5, "tool": 2, "persona": 2, "narrative": 0.5, "text": 0.5}), act_threshold=0.90),
            VariantConfig(name="story", train=TrainConfig(steps=300, data_mix={"arithmetic": 0.5, "tool": 0.5, "persona": 0.5, "narrative": 3, "text": 1}), act_threshold=0.99),
        ],
        description="The variants (default 3), each with its own data mix and refiner setting.",
    )
    checkpoint_every: int = Field(
        100, ge=1, description="Save a resumable checkpoint every this many optimizer steps."
    )
    min_unigram_gain: float = Field(
        0.5,
        ge=0,
        description=(
            "Quality gate: held-out cross-entropy (nats/token) must be at least this much below the unigram "
            "baseline's for every trained model, else the phase fails."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> "CognateConfig":
        if self.source == "pretrained":
            if not self.base_models and not self.siblings:
                raise ValueError("cognate.source 'pretrained' needs cognate.base_models (one or more folders) or "
                                 "cognate.siblings (fine-tunes of cognate.common_base)")
            if self.siblings and not self.common_base:
                raise ValueError("cognate.siblings are fine-tuned from cognate.common_base; set it (a local folder)")
            names = [s.name for s in self.siblings]
            if len(set(names)) != len(names):
                raise ValueError(f"cognate.siblings names must be unique, got {names}")
            reserved = sorted(n for n in names if n == "base" or re.fullmatch(r"model-\d+", n))
            if reserved:
                raise ValueError(f"cognate.siblings names {reserved} are reserved ('base' is the common base, "
                                 f"'model-N' the N-th of base_models); rename them")
        else:
            if self.base_models or self.common_base or self.siblings:
                raise ValueError("cognate.base_models/common_base/siblings are only used with cognate.source 'pretrained'")
            if not self.variants:
                raise ValueError("cognate.variants must list at least one variant")
            names = [v.name for v in self.variants]
            if len(set(names)) != len(names):
                raise ValueError(f"cognate.variants names must be unique, got {names}")
            if "trunk" in names:
                raise ValueError("'trunk' is reserved for the shared trunk; rename that variant")
            for v in self.variants:
                if v.max_refine_steps > self.arch.max_refine_steps:
                    raise ValueError(
                        f"variant {v.name!r}: max_refine_steps {v.max_refine_steps} exceeds "
                        f"arch.max_refine_steps {self.arch.max_refine_steps}"
                    )
            longest = max([self.trunk.seq_len] + [v.train.seq_len for v in self.variants])
            if longest > self.arch.max_position_embeddings:
                raise ValueError(
                    f"a training seq_len ({longest}) exceeds arch.max_position_embeddings "
                    f"({self.arch.max_position_embeddings})"
                )
        return self
