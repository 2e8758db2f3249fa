"""QuietStarConfig: the phase's settings. Defaults follow the released ``quiet-star-train.py`` where they carry
over, scaled down for the tiny preset where the released value only makes sense for Mistral-7B (each such
field says so)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from forge_models.config import DataMix, data_mix_field


class QuietStarConfig(BaseModel):
    """Quiet-STaR (Zelikman et al. 2024, arXiv 2403.09629) training of one causal LM."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_model: str | None = Field(
        None, description="which model of a multi-model input to train (None: the input must hold exactly one).")
    thought_tokens: int = Field(
        4, ge=0,
        description="sampled thought tokens between <|startthought|> and <|endthought|>. Released: 9 (n_ahead 12 = "
                    "base pass + start + 9 + end); scaled down to 4 for the tiny preset (cost grows with it).",
    )
    n_ahead_talk: int = Field(
        4, ge=1, description="true future tokens teacher-forced after the end token (non-myopic loss); released: 4.")
    n_passes: int = Field(
        2, ge=1, description="thoughts sampled per position; their mean reward is the REINFORCE baseline "
                             "(released trice_mode with n_passes 2).")
    gumbel_temperature: float = Field(
        1.0, gt=0, description="temperature of the Gumbel-max sampling of thought tokens in training (released 1.0).")
    eval_temperature: float = Field(
        0.001, gt=0, description="thought sampling temperature at inference (released eval default 0.001, ~greedy).")
    policy_temperature: float = Field(
        3.0, gt=0, description="temperature of the thought log-probabilities in the REINFORCE loss (released 3).")
    policy_loss_beta: float = Field(
        1.0, ge=0,
        description="weight of the REINFORCE term. Released 1e6 at lr 1e-6 on Mistral-7B; here 1.0 at lr 1e-3 "
                    "(deviation: at tiny scale 1e6 makes the policy term swamp the LM loss under Adam).",
    )
    remove_negative_rewards: bool = Field(
        True, description="clamp advantages below 0 to 0 (released remove_negative_rewards=True).")
    original_loss_weight: float = Field(
        0.5, ge=0, le=1, description="LM loss = w * no-thought NLL + (1 - w) * mean talk NLL (released 0.5).")
    embedding_scale: float = Field(
        100.0, gt=0, description="thought-token embeddings are stored divided by this and multiplied back at use, "
                                 "~100x their learning rate (released 1e2).")
    init_token: str = Field("---", description="text whose embedding initialises both thought tokens (released '---').")
    steps: int = Field(60, ge=0, description="optimizer steps (released kill_after 100; tiny preset: 60).")
    batch_size: int = Field(4, ge=1, description="sequences per step (released 8 = 4 x 2 accumulation).")
    seq_len: int = Field(48, ge=4, description="tokens per training sequence (released 256; tiny: 48).")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (released 1e-6 for a 7B model; tiny: 1e-3).")
    trunk_lr_scale: float = Field(
        0.1, ge=0,
        description="learning-rate multiplier of the base model's own weights; the thought embeddings and the mixing "
                    "head train at lr. Released: one lr for all, 1e-6 on Mistral-7B, so the trunk barely moves. "
                    "At the tiny preset's lr 1e-3 a trunk at the full lr drifts and the no-thought loss rises "
                    "(measured: +0.055 nats); at 0.1 it falls (deviation). 0 freezes the trunk.",
    )
    weight_decay: float = Field(0.001, ge=0, description="AdamW weight decay (released 0.001).")
    warmup_steps: int = Field(5, ge=0, description="linear warm-up steps (released 20 of 100; tiny: 5 of 60).")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm (released 1.0).")
    mixing_hidden: int | None = Field(
        None, ge=1, description="hidden width of the mixing MLP (None: the model's hidden size, as released).")
    seed: int = Field(0, description="seed of the thought sampling and the mixing-head initialisation.")
    data_mix: DataMix = data_mix_field()
    eval_examples: int = Field(
        48, ge=1, description="held-out examples (per measure) of the with-vs-without-thoughts comparison.")
    gen_examples: int = Field(
        16, ge=0,
        description="held-out arithmetic prompts answered by generation with and without thoughts (exact match "
                    "and tokens/s of both; 0 skips it). Costs budget + 3 model steps per generated token.")
