"""The Forge loop itself: stages, steps, batches, checks, rollbacks, dream cycles and checkpoints.

`forge_models.training.phase.run` builds a :class:`Loop`, calls :meth:`Loop.train` and reports; the steps
are described in that module's docstring. The JSON state is :class:`~forge_models.training.state.LoopState`,
the exit criteria are :mod:`forge_models.training.criteria`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from forge_models.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from forge_models.data import Corpus, held_out_keys, mask_unscored, without_eval_units
from forge_models.data.stream import TokenSampler, trains_in_chat
from forge_models.optim import make_adamw
from forge_models.runtime import ConfigError, PhaseContext, TrainingDiverged, check_finite
from forge_models.tokenizer import eos_token_id
from forge_models.training.config import StageConfig, TrainingConfig
from forge_models.training.criteria import exit_criterion
from forge_models.training.curriculum import BandController, answer_success, generate_tasks, stream_rng
from forge_models.training.dreams import STOPS, check_dream, sample_continuations
from forge_models.training.grokfast import gradfilter_ema, gradfilter_ma
from forge_models.training.selfmodel import LayerTap, SelfModelHead, decoder_layers, logit_lens, scale_grad, self_model_loss
from forge_models.training.state import LoopState

__all__ = ["Loop", "STAGE_DIR", "quant_lambda"]

STAGE_DIR = "forge"
PROGRESS_EVENTS = 100
# A loss this many times ln(vocab) (a uniform guess) has exploded, not merely got worse.
EXPLODE_FACTOR = 4.0
ENTRY_CRITERIA = {
    "adapt": "held-out loss within max_regression of the best",
    "ramp": "curriculum enabled",
    "dream": "dreams enabled",
    "self": "self-model enabled",
    "stabilise": "held-out loss within max_regression of the best",
}


def _seed_of(seed: int, stream: str, index: int) -> int:
    digest = hashlib.sha256(f"forge-loop:{stream}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


class Loop:
    """The state of one run of the loop and the procedures that advance it (see the module docstring).

    ``self.s`` (:class:`LoopState`) is the JSON-serialisable part of the state (it goes into ``state.json``);
    tensors (model, head, best state, Grokfast buffers) go into ``model.safetensors`` through :meth:`_bundle`.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, corpus: Corpus, cfg: TrainingConfig, ctx: PhaseContext,
                 digest: str) -> None:
        self.model, self.tokenizer, self.cfg, self.ctx, self.digest = model, tokenizer, cfg, ctx, digest
        self.eos = eos_token_id(tokenizer)
        self.sampler = TokenSampler(corpus.split("train"), tokenizer, cfg.data_mix, cfg.seq_len, cfg.batch_size,
                                    ctx.seed, chat=trains_in_chat(tokenizer))
        self.exclude = held_out_keys(corpus)  # every held-out calculation, in any wording
        # Eval-source units are held out from every training decision too (checks drive rollbacks).
        self.check_rows = _token_windows(without_eval_units(corpus.split("validation")), tokenizer, cfg.check_tokens,
                                         cfg.seq_len)
        self.vocab = int(model.get_output_embeddings().weight.shape[0])
        self.max_positions = int(getattr(model.config, "max_position_embeddings", None) or 4 * cfg.seq_len)
        self.total = sum(st.steps for st in cfg.stages)
        self.quant_lambda = quant_lambda(model)  # BitNet quantisation strength, logged by step (None: not BitNet)

        self.head: SelfModelHead | None = None
        self.tap: LayerTap | None = None
        if cfg.self_model.enabled:
            layers = decoder_layers(model)
            if cfg.self_model.tap_layer >= len(layers):
                raise ConfigError(f"self_model.tap_layer {cfg.self_model.tap_layer} but the model has {len(layers)} layers")
            torch.manual_seed(_seed_of(ctx.seed, "head", 0))
            self.head = SelfModelHead(int(model.config.hidden_size), self.vocab).to(ctx.device)
            self.tap = LayerTap(layers[cfg.self_model.tap_layer])
        self.optimizer = make_adamw(model, cfg.lr, cfg.weight_decay,
                                    extra=self.head.parameters() if self.head is not None else ())
        self.controller = BandController(cfg.curriculum.band_low, cfg.curriculum.band_high, cfg.curriculum.gain,
                                         cfg.curriculum.initial_difficulty)
        self.grok: dict[str, Any] | None = None
        self.best: dict[str, torch.Tensor] = {}
        self.steps_run = 0
        self.resumed_from: int | None = None
        self._progress_last = -1
        self.s = LoopState(curriculum=self.controller.state())

    def close(self) -> None:
        if self.tap is not None:
            self.tap.remove()

    # ------------------------------------------------------------------------------ stages and steps

    def train(self) -> None:
        stage_dir = self.ctx.checkpoint_dir / STAGE_DIR if self.ctx.checkpoint_dir is not None else None
        latest = latest_checkpoint(stage_dir) if stage_dir is not None else None
        if latest is not None:
            self._load(latest)
            if self.s.done:
                self._progress(force=True, message="forge: loaded finished run")
                return
        else:
            self._check(initial=True)
            self._enter_stage()
        stages = self.cfg.stages
        while self.s.stage < len(stages):
            stage = stages[self.s.stage]
            t0 = time.perf_counter()
            if stage.dreams and self.cfg.dreams.enabled and self.s.stage_step % self.cfg.dreams.every == 0:
                self._dream_cycle(stage)
            logged = self._step(stage)
            self.s.stage_step += 1
            self.s.step += 1
            self.steps_run += 1
            local = self.s.stage_step
            record = self.s.records[-1]
            record["steps"] = local
            ended_by = None
            if local % self.cfg.eval_every == 0 or local == stage.steps:
                logged.update(self._check())
                met, reason = self._criterion(stage)
                record["exit_met"], record["exit_reason"] = met, reason
                if met:
                    ended_by = "criterion"
            if ended_by is None and local >= stage.steps:
                ended_by = "budget"
            record["seconds"] += time.perf_counter() - t0
            if ended_by is not None:
                self._end_stage(ended_by)
            step = self.s.step
            if stage_dir is not None and (step % self.cfg.checkpoint_every == 0 or self.s.done):
                self._save(stage_dir)
            self.ctx.tracker.log_metrics(logged, step=step)
            self._progress(message=f"forge {stage.name}: step {step} loss {logged['train/loss']:.3f}")

    def _enter_stage(self) -> None:
        stage = self.cfg.stages[self.s.stage]
        last = self.s.last
        if stage.group in ("adapt", "stabilise"):
            met = last["val_loss"] <= self.s.best_val + self.cfg.max_regression
        else:
            met = {"ramp": self.cfg.curriculum.enabled, "dream": self.cfg.dreams.enabled,
                   "self": self.cfg.self_model.enabled}[stage.group]
        self.s.records.append({
            "index": self.s.stage + 1, "name": stage.name, "group": stage.group, "budget": stage.steps,
            "steps": 0, "start_step": self.s.step, "end_step": None, "ended_by": None, "seconds": 0.0,
            "entry_criterion": ENTRY_CRITERIA[stage.group], "entry_met": bool(met), "entry": dict(last),
            "exit_criterion": stage.exit, "exit_met": False, "exit_reason": "no check yet", "exit": None,
        })
        self.s.stage_vals = []
        self.s.stage_band = 0
        self.s.stage_stable = 0
        self.s.stage_dream_cycles = 0
        self.s.stage_dream_kept = 0

    def _end_stage(self, ended_by: str) -> None:
        record = self.s.records[-1]
        record.update(ended_by=ended_by, end_step=self.s.step, exit=dict(self.s.last))
        self.ctx.tracker.progress(self.s.step, self.total,
                                  f"forge: stage {record['name']} ended by {ended_by} after {record['steps']} steps")
        self.s.stage += 1
        self.s.stage_step = 0
        if self.s.stage < len(self.cfg.stages):
            self._enter_stage()
        else:
            self.s.done = True

    def _lr(self, stage: StageConfig) -> float:
        step, local = self.s.step, self.s.stage_step
        if step < self.cfg.warmup_steps:
            return self.cfg.lr * (step + 1) / self.cfg.warmup_steps
        if stage.lr_decay:
            frac = local / max(1, stage.steps - 1)
            return self.cfg.lr * (1.0 - (1.0 - self.cfg.lr_min_ratio) * min(1.0, frac))
        return self.cfg.lr

    def _step(self, stage: StageConfig) -> dict[str, float]:
        """One optimizer step; returns the values logged for it."""
        cfg, ctx, model = self.cfg, self.ctx, self.model
        step = self.s.step
        lr = self._lr(stage)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch, composition = self.batch(step, stage)
        labels = mask_unscored(batch, self.tokenizer)  # tool output lines are not the model's to predict
        labels[: composition["real"]] = self.sampler.labels(step)[: composition["real"]]  # exact for cut rows
        batch, labels = batch.to(ctx.device), labels.to(ctx.device)
        model.train()
        if self.tap is not None:
            self.tap.reset()
        with ctx.autocast():
            out = model(input_ids=batch, labels=labels)
        check_finite(out.loss, step + 1, "forge loss")
        if float(out.loss.detach()) > EXPLODE_FACTOR * math.log(self.vocab):
            raise TrainingDiverged(
                f"forge loss exploded to {float(out.loss):.3f} at step {step + 1} (> {EXPLODE_FACTOR} x ln(vocab)). "
                f"Lower training.lr or the stages' chaos; this is not retried."
            )
        loss = out.loss
        logged: dict[str, float] = {}
        if self.head is not None:
            weight = cfg.self_model.weight * stage.self_model
            with ctx.autocast():
                pred = self.head(scale_grad(self.tap.take(), weight))
            sm = self_model_loss(pred, out.logits, cfg.self_model.temperature)
            check_finite(sm, step + 1, "self-model loss")
            loss = loss + sm
            logged.update({"train/self_model_loss": float(sm.detach()), "train/self_model_weight": weight})
        loss.backward()

        if cfg.grokfast.enabled:
            if cfg.grokfast.kind == "ema":
                self.grok = gradfilter_ema(model, grads=self.grok, alpha=cfg.grokfast.alpha, lamb=cfg.grokfast.lamb)
            else:
                self.grok = gradfilter_ma(model, grads=self.grok, window_size=cfg.grokfast.window_size,
                                          lamb=cfg.grokfast.lamb)
        chaos = min(cfg.chaos_max, stage.chaos * self.s.chaos_scale)
        if chaos > 0:
            _inject_noise(model, chaos, torch.Generator().manual_seed(_seed_of(ctx.seed, "chaos", step)))
        params = [p for p in self._trainable() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        value = float(out.loss.detach())
        self.s.recent_losses.append(value)
        self._curve("train/loss", step + 1, value)
        self._curve("train/lr", step + 1, lr)
        if chaos > 0 or stage.chaos > 0:
            self._curve("train/chaos", step + 1, chaos)
        logged.update({
            "train/loss": value, "train/lr": lr, "train/grad_norm": float(grad_norm), "train/chaos": chaos,
            "train/stage": float(self.s.stage + 1), "batch/curriculum_rows": float(composition["curriculum"]),
            "batch/dream_rows": float(composition["dream"]), "batch/real_rows": float(composition["real"]),
            "curriculum/difficulty": self.controller.difficulty,
            **({"train/lambda": self.quant_lambda} if self.quant_lambda is not None else {}),
        })
        return logged

    def _trainable(self) -> Iterator[nn.Parameter]:
        yield from (p for p in self.model.parameters() if p.requires_grad)
        if self.head is not None:
            yield from self.head.parameters()

    # ------------------------------------------------------------------------------------- batches

    def batch(self, step: int, stage: StageConfig) -> tuple[torch.Tensor, dict[str, int]]:
        """Batch ``step``: real rows, then curriculum rows, then dream rows (a pure function of the state)."""
        cfg = self.cfg
        b = cfg.batch_size
        n_cur = round(b * cfg.curriculum.batch_fraction) if stage.curriculum and cfg.curriculum.enabled else 0
        buffer = self.s.dream_buffer
        n_dream = round(b * cfg.dreams.replay_ratio) if stage.replay and cfg.dreams.enabled and buffer else 0
        rows = [self.sampler.batch(step)[: b - n_cur - n_dream]]
        if n_cur:
            rng = stream_rng(self.ctx.seed, "train", step)
            d, c = self.controller.difficulty, cfg.curriculum

            def tasks() -> Iterator[str]:
                while True:
                    yield generate_tasks(rng, 1, d, c.families, c.min_operand, c.max_operand, self.exclude)[0].text

            rows.append(self._pack(tasks(), n_cur))
        if n_dream:
            gen = torch.Generator().manual_seed(_seed_of(self.ctx.seed, "replay", step))

            def dreams() -> Iterator[str]:
                while True:
                    yield buffer[int(torch.randint(len(buffer), (1,), generator=gen))]

            rows.append(self._pack(dreams(), n_dream))
        return torch.cat(rows), {"real": b - n_cur - n_dream, "curriculum": n_cur, "dream": n_dream}

    def _pack(self, texts: Iterator[str], n_rows: int) -> torch.Tensor:
        """``n_rows`` rows of ``seq_len`` tokens: EOS, text, EOS, text, ... cut at the row's end."""
        out = []
        for _ in range(n_rows):
            row = [self.eos]
            while len(row) < self.cfg.seq_len:
                row += self.tokenizer(next(texts), add_special_tokens=False)["input_ids"] + [self.eos]
            out.append(row[: self.cfg.seq_len])
        return torch.tensor(out, dtype=torch.long)

    # -------------------------------------------------------------------------------------- checks

    @torch.no_grad()
    def _held_out(self) -> dict[str, float]:
        """Check loss on the validation windows, and the self-model head's and copy baseline's losses."""
        model, ctx = self.model, self.ctx
        was_training = model.training
        model.eval()
        ce = sm = copy_loss = 0.0
        count = rows = 0
        t = self.cfg.self_model.temperature
        try:
            for start in range(0, len(self.check_rows), self.cfg.batch_size):
                ids = self.check_rows[start : start + self.cfg.batch_size].to(ctx.device)
                if self.tap is not None:
                    self.tap.reset()
                with ctx.autocast():
                    logits = model(input_ids=ids).logits.float()
                ce += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="sum"))
                count += ids[:, 1:].numel()
                if self.head is not None:
                    h = self.tap.take()
                    with ctx.autocast():
                        pred, lens = self.head(h), logit_lens(model, h, t)
                    sm += float(self_model_loss(pred, logits, t)) * len(ids)
                    copy_loss += float(self_model_loss(lens, logits, t)) * len(ids)
                    rows += len(ids)
        finally:
            model.train(was_training)
        out = {"val_loss": ce / count}
        if self.head is not None:
            out.update({"self_model_loss": sm / rows, "self_model_copy_loss": copy_loss / rows})
        return out

    def _check(self, initial: bool = False) -> dict[str, float]:
        """Measure, move the curriculum, detect noise and regressions; returns the logged values."""
        s, cfg = self.s, self.cfg
        step = s.step
        values = self._held_out()
        stage = cfg.stages[s.stage]
        if not initial and stage.curriculum and cfg.curriculum.enabled:
            c = cfg.curriculum
            measured_at = self.controller.difficulty
            probes = generate_tasks(stream_rng(self.ctx.seed, "probe", s.checks), c.window, measured_at,
                                    c.families, c.min_operand, c.max_operand, self.exclude)
            success = sum(answer_success(self.model, self.tokenizer, probes, self.ctx)) / len(probes)
            in_band = c.band_low <= success <= c.band_high
            self.controller.update(success, step)
            s.stage_band = s.stage_band + 1 if in_band else 0
            values.update({"success": success, "difficulty": measured_at})
            self._curve("curriculum/success", step, success)
            self._curve("curriculum/difficulty", step, measured_at)
        s.checks += 1
        for cycle in s.dream_cycles:
            if cycle["val_after"] is None:
                cycle["val_after"] = values["val_loss"]
                cycle["val_change"] = values["val_loss"] - cycle["val_before"]
                if "success" in values:
                    cycle["success_after"] = values["success"]

        losses, s.recent_losses = s.recent_losses, []
        if len(losses) >= 2 and stage.chaos > 0:
            mean = sum(losses) / len(losses)
            cv = math.sqrt(sum((x - mean) ** 2 for x in losses) / (len(losses) - 1)) / max(mean, 1e-8)
            if cv > cfg.loss_cv_max:
                s.chaos_scale *= 0.5
                s.events.append({"step": step, "stage": stage.name, "event": "chaos halved",
                                    "loss_cv": cv, "chaos_scale": s.chaos_scale})

        val = values["val_loss"]
        if initial or val < s.best_val:
            s.best_val, s.best_step = val, step
            self.best = self._snapshot()
        elif val > s.best_val + cfg.max_regression:
            self._restore(self.best)
            s.chaos_scale *= 0.5
            s.rollbacks.append({"step": step, "stage": stage.name, "check_loss": val, "best_loss": s.best_val,
                                   "best_step": s.best_step, "threshold": cfg.max_regression,
                                   "action": "restored the best state, reset optimizer and Grokfast, halved chaos"})
            values["rolled_back_from"] = val
            values.update(self._held_out())  # the state now in use, measured again
        val = values["val_loss"]
        s.stage_vals.append(val)
        s.stage_stable = s.stage_stable + 1 if val <= s.best_val + cfg.stable_tol else 0
        s.last = {k: float(v) for k, v in values.items()}
        self._curve("check/val_loss", step, val)
        if self.head is not None:
            self._curve("self_model/loss", step, values["self_model_loss"])
            self._curve("self_model/copy_loss", step, values["self_model_copy_loss"])
        return {f"check/{k}": float(v) for k, v in values.items()}

    def _criterion(self, stage: StageConfig) -> tuple[bool, str]:
        """Whether the stage's exit criterion holds at this check, and why (or why not)."""
        return exit_criterion(stage.exit)(self.s, stage, self.cfg, self.head is not None)

    # -------------------------------------------------------------------------------------- dreams

    def _dream_cycle(self, stage: StageConfig) -> None:
        s, cfg, c = self.s, self.cfg.dreams, self.cfg.curriculum
        index = len(s.dream_cycles)
        difficulty = self.controller.difficulty if c.enabled else c.initial_difficulty
        tasks = generate_tasks(stream_rng(self.ctx.seed, "dream", index), cfg.n_samples, difficulty, c.families,
                               c.min_operand, c.max_operand, self.exclude)
        gen = torch.Generator().manual_seed(_seed_of(self.ctx.seed, "dream-sample", index))
        replies = sample_continuations(self.model, self.tokenizer, [t.prompt for t in tasks],
                                       [STOPS[t.kind] for t in tasks], cfg.max_new_tokens, cfg.temperature, gen,
                                       self.ctx, self.max_positions)
        kept = [text for text in (check_dream(t, r) for t, r in zip(tasks, replies)) if text is not None]
        buffer = s.dream_buffer + kept
        s.dream_buffer = buffer[-cfg.buffer_size:]
        s.stage_dream_cycles += 1
        s.stage_dream_kept += len(kept)
        step = s.step
        s.dream_cycles.append({
            "cycle": index + 1, "step": step, "stage": stage.name, "difficulty": difficulty,
            "generated": len(tasks), "kept": len(kept), "kept_rate": len(kept) / len(tasks),
            "buffer": len(s.dream_buffer), "val_before": s.last["val_loss"], "val_after": None,
            "val_change": None, "success_before": s.last.get("success"), "success_after": None,
        })
        self._curve("dream/kept", step, float(len(kept)))
        self._curve("dream/kept_rate", step, len(kept) / len(tasks))
        self._curve("dream/buffer", step, float(len(s.dream_buffer)))
        self.ctx.tracker.log_metrics({"dream/kept": float(len(kept)), "dream/generated": float(len(tasks)),
                                      "dream/buffer": float(len(s.dream_buffer))}, step=step)

    # ------------------------------------------------------------------------------ state, rollback

    def _curve(self, name: str, step: int, value: float) -> None:
        self.s.curves.setdefault(name, []).append([int(step), float(value)])

    def _snapshot(self) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.head is not None:
            state.update({f"head.{k}": v.detach().clone() for k, v in self.head.state_dict().items()})
        return state

    def _restore(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
        if self.head is not None:
            self.head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
        self.optimizer.state.clear()
        self.grok = None

    def _bundle(self) -> nn.Module:
        """One module holding every tensor of the state (what ``model.safetensors`` stores)."""
        bundle = nn.Module()
        bundle.model = self.model
        if self.head is not None:
            bundle.head = self.head
        bundle.best = _buffers(self.best)
        grok: dict[str, torch.Tensor] = {}
        for name, value in (self.grok or {}).items():
            grok[name] = torch.stack(list(value)) if isinstance(value, deque) else value
        bundle.grok = _buffers(grok)
        return bundle

    def _save(self, stage_dir: Path) -> None:
        s = self.s
        s.curriculum = self.controller.state()
        s.grok_shapes = {k: (len(v) if isinstance(v, deque) else None) for k, v in (self.grok or {}).items()}
        save_checkpoint(stage_dir, stage=STAGE_DIR, step=s.step, total=s.step if s.done else self.total + 1,
                        config_digest=self.digest, model=self._bundle(), optimizer=self.optimizer, ctx=self.ctx,
                        extra={"loop": s.to_json()})

    def _load(self, folder: Path) -> None:
        saved = json.loads((folder / "state.json").read_text())
        loop = saved.get("loop")
        if loop is None:
            raise ConfigError(f"checkpoint {folder} is not a Forge-loop checkpoint; clear {folder.parent} to start over")
        params = dict(self.model.named_parameters())
        self.best = self._snapshot()
        grok: dict[str, Any] = {}
        for name, length in loop.get("grok_shapes", {}).items():
            if name not in params:
                raise ConfigError(f"checkpoint {folder} has Grokfast state for unknown parameter {name!r}")
            shape = params[name].shape
            grok[name] = torch.zeros(shape) if length is None else torch.zeros((length, *shape))
        self.grok = grok or None
        bundle = self._bundle()
        load_checkpoint(folder, config_digest=self.digest, model=bundle, optimizer=self.optimizer,
                        device=self.ctx.device, what="input model, configuration, data or tokenizer")
        self.best = {_unname(k): v.clone() for k, v in bundle.best.named_buffers()}
        if self.grok is not None:
            loaded = {_unname(k): v.clone() for k, v in bundle.grok.named_buffers()}
            if self.cfg.grokfast.kind == "ma":
                self.grok = {k: deque(list(v.unbind(0)), maxlen=self.cfg.grokfast.window_size) for k, v in loaded.items()}
            else:
                self.grok = loaded
        self.s = LoopState.from_json(loop)
        self.controller.load(loop["curriculum"])
        self.resumed_from = int(loop["step"])
        self._progress(force=True, message=f"forge: resumed at step {self.resumed_from}")

    def _progress(self, message: str, force: bool = False) -> None:
        done = self.s.step
        if force or done - self._progress_last >= max(1, self.total // PROGRESS_EVENTS) or self.s.done:
            self.ctx.tracker.progress(done, self.total, message)
            self._progress_last = done

    # --------------------------------------------------------------------------------- self-model

    @torch.no_grad()
    def measure_self_model(self) -> dict[str, Any]:
        """Held-out self-model loss of the trained head against the copy baseline and an untrained head."""
        if self.head is None:
            return {"enabled": False}
        values = self._held_out()
        trained = self.head
        torch.manual_seed(_seed_of(self.ctx.seed, "untrained-head", 0))
        self.head = SelfModelHead(trained.proj.in_features, self.vocab).to(self.ctx.device)
        untrained = self._held_out()["self_model_loss"]
        self.head = trained
        return {
            "enabled": True, "loss": values["self_model_loss"], "copy_loss": values["self_model_copy_loss"],
            "untrained_loss": untrained, "tap_layer": self.cfg.self_model.tap_layer,
            "temperature": self.cfg.self_model.temperature, "weight": self.cfg.self_model.weight,
            "target": "KL(softmax(final logits / T) || head(layer output)), validation windows",
        }


# -------------------------------------------------------------------------------------------- helpers


def _buffers(tensors: dict[str, torch.Tensor]) -> nn.Module:
    module = nn.Module()
    for name, t in tensors.items():
        module.register_buffer(name.replace(".", "__"), t)
    return module


def _unname(buffer_name: str) -> str:
    return buffer_name.replace("__", ".")


def _inject_noise(model: nn.Module, chaos: float, gen: torch.Generator) -> None:
    """g += chaos * RMS(g) * N(0, 1) per gradient tensor (noise bounded relative to the gradient itself)."""
    for p in model.parameters():
        if p.grad is None:
            continue
        rms = p.grad.detach().float().pow(2).mean().sqrt()
        noise = torch.randn(p.grad.shape, generator=gen).to(p.grad.device, p.grad.dtype)
        p.grad.add_(noise * (chaos * rms).to(p.grad.dtype))


def _token_windows(examples: Sequence[Any], tokenizer: Any, limit: int, seq_len: int) -> torch.Tensor:
    """The first ``limit`` tokens of the examples' stream (each text + EOS) as full rows of ``seq_len``."""
    eos = eos_token_id(tokenizer)
    stream: list[int] = []
    for ex in examples:
        stream += tokenizer(ex.text, add_special_tokens=False)["input_ids"] + [eos]
        if len(stream) >= limit:
            break
    n = min(len(stream), limit) // seq_len
    if n == 0:
        raise ConfigError(f"the validation split has fewer than seq_len={seq_len} tokens; the loop cannot check")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def quant_lambda(model: nn.Module) -> float | None:
    """BitNet quantisation strength of a converted model (all its BitLinear layers agree), else None."""
    from forge_models.bitnet.layers import BitLinear

    strengths = {float(m.quant_strength) for m in model.modules() if isinstance(m, BitLinear)}
    if not strengths:
        return None
    if len(strengths) > 1:
        raise ConfigError(f"the input's BitLinear layers disagree on lambda {sorted(strengths)}; set one strength")
    return strengths.pop()
