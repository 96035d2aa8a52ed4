"""SPF: semantic pollution-free fine-tuning of an attribute (METHODS.md section 2, arXiv 2504.00396).

The data is a captioned set whose every caption names the target phrase (`token`, an ordinary word
such as "zigzag"; no new token is added). Cross-attention trains: a LoRA on its projections, or
with `train: full` the projection weights themselves.

Stage 1 is ordinary fine-tuning on the captions. Stage 2 is dual-path alignment: the same noisy
latent and timestep go through
- the reference path: the original weights (the adapter off, or the saved original projections
  swapped in), no gradient, with the base caption (the caption without the target phrase);
- the response path: the model being tuned, with the caption,
and every cross-attention layer l records its maps A^l (per prompt token) and queries Q^l.

    M         = clamp( n(|f_res - f_ref|) - Σ_p D(E_base[p], E_tar) · n(A_p), 0, 1 )   (detached)
    L_text    = mean_l mean( (1 - M_l) · (A_res^l[s] - A_ref^l[s])² )   s: each base word, the padding
    L_query   = mean_l mean( (1 - M_l) · (Q_res^l - Q_ref^l)² )
    L_enhance = 1 - cos( clip_img(x̂0_res) - clip_img(x̂0_ref), clip_txt(caption) - clip_txt(base) )
    L         = w_d ||f_res - target||² + w_t L_text + w_q L_query + w_e L_enhance

n() scales a map to [0, 1] by its maximum; D = 1 - cosine of the text encoder's states (mean over a
phrase's tokens); A_p is the reference path's map of base word p (summed over its tokens, mean over
heads and layers at the latent's resolution); function words ("a", "on", "the") attend everywhere
and are left out of the sum. M_l is M pooled to layer l's resolution.

Incremental learning (`init_run`): an earlier run's LoRA is merged into the base weights before
anything else, so it is part of "the original model" of both paths and stays fixed; the run writes
the earlier LoRA and its own as one LoRA file (ranks side by side), and so does a full run (its
weight change is written exactly, at full rank). See docs/SPF.md.
"""

from __future__ import annotations

import difflib
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..phrases import FUNCTION_WORDS, remove_phrase
from .base import Method, MethodConfig, denoising_loss, draw_noise, register
from .lora import AdapterSwitch, LoraConfig, add_lora, lora_params

LEARNER = "learner"
LEARNER_FILE = "spf_learner.safetensors"  # this run's own trained tensors (stage 2 alone starts from them)
LOSS_TERMS = ("denoise", "text", "query", "enhance")


@dataclass
class SPFConfig(MethodConfig):
    stage: str = "both"  # "1", "2" (needs stage1_run) or "both"
    stage1_steps: int = 300
    stage1_run: str = ""  # a finished stage-1 run folder, for --stage 2
    init_run: str = ""  # incremental: a finished run whose LoRA stays in the model, fixed
    train: str = "lora"  # lora | full: a LoRA on cross-attention, or its projection weights themselves
    targets: list = field(default_factory=list)  # LoRA targets; empty: the family's cross-attention projections
    rank: int = 4
    alpha: float = 4.0
    denoise_weight: float = 1.0
    text_weight: float = 1.0
    query_weight: float = 1.0
    enhance_weight: float = 0.1
    clip: str = ""  # a CLIP model folder for the enhancement loss; "": the model folder's clip/; "none": off

    positive: ClassVar[tuple[str, ...]] = ("stage1_steps", "rank", "alpha")


# ---- the pieces of the loss (pure functions of captured tensors, for tests and reuse) -------------


