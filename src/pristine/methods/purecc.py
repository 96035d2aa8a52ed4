"""PureCC: pure learning for concept customization (METHODS.md section 1, arXiv 2603.07561).

Stage 1 trains the representation extractor θ1: the concept token plus a LoRA ("extractor").
Stage 2 trains a fresh LoRA θ2 ("learner") on the same copy of the base weights with

    R        = f_θ1(x_t | y_tar) - f_θ1(x_t | ∅)                      (no gradient)
    L_CC     = || f_θ2(x_t | y_complete) - target ||²
    L_PureCC = || f_θ2(x_t | y_complete) - [ f_θ2(x_t | y_base) + λ R ] ||²
    L        = L_CC + η L_PureCC

Both stages run in one training loop: the first `stage1_steps` steps are stage 1. θ1 and θ2 are two
peft adapters on one denoiser; the active one is switched, the base weights are never copied.

Anchored variant (ours, not the paper's nor the authors' code; the default, since the paper's form
polluted more than plain LoRA on MiniBench): with `base_branch=original` the y_base
prediction is the original model's (adapters off, no gradient), f_orig(x_t | y_base), computed in the
frozen forward that gives R; the learner then predicts y_complete alone. `base_preserve_weight` adds
|| f_θ2(x_t | y_base) - f_orig(x_t | y_base) ||², for which the learner predicts y_base as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import UsageError
from .base import Method, MethodConfig, TokenEmbeddings, draw_noise, register
from .lora import AdapterSwitch, LoraConfig, add_lora, lora_params, lora_run_denoiser, save_lora

EXTRACTOR, LEARNER = "extractor", "learner"


@dataclass
class PureCCConfig(MethodConfig):
    stage: str = "both"  # "1", "2" (needs stage1_run) or "both"
    stage1_steps: int = 400
    stage1_run: str = ""  # a finished stage-1 run folder, for --stage 2
    rank: int = 4
    alpha: float = 4.0
    stage1_lr: float = 1e-4
    token_lr: float = 5e-3
    eta: float = 2.0
    lambda_mode: str = "fixed"  # fixed | adaptive
    lambda_value: float = 1.0
    lambda_max: float = 2.0
    extractor_lora: bool = True  # the paper's extractor; false = token only (the authors' code)
    stop_grad_base: bool = False  # the authors' code lets gradients flow through the y_base branch
    # the batched learner forward keeps activations for two predictions per sample; recomputing them
    # block by block in the backward pass keeps stage 2's memory near a LoRA step's, for more time
    # (same gradients; ignored where the learner predicts y_complete alone: stop_grad_base, or
    # base_branch=original without base_preserve_weight)
    learner_checkpointing: bool = True
    # where f(y_base) comes from: "learner" (the paper, the authors' code) or "original" (ours: the
    # original model, adapters off, no gradient). The default: on MiniBench the learner form pollutes
    # more than plain LoRA at both budgets; the anchored one is purer (docs/PURECC.md)
    base_branch: str = "original"
    base_preserve_weight: float = 0.0  # base_branch=original: weight of || f_θ2(y_base) - f_orig(y_base) ||²

    positive: ClassVar[tuple[str, ...]] = ("stage1_steps", "rank", "alpha", "stage1_lr", "token_lr", "lambda_max")
    # settings that stage 1 never reads: runs that differ only in these can share one stage-1 run
    stage2_only: ClassVar[tuple[str, ...]] = ("eta", "lambda_mode", "lambda_value", "lambda_max", "extractor_lora",
                                              "stop_grad_base", "learner_checkpointing", "base_branch",
                                              "base_preserve_weight")

    def check(self, where: str) -> None:
        if self.stage not in ("1", "2", "both"):
            raise UsageError(f"{where}.stage: {self.stage!r} is not one of 1, 2, both")
        if self.lambda_mode not in ("fixed", "adaptive"):
            raise UsageError(f"{where}.lambda_mode: {self.lambda_mode!r} is not fixed or adaptive")
        if self.base_branch not in ("learner", "original"):
            raise UsageError(f"{where}.base_branch: {self.base_branch!r} is not learner or original")
        if not self.base_preserve_weight >= 0:
            raise UsageError(f"{where}.base_preserve_weight: must be zero or more, got {self.base_preserve_weight}")
        if self.base_preserve_weight > 0 and self.base_branch != "original":
            raise UsageError(f"{where}.base_preserve_weight: applies with base_branch=original (it reuses that "
                             "branch's original prediction); set base_branch=original, or use --preserve class")
        if self.stop_grad_base and self.base_branch == "original":
            raise UsageError(f"{where}.stop_grad_base: applies to base_branch=learner (the original branch has no "
                             "gradient anyway); drop one of the two")


def derive_prompts(prompt: str, token: str, class_word: str) -> tuple[str, str, str]:
    """'a big <v1> star on grass' -> (itself, 'a big star on grass', '<v1> star')."""
    base = re.sub(rf"\s*{re.escape(token)}\s*", " ", prompt).strip()
    base = re.sub(r"\s+", " ", base)
    return prompt, base, f"{token} {class_word}"


def prompts_for_example(caption: str, spec, extras: dict) -> tuple[str, str, str]:
    """The derived triple, with y_base / y_tar taken from the image's metadata.jsonl entry where given."""
    complete, base, tar = derive_prompts(caption, spec.token, spec.class_word)
    return complete, extras.get("y_base", base), extras.get("y_tar", tar)