def _layer_shape(pixels: int, height: int, width: int) -> tuple[int, int]:
    """A layer's (h, w) from its pixel count: the latent's shape divided by a power of two."""
    factor = round(math.sqrt(height * width / pixels))
    h, w = max(1, height // factor), max(1, width // factor)
    if h * w != pixels:
        raise ValueError(f"a cross-attention layer of {pixels} pixels does not tile a {height}x{width} latent")
    return h, w


def slot_maps(maps: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    """(batch, heads, pixels, tokens) maps, (batch, tokens, slots) 0/1 selection -> (batch, pixels, slots):
    each slot's attention, summed over its tokens, mean over heads."""
    return maps.float().mean(1) @ selection


def pool_to(m: torch.Tensor, pixels: int) -> torch.Tensor:
    """A (batch, h, w) map averaged down to a layer of `pixels` pixels: (batch, pixels)."""
    h, w = _layer_shape(pixels, *m.shape[-2:])
    return F.adaptive_avg_pool2d(m[:, None], (h, w)).flatten(1)


def _unit_max(x: torch.Tensor, dims) -> torch.Tensor:
    return x / (x.amax(dim=dims, keepdim=True) + 1e-8)


def phrase_maps(maps: dict[str, torch.Tensor], selection: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per phrase (selection's slots) its attention probability at the latent's resolution, mean over
    layers: (batch, slots, h, w). Not rescaled: the softmax already normalises each pixel's attention
    over the tokens, so at any pixel the phrases' maps sum to at most 1 and Σ_p D_p·A_p is the
    attention-weighted distance of what the pixel reads, at most the largest D. (Each map scaled to a
    peak of 1 made that sum exceed the normalised prediction difference everywhere on pristine-mini:
    five phrases, D 0.1-0.84, an 8x8 latent; the SFCM came out all zero.)"""
    total = 0
    for m in maps.values():
        s = slot_maps(m, selection)  # (b, p, k)
        h, w = _layer_shape(s.shape[1], *size)
        s = s.transpose(1, 2).reshape(s.shape[0], s.shape[2], h, w)
        total = total + F.interpolate(s, size=size, mode="bilinear", align_corners=False)
    return (total / len(maps)).clamp(min=0)  # bilinear resampling may undershoot zero


def fine_control_map(f_res: torch.Tensor, f_ref: torch.Tensor, phrase_attention: torch.Tensor,
                     distances: torch.Tensor) -> torch.Tensor:
    """The semantic-aware fine control map M (batch, h, w): where the predictions differ, less where a
    base phrase far in meaning from the target attends. phrase_attention (batch, k, h, w) in [0, 1],
    distances (batch, k) (zero for padding slots)."""
    diff = _unit_max((f_res.float() - f_ref.float()).abs().mean(1), (-2, -1))
    control = diff - (distances[..., None, None] * phrase_attention).sum(1)
    return control.clamp(0, 1).detach()


def text_consistency_loss(maps_res: dict, maps_ref: dict, sel_res: torch.Tensor, sel_ref: torch.Tensor,
                          valid: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """Base-word and padding attention of the response path against the reference path's, weighted
    by (1 - M), mean over layers. valid (batch, slots) marks real slots."""
    losses = []
    for name, m_res in maps_res.items():
        a_res, a_ref = slot_maps(m_res, sel_res), slot_maps(maps_ref[name], sel_ref)  # (b, p, s)
        keep = (1 - pool_to(control, a_res.shape[1]))[:, :, None] * valid[:, None, :]
        losses.append((keep * (a_res - a_ref).pow(2)).sum() / (valid.sum() * a_res.shape[1]).clamp(min=1))
    return torch.stack(losses).mean()


def query_loss(q_res: dict, q_ref: dict, control: torch.Tensor) -> torch.Tensor:
    """|| (1 - M) ⊙ (Q_res - Q_ref) ||², mean over layers (each a mean over pixels and channels)."""
    losses = []
    for name, a in q_res.items():
        keep = 1 - pool_to(control, a.shape[1])
        losses.append((keep[:, :, None] * (a.float() - q_ref[name].float()).pow(2)).mean())
    return torch.stack(losses).mean()


def enhancement_loss(img_res: torch.Tensor, img_ref: torch.Tensor, txt_full: torch.Tensor,
                     txt_base: torch.Tensor) -> torch.Tensor:
    """1 - cos between the image-embedding change and the text-embedding change; a sample whose two
    captions embed alike has no direction to follow and adds 0."""
    d_txt = txt_full.float() - txt_base.float()
    has_direction = d_txt.norm(dim=-1) > 1e-6
    per_sample = 1 - F.cosine_similarity(img_res.float() - img_ref.float(), d_txt, dim=-1)
    return (per_sample * has_direction).sum() / has_direction.sum().clamp(min=1)


@dataclass
class CaptionPair:
    """What stage 2 reads of one (caption, base caption) pair, found from the texts once."""

    res_slots: list[list[int]]  # per aligned base word (and the padding, last): its positions in the caption
    ref_slots: list[list[int]]  # the same slots' positions in the base caption
    control_slots: list[list[int]]  # content words of the base caption: positions there
    distances: list[float]  # per control slot: 1 - cos(E_base[word], E_tar)


def pair_slots(backbone, caption: str, base: str, target: str) -> tuple[list, list, list, list[int]]:
    """Align the base caption's words with the caption's (the target phrase's tokens set apart)."""
    target_positions = set(backbone.phrase_positions(caption, target))
    res_words = [w for w in backbone.prompt_words(caption) if not set(w.positions) & target_positions]
    ref_words = backbone.prompt_words(base)
    matcher = difflib.SequenceMatcher(a=[w.text for w in ref_words], b=[w.text for w in res_words], autojunk=False)
    res_slots, ref_slots = [], []
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            ref_slots.append(list(ref_words[block.a + k].positions))
            res_slots.append(list(res_words[block.b + k].positions))
    res_slots.append(backbone.end_positions(caption))
    ref_slots.append(backbone.end_positions(base))
    control = [list(w.positions) for w in ref_words if w.text not in FUNCTION_WORDS]
    return res_slots, ref_slots, control, sorted(target_positions)


def selection(slots: list[list[list[int]]], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample lists of slots (token positions) -> (batch, tokens, slots) 0/1 matrix and (batch, slots) mask."""
    n = max([len(s) for s in slots] + [1])
    sel = torch.zeros(len(slots), tokens, n)
    valid = torch.zeros(len(slots), n)
    for b, sample in enumerate(slots):
        for k, positions in enumerate(sample):
            if positions:
                sel[b, positions, k] = 1
                valid[b, k] = 1
    return sel, valid


def _pad(rows: list[list[float]]) -> torch.Tensor:
    n = max([len(r) for r in rows] + [1])
    return torch.tensor([r + [0.0] * (n - len(r)) for r in rows])


class ClipJudge:
    """A CLIP model for the enhancement loss: image features with gradient, text features cached."""

    def __init__(self, folder: Path):
        import json

        from transformers import CLIPModel, CLIPTokenizer

        self.folder = folder
        self.model = CLIPModel.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True,
                                               use_safetensors=True).eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        pre = json.loads((folder / "preprocessor_config.json").read_text()) if (folder / "preprocessor_config.json").is_file() else {}
        self.size = self.model.config.vision_config.image_size
        self.mean = torch.tensor(pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073])).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", [0.26862954, 0.26130258, 0.27577711])).view(1, 3, 1, 1)
        self._texts: dict[str, torch.Tensor] = {}

    @staticmethod
    def _features(out) -> torch.Tensor:
        return out if torch.is_tensor(out) else out.pooler_output

    def images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (batch, 3, H, W) -> image features, differentiable."""
        self.model.to(pixels.device)
        x = F.interpolate((pixels.float() + 1) / 2, size=(self.size, self.size), mode="bilinear", antialias=True,
                          align_corners=False)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return self._features(self.model.get_image_features(pixel_values=x))

    def texts(self, texts: list[str], device) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._texts]
        if missing:
            self.model.to(device)
            ids = self.tokenizer(missing, padding=True, truncation=True, return_tensors="pt").to(device)
            with torch.no_grad():
                feats = self._features(self.model.get_text_features(**ids))
            self._texts.update(zip(missing, feats))
        return torch.stack([self._texts[t] for t in texts]).to(device)


def clip_folder(setting: str, model_folder: Path) -> Path | None:
    """The CLIP for the enhancement loss: the setting's folder, the model's own clip/, or none."""
    if setting.lower() in ("none", "off"):
        return None
    folder = Path(setting) if setting else model_folder / "clip"
    if setting and not (folder / "config.json").is_file():
        raise UsageError(f"method_args.clip: {setting} is not a CLIP model folder (no config.json); give a "
                         "transformers CLIPModel folder, or none")
    return folder if (folder / "config.json").is_file() else None


def _module_of(param: str) -> str:
    """The module a weight belongs to, as LoRA files name it (under an adapter wrapper, the wrapper)."""
    return param[:-len(".weight")].removesuffix(".base_layer")


@register
class SPF(Method):
    name = "spf"
    Config = SPFConfig
    default_lr = 1e-4

    # ---- setting up ----
    def setup(self) -> list[dict]:
        c = self.config
        if c.stage not in ("1", "2", "both"):
            raise UsageError(f"method_args.stage: {c.stage!r} is not one of 1, 2, both")
        if c.train not in ("lora", "full"):
            raise UsageError(f"method_args.train: {c.train!r} is not lora or full")
        if c.stage == "2" and not c.stage1_run:
            raise UsageError("method_args.stage1_run: stage 2 alone needs a finished SPF stage-1 run folder")
        for term in LOSS_TERMS:
            if not getattr(c, f"{term}_weight") >= 0:
                raise UsageError(f"method_args.{term}_weight: must be zero or more, got {getattr(c, f'{term}_weight')}")
        if not any(getattr(c, f"{term}_weight") > 0 for term in LOSS_TERMS):
            raise UsageError("method_args: every loss weight is zero; give at least one of "
                             + ", ".join(f"{t}_weight" for t in LOSS_TERMS) + " above zero")
        bb = self.backbone
        if c.stage != "1":
            bb.prompt_words("a")  # a family without cross-attention capture says so here, before any work
        denoiser = bb._unwrapped(bb.denoiser)
        self.init_factors = {}
        if c.init_run:
            self.init_factors = self._read_init_run(Path(c.init_run))
            from ..lora_factors import merge_into

            merge_into(denoiser, self.init_factors)  # the earlier attribute is part of the original model now
        self.targets = list(c.targets) or list(bb.CROSS_ATTENTION_TARGETS)
        if c.train == "lora":
            params = add_lora(bb, LoraConfig(rank=c.rank, alpha=c.alpha, targets=self.targets), LEARNER)
            self.switch = AdapterSwitch(denoiser)
        else:
            params = list(self.trainable_denoiser_params().values())
            if not params:
                raise UsageError(f"method_args.targets: {self.targets} name no weights of the denoiser")
            for p in params:
                p.requires_grad_(True)
            self.reference_weights = {n: p.detach().clone() for n, p in self.trainable_denoiser_params().items()}
        if c.stage == "2":
            self._load_stage1(Path(c.stage1_run))
        self.clip = None
        if c.stage != "1" and c.enhance_weight > 0:
            folder = clip_folder(c.clip, bb.folder)
            if folder is None:
                print("warning: SPF's response-enhancement loss is off: no CLIP model (the model folder has no clip/); "
                      "give method_args.clip=DIR to use one", file=sys.stderr)
            else:
                self.clip = ClipJudge(folder)
        self._pairs: dict[tuple[str, str, str], CaptionPair] = {}
        return [{"params": params}]

    def prepare(self, data) -> None:
        if self.clip is not None:
            self._warn_if_clip_misses_the_phrase(data)

    def _warn_if_clip_misses_the_phrase(self, data, pictures: int = 32) -> None:
        """The enhancement loss follows the CLIP's direction from base caption to caption; a CLIP that
        never learnt the phrase gives a direction away from it (pristine-mini's CLIP on its held-out
        pattern words prefers the base caption on 77-88% of the training pictures, and the term cut
        SPF's response to zero; docs/BENCHMARKS.md). Said once, on the run's own pictures."""
        rows = [i for i in range(len(data)) if not data.is_prior[i]]
        bases = self.base_captions({"prompts": [data.prompts[i] for i in rows], "concept": data.concept_index[rows],
                                    "extras": [data.extras[i] for i in rows] if data.extras else None})
        for k, spec in enumerate(self.concepts):
            chosen = [(i, base) for i, base in zip(rows, bases)
                      if int(data.concept_index[i]) == k and base != data.prompts[i]][:pictures]
            if not chosen:
                continue
            with torch.no_grad():
                img = self.clip.images(data.pixels[[i for i, _ in chosen]])
            full = self.clip.texts([data.prompts[i] for i, _ in chosen], img.device)
            base = self.clip.texts([b for _, b in chosen], img.device)
            share = float((F.cosine_similarity(img, full) > F.cosine_similarity(img, base)).float().mean())
            if share < 0.5:
                print(f"warning: the CLIP in {self.clip.folder} prefers the captions without {spec.token!r} on "
                      f"{1 - share:.0%} of {len(chosen)} training pictures: it does not see the attribute, and the "
                      "response-enhancement loss would pull away from it; give method_args.enhance_weight=0 (or a "
                      "CLIP that knows the word with method_args.clip=DIR)", file=sys.stderr)

    def _read_init_run(self, run: Path):
        from ..lora_factors import read_lora

        weights = run / "pytorch_lora_weights.safetensors"
        if not weights.is_file():
            raise UsageError(f"method_args.init_run: {run} holds no pytorch_lora_weights.safetensors; give a finished "
                             "SPF run folder (or another LoRA run without new tokens)")
        if (run / "learned_embeds.safetensors").is_file():
            raise UsageError(f"method_args.init_run: {run} also learned new tokens; SPF adds only to runs without them")
        from ..files import check_safetensors

        check_safetensors(weights, "method_args.init_run")
        return read_lora(self.backbone, weights)

    def _load_stage1(self, run: Path) -> None:
        import yaml
        from safetensors import safe_open
        from safetensors.torch import load_file

        weights = run / LEARNER_FILE
        if not weights.is_file():
            raise UsageError(f"method_args.stage1_run: {weights} is missing; give a finished SPF stage-1 run")
        with safe_open(str(weights), "pt") as f:
            mode = (f.metadata() or {}).get("train", "lora")
        if mode != self.config.train:
            raise UsageError(f"method_args.stage1_run: {run} trained {mode}, this run trains {self.config.train}; "
                             "give the same method_args.train")
        saved = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
        earlier = ((saved or {}).get("method_args") or {}).get("init_run", "")
        if str(earlier or "") != self.config.init_run:
            raise UsageError(f"method_args.init_run: {run} was trained on init_run {earlier or 'none'!r}, this run gives "
                             f"{self.config.init_run or 'none'!r}; give the stage-1 run's")
        params = self.trainable_denoiser_params()
        state = load_file(str(weights))
        if set(state) != set(params):
            raise UsageError(f"method_args.stage1_run: {weights} holds other weights than this run trains "
                             "(rank, targets or train differ); give the stage-1 run's settings")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def trainable_denoiser_params(self):
        denoiser = self.backbone._unwrapped(self.backbone.denoiser)
        if self.config.train == "lora":
            return lora_params(denoiser, LEARNER)
        modules = {n for n, _ in denoiser.named_modules() if any(n == t or n.endswith("." + t) for t in self.targets)}
        return {n: p for n, p in denoiser.named_parameters() if n.endswith(".weight") and _module_of(n) in modules}

    def in_stage1(self, step: int) -> bool:
        return self.config.stage == "1" or (self.config.stage == "both" and step < self.config.stage1_steps)

    # ---- the two paths ----
    @contextmanager
    def original_weights(self):
        """The reference path's weights: the adapter off, or the original projections swapped in (no copy
        of the model; the swap is of tensor storage only)."""
        if self.config.train == "lora":
            self.switch.use(None)
            try:
                yield
            finally:
                self.switch.use(LEARNER)
            return
        params = self.trainable_denoiser_params()
        tuned = {n: p.data for n, p in params.items()}
        for n, p in params.items():
            p.data = self.reference_weights[n].to(p.device)
        try:
            yield
        finally:
            for n, p in params.items():
                p.data = tuned[n]

    def _captured_forward(self, x_t, t, cond) -> tuple[torch.Tensor, dict, dict]:
        queries: dict = {}
        with self.backbone.capture_attention(queries) as maps:
            pred = self.backbone.predict(x_t, t, cond)
        return pred, dict(maps), queries

    def caption_pair(self, caption: str, base: str, target: str, states_res: torch.Tensor,
                     states_ref: torch.Tensor) -> CaptionPair:
        key = (caption, base, target)
        if key not in self._pairs:
            res_slots, ref_slots, control, target_positions = pair_slots(self.backbone, caption, base, target)
            distances = []
            if target_positions:
                e_tar = states_res[target_positions].float().mean(0)
                for positions in control:
                    e_p = states_ref[positions].float().mean(0)
                    distances.append(float(1 - F.cosine_similarity(e_p, e_tar, dim=0)))
            else:  # the phrase was cut off by the encoder's length: nothing to subtract
                distances = [0.0] * len(control)
            self._pairs[key] = CaptionPair(res_slots, ref_slots, control, distances)
        return self._pairs[key]

    # ---- the loss ----
    def loss(self, batch: dict, generator: torch.Generator, prior_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        if self.in_stage1(batch["step"]):
            loss, _ = denoising_loss(self.backbone, batch["latents"], self.encode(batch["prompts"]), generator, batch=batch)
            return loss, {"stage": 1}
        return self.stage2_loss(batch, generator)

    def base_captions(self, batch: dict) -> list[str]:
        specs = [self.concepts[int(k)] for k in batch["concept"]]
        extras = batch.get("extras") or [{}] * len(specs)
        return [e.get("y_base") or remove_phrase(p, s.token) for p, s, e in zip(batch["prompts"], specs, extras)]

    def stage2_loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        c, bb = self.config, self.backbone
        captions, bases = list(batch["prompts"]), self.base_captions(batch)
        targets = [self.concepts[int(k)].token for k in batch["concept"]]
        n = len(captions)
        x0 = batch["latents"]
        noise, t = draw_noise(bb, x0, generator, batch)
        x_t = bb.add_noise(x0, noise, t)
        with torch.no_grad():  # the text side never trains in SPF
            cond = self.encode(captions + bases)
        cond_res, cond_ref = ({k: v[i * n:(i + 1) * n] for k, v in cond.items()} for i in range(2))
        with torch.no_grad(), self.original_weights():
            f_ref, maps_ref, q_ref = self._captured_forward(x_t, t, cond_ref)
        f_res, maps_res, q_res = self._captured_forward(x_t, t, cond_res)
        terms = self.alignment_terms(x_t, t, f_res, f_ref, maps_res, maps_ref, q_res, q_ref, captions, bases, targets,
                                     bb.text_token_states(cond_res), bb.text_token_states(cond_ref))
        terms["denoise"] = (f_res.float() - bb.target(x0, noise, t).float()).pow(2).mean()
        loss = sum(getattr(c, f"{k}_weight") * v for k, v in terms.items() if getattr(c, f"{k}_weight") > 0)
        # the SFCM's mean: 0 or 1 everywhere would mean the alignment terms protect all or nothing
        return loss, {"stage": 2, **{f"l_{k}": v.item() for k, v in terms.items()}, "sfcm_mean": self.last_control.mean().item()}

    def alignment_terms(self, x_t, t, f_res, f_ref, maps_res, maps_ref, q_res, q_ref, captions, bases, targets,
                        states_res, states_ref) -> dict[str, torch.Tensor]:
        """SFCM and the three alignment losses (text, query, enhance) from both paths' captures."""
        pairs = [self.caption_pair(cap, base, tar, s_res, s_ref)
                 for cap, base, tar, s_res, s_ref in zip(captions, bases, targets, states_res, states_ref)]
        tokens = next(iter(maps_ref.values())).shape[-1]
        device = f_res.device
        sel_ctrl, _ = selection([p.control_slots for p in pairs], tokens)
        distances = _pad([p.distances for p in pairs]).to(device)
        attention = phrase_maps(maps_ref, sel_ctrl.to(device), tuple(f_res.shape[-2:]))
        control = fine_control_map(f_res, f_ref, attention, distances[:, :attention.shape[1]])
        sel_res, valid = selection([p.res_slots for p in pairs], tokens)
        sel_ref, _ = selection([p.ref_slots for p in pairs], tokens)
        terms = {"text": text_consistency_loss(maps_res, maps_ref, sel_res.to(device), sel_ref.to(device),
                                               valid.to(device), control),
                 "query": query_loss(q_res, q_ref, control),
                 "enhance": torch.zeros((), device=device)}
        if self.clip is not None:
            bb = self.backbone
            img_res = self.clip.images(bb.decode_latents(bb.predict_x0(x_t, t, f_res)))
            with torch.no_grad():
                img_ref = self.clip.images(bb.decode_latents(bb.predict_x0(x_t, t, f_ref)))
            terms["enhance"] = enhancement_loss(img_res, img_ref, self.clip.texts(captions, device),
                                                self.clip.texts(bases, device))
        self.last_control = control
        return terms

    # ---- outputs ----
    def result_factors(self):
        """Everything this run adds to the original model, as LoRA factors per module."""
        from ..lora_factors import adapter_factors, exact_factors, stack

        denoiser = self.backbone._unwrapped(self.backbone.denoiser)
        if self.config.train == "lora":
            own = adapter_factors(denoiser, LEARNER)
        else:
            own = {_module_of(n): exact_factors(p.detach().float() - self.reference_weights[n].float())
                   for n, p in self.trainable_denoiser_params().items()}
        return stack(self.init_factors, own)

    @classmethod
    def load_denoiser(cls, run: Path, settings: dict, models):
        from .lora import lora_run_denoiser

        return lora_run_denoiser(run, models)  # every run, incremental and full ones too, is one standard LoRA

    def save(self, out_dir: Path, export: list[str]) -> list[Path]:
        from ..checkpoint import atomic_save
        from ..lora_factors import write_lora

        own = out_dir / LEARNER_FILE
        atomic_save({k: v.detach().float() for k, v in self.trainable_denoiser_params().items()}, own,
                    metadata={"format": "pristine.spf.learner (denoiser parameter names)", "train": self.config.train})
        plain = self.config.train == "lora" and not self.init_factors
        if plain:  # a LoRA like any other: rank and alpha as trained
            lora = self.backbone.save_lora(LEARNER, self.config.rank, self.config.alpha, self.targets, out_dir)
        else:  # the earlier run's LoRA and this run's change as one LoRA file
            lora = write_lora(self.backbone, self.result_factors(), out_dir)
        paths = [lora, own]
        if "kohya" in export:
            if plain:
                paths.append(self.backbone.write_kohya(lora, out_dir / "lora_kohya.safetensors", self.config.alpha))
            else:
                print("warning: --export kohya: an incremental or full SPF run has per-layer ranks the kohya layout "
                      "here does not carry; only pytorch_lora_weights.safetensors was written", file=sys.stderr)
        return paths