def adaptive_lambda(delta: torch.Tensor, r: torch.Tensor, lambda_max: float) -> torch.Tensor:
    """Per sample, the scale of R that best explains Δ (least squares), clamped to [0, λ_max]."""
    dims = tuple(range(1, r.ndim))
    return ((delta * r).sum(dims) / (r.pow(2).sum(dims) + 1e-8)).clamp(0, lambda_max)


def purecc_losses(pred_complete, pred_base, target, r, eta: float, lam) -> tuple[torch.Tensor, dict]:
    """L = L_CC + η L_PureCC for given predictions; lam is a number or a per-sample tensor."""
    lam = torch.as_tensor(lam, dtype=pred_complete.dtype)
    if lam.ndim == 1:
        lam = lam.view(-1, *([1] * (r.ndim - 1)))
    l_cc = (pred_complete - target).pow(2).mean()
    l_pure = (pred_complete - (pred_base + lam * r)).pow(2).mean()
    return l_cc + eta * l_pure, {"l_cc": l_cc.item(), "l_pure": l_pure.item(), "lambda": lam.float().mean().item()}


@register
class PureCC(Method):
    name = "purecc"
    Config = PureCCConfig
    default_lr = 1e-4
    takes_image_contexts = True

    def setup(self) -> list[dict]:
        c = self.config
        c.check("method_args")  # a config built without from_dict (the Python API) is checked too
        if c.stage == "2" and not c.stage1_run:
            raise UsageError("method_args.stage1_run: stage 2 alone needs a finished stage-1 run folder")
        self.tokens = TokenEmbeddings(self.backbone, self.concepts)
        denoiser = self.backbone.denoiser
        lora = LoraConfig(rank=c.rank, alpha=c.alpha)
        extractor = add_lora(self.backbone, lora, EXTRACTOR)
        learner = add_lora(self.backbone, lora, LEARNER)
        self.switch = AdapterSwitch(denoiser)
        self._checkpointing_on = False
        groups = [{"params": learner}]
        if c.stage == "2":
            self._load_stage1(Path(c.stage1_run))
            for p in extractor:
                p.requires_grad_(False)
        else:
            groups += [{"params": extractor, "lr": c.stage1_lr}, self.token_group(c.token_lr)]
        return groups

    def _load_stage1(self, run: Path) -> None:
        from safetensors.torch import load_file

        weights = run / "extractor_lora.safetensors"
        embeds = [run / self.tokens.file_name(k, e.name) for k, e in enumerate(self.tokens.encoders)]
        for f in (weights, *embeds):
            if not f.is_file():
                raise UsageError(f"method_args.stage1_run: {f} is missing; give a finished PureCC stage-1 run")
        params = lora_params(self.backbone.denoiser, EXTRACTOR)
        state = load_file(str(weights))
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
        self.tokens.load_saved(run)

    def in_stage1(self, step: int) -> bool:
        return self.config.stage == "1" or (self.config.stage == "both" and step < self.config.stage1_steps)

    def trainable_denoiser_params(self):
        return {**lora_params(self.backbone.denoiser, EXTRACTOR), **lora_params(self.backbone.denoiser, LEARNER)}

    def loss(self, batch: dict, generator: torch.Generator, prior_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        if self.in_stage1(batch["step"]):
            self.switch.use(EXTRACTOR)
            loss, _, logs = self.denoise(batch["latents"], self.encode_batch(batch), generator, batch)
            return loss, {"stage": 1, **logs}
        if self.tokens.trainable:  # stage 2 of a two-stage run: the token is final from here on,
            self.tokens.freeze()  # so prompts are encoded once and cached
        return self.stage2_loss(batch, generator)

    def stage2_loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        c, bb = self.config, self.backbone
        specs = [self.concepts[int(k)] for k in batch["concept"]]
        triples = [prompts_for_example(p, s, e) for p, s, e in zip(batch["prompts"], specs, batch.get("extras") or [{}] * len(specs))]
        n = len(triples)
        x0 = batch["latents"]
        noise, t = draw_noise(bb, x0, generator, batch)
        x_t = bb.add_noise(x0, noise, t)
        with torch.no_grad():  # text encoders and the token are frozen in stage 2
            cond = self.encode([y[0] for y in triples] + [y[1] for y in triples] + [y[2] for y in triples] + [""] * n)
        cond_c, cond_b, cond_tar, cond_null = ({k: v[i * n:(i + 1) * n] for k, v in cond.items()} for i in range(4))
        if self.contexts is not None:  # ICO: y_complete is each image's context prompt, its contexts still learning
            cond_c = self.contexts.encode(self, batch)

        def cat(*conds):
            return {k: torch.cat([d[k] for d in conds]) for k in conds[0]}

        def rep(k):  # the same noisy inputs for k prompts, one batched forward
            return torch.cat([x_t] * k), torch.cat([t] * k)

        anchored = c.base_branch == "original"
        with torch.no_grad():  # the frozen predictions: the extractor's (y_tar, ∅), anchored the original's y_base
            self.switch.use(EXTRACTOR if c.extractor_lora else None, trainable=False)
            if anchored and not c.extractor_lora:  # all three with adapters off: one forward
                f_tar, f_null, f_base = bb.predict(*rep(3), cat(cond_tar, cond_null, cond_b)).chunk(3)
            else:
                f_tar, f_null = bb.predict(*rep(2), cat(cond_tar, cond_null)).chunk(2)
                if anchored:  # the extractor's LoRA is on for R, off for the original: a second forward
                    self.switch.use(None, trainable=False)
                    f_base = bb.predict(x_t, t, cond_b)
            r = f_tar - f_null
        preserve = self.preservation_targets(x_t, t, batch)  # output preservation (--preserve), when on
        self.switch.use(LEARNER)
        # the learner predicts y_base too, with gradient: two predictions' activations per sample
        learner_base = c.base_preserve_weight > 0 if anchored else not c.stop_grad_base
        if (c.learner_checkpointing and learner_base and not self._checkpointing_on
                and hasattr(bb.denoiser, "enable_gradient_checkpointing")):
            # once, on the first stage-2 step (it walks every module); no effect on forwards without
            # gradient (the extractor, sampling); a learner predicting y_complete alone keeps one
            # prediction's activations, as LoRA does, and needs no recomputing
            bb.denoiser.enable_gradient_checkpointing()
            self._checkpointing_on = True
        if learner_base:  # the learner's two predictions, one batched forward
            both, l_preserve = self.predict_preserving(*rep(2), cat(cond_c, cond_b), preserve)
            pred_c, pred_b = both.chunk(2)
        else:
            pred_c, l_preserve = self.predict_preserving(x_t, t, cond_c, preserve)
            if not anchored:  # stop_grad_base
                with torch.no_grad():
                    pred_b = bb.predict(x_t, t, cond_b)
        base = f_base if anchored else pred_b
        target = bb.target(x0, noise, t)
        if c.lambda_mode == "adaptive":
            lam = adaptive_lambda((pred_c - base).detach(), r, c.lambda_max)
        else:
            lam = c.lambda_value
        loss, logs = purecc_losses(pred_c.float(), base.float(), target.float(), r.float(), c.eta, lam)
        if anchored and c.base_preserve_weight > 0:
            l_base = (pred_b.float() - f_base.float()).pow(2).mean()
            loss = loss + c.base_preserve_weight * l_base
            logs["l_base_preserve"] = l_base.item()
        if l_preserve is not None:
            loss = loss + self.preservation.weight * l_preserve
            logs["preserve"] = l_preserve.item()
        return loss, {"stage": 2, **logs}

    def save(self, out_dir: Path, export: list[str]) -> list[Path]:
        from ..checkpoint import atomic_save

        extractor = out_dir / "extractor_lora.safetensors"
        atomic_save({k: v.detach().float() for k, v in lora_params(self.backbone.denoiser, EXTRACTOR).items()}, extractor,
                    metadata={"format": "pristine.purecc.extractor (peft parameter names)"})
        paths = [extractor, self.tokens.save(out_dir)]
        if self.config.stage == "1":  # the extractor is the result: save it as the run's LoRA too
            paths.append(save_lora(self.backbone, EXTRACTOR, LoraConfig(self.config.rank, self.config.alpha), out_dir))
        else:  # inference needs only the learner and the token
            paths.append(save_lora(self.backbone, LEARNER, LoraConfig(self.config.rank, self.config.alpha), out_dir))
        return paths

    @classmethod
    def load_denoiser(cls, run: Path, settings: dict, models):
        return lora_run_denoiser(run, models)  # the run's LoRA: the learner (the extractor for --stage 1)
