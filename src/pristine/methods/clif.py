"""CLIF: several customized concepts in one picture without confusing them (METHODS.md section 4,
arXiv 2405.06914).

Three stages, as the authors' code runs them (`do_clif` -> `do_ti` -> `load_ti_do_both`):

1. contrastive fine-tuning of the concept tokens' embedding rows. Text features: a text encoder's
   pooled output through the CLIP text projection; image features: the matching frozen CLIP image
   tower, on Global / Region / Mix pairs (clif_pairs.py). Symmetric InfoNCE over the batch with
   normalised features, where two pairs showing the same concepts are not each other's negatives
   (the authors' code forgot both: `normalize=false`, `mask_same_concept=false` reproduce it).
2. textual inversion of the contrasted embeddings on the concept images (adapters off).
3. a denoiser LoRA jointly with the embeddings, as DreamBooth-LoRA does.

`stage=all` runs the three in one training loop (the first `stage1_steps` steps stage 1, the next
`stage2_steps` stage 2, the rest stage 3); `stage=1|2|3` runs one, 2 and 3 starting from the
previous stage's finished run (`previous_run`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .base import Method, MethodConfig, TokenEmbeddings, register
from .lora import AdapterSwitch, LoraConfig, add_lora, lora_params, save_lora

ADAPTER = "clif"
STAGES = ("1", "2", "3", "all")


@dataclass
class ClifConfig(MethodConfig):
    stage: str = "all"  # 1, 2, 3 or all
    stage1_steps: int = 200  # stage=all: steps of stage 1, then stage2_steps of stage 2, the rest stage 3
    stage2_steps: int = 200
    previous_run: str = ""  # stage 2: a finished stage-1 run; stage 3: a finished stage-2 run
    clip: str = ""  # a local CLIP folder (transformers CLIPModel); default: the model's own clip/
    vectors: int = 1  # embedding vectors per concept token (the authors use 2)
    stage1_lr: float = 1e-3  # the token rows in stage 1
    token_lr: float = 2e-4  # the token rows in stages 2 and 3 (the authors' textual inversion rate)
    rank: int = 16  # stage 3's denoiser LoRA (the authors' rank)
    alpha: float = 16.0
    pairs_batch: int = 16  # pairs per contrastive step
    segments: str = "auto"  # auto (masks, else SLIC) | masks | slic | crop
    mixes: int = 0  # Mix pairs; 0: as many as there are concept images
    normalize: bool = True  # unit-norm features before the dot product (the authors' code: false)
    mask_same_concept: bool = True  # pairs of the same concepts are not negatives (the authors' code: false)
    logit_scale: float = 0.0  # 0: the CLIP's own learned scale

    positive: ClassVar[tuple[str, ...]] = ("stage1_steps", "stage2_steps", "vectors", "stage1_lr", "token_lr", "rank",
                                           "alpha", "pairs_batch")

    def check(self, where: str) -> None:
        from ..clif_pairs import SEGMENTS

        if self.stage not in STAGES:
            raise UsageError(f"{where}.stage: {self.stage!r} is not one of {', '.join(STAGES)}")
        if self.stage in ("2", "3") and not self.previous_run:
            raise UsageError(f"{where}.previous_run: stage {self.stage} alone starts from a finished CLIF stage-"
                             f"{int(self.stage) - 1} run; give it (--previous-run DIR), or use stage=all")
        if self.previous_run and self.stage not in ("2", "3"):
            raise UsageError(f"{where}.previous_run: only stage 2 or 3 starts from a previous run; drop it or set the stage")
        if self.segments not in SEGMENTS:
            raise UsageError(f"{where}.segments: {self.segments!r} is not one of {', '.join(SEGMENTS)}")
        if self.mixes < 0 or not self.logit_scale >= 0:
            name = "mixes" if self.mixes < 0 else "logit_scale"
            raise UsageError(f"{where}.{name}: must be zero or more, got {getattr(self, name)}")
        if self.pairs_batch < 2:
            raise UsageError(f"{where}.pairs_batch: a contrastive batch needs 2 pairs or more, got {self.pairs_batch}")

    def stages(self) -> tuple[int, ...]:
        return (1, 2, 3) if self.stage == "all" else (int(self.stage),)


def clif_contrastive_loss(text: torch.Tensor, image: torch.Tensor, keys: torch.Tensor, scale: float,
                          normalize: bool = True, mask_same_concept: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE between row i of `text` and row i of `image`. With `mask_same_concept`, pair j
    (j != i) with keys[j] == keys[i] (the same concepts) is left out of i's negatives, both ways."""
    if normalize:
        text, image = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    logits = scale * text @ image.T
    n = len(logits)
    if mask_same_concept:
        same = (keys[:, None] == keys[None, :]) & ~torch.eye(n, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(n, device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# ---- the CLIP the contrastive stage measures against ------------------------------------------------


def clip_folder(config: ClifConfig, model_folder: Path, where: str = "method_args.clip") -> Path:
    """The CLIP folder of the run, checked: config.json of a CLIP model, intact safetensors weights."""
    from ..data import read_text_file
    from ..files import check_model_weights

    folder = Path(config.clip) if config.clip else Path(model_folder) / "clip"
    if not (folder / "config.json").is_file():
        if not config.clip:
            raise UsageError(f"{where}: the model {model_folder} has no clip/ folder; give a local CLIP model folder "
                             "(transformers CLIPModel of the text encoder's family) with --clip DIR")
        raise UsageError(f"{where}: {folder} is not a transformers model folder (no config.json); give a local CLIP folder")
    try:
        model_type = str(json.loads(read_text_file(folder / "config.json")).get("model_type", ""))
    except (ValueError, AttributeError):
        raise UsageError(f"{where}: {folder / 'config.json'} is not a JSON model config")
    if model_type != "clip":
        raise UsageError(f"{where}: {folder} holds a {model_type or 'unknown'!r} model, not CLIP (model_type clip); "
                         "give a CLIP folder with both towers")
    check_model_weights(folder)
    return folder


class ClipImageSide:
    """What stage 1 keeps of a CLIP: image features of the pairs (computed once, the tower is frozen),
    the text projection and the logit scale."""

    def __init__(self, folder: Path):
        from transformers import CLIPModel

        self.model = CLIPModel.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True,
                                               use_safetensors=True).eval().requires_grad_(False)
        self.folder = folder
        self.image_size = self.model.config.vision_config.image_size
        self.projection_dim = self.model.config.projection_dim
        self.text_projection = self.model.text_projection
        self.logit_scale = float(self.model.logit_scale.exp())

    def pixel_values(self, images) -> torch.Tensor:
        from transformers import CLIPImageProcessor

        if (self.folder / "preprocessor_config.json").is_file():
            processor = CLIPImageProcessor.from_pretrained(str(self.folder), local_files_only=True)
        else:
            processor = CLIPImageProcessor(size={"shortest_edge": self.image_size},
                                           crop_size={"height": self.image_size, "width": self.image_size})
        return processor(images=list(images), return_tensors="pt").pixel_values

    @torch.no_grad()
    def image_features(self, images, batch: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch):
            pooled = self.model.vision_model(pixel_values=self.pixel_values(images[i:i + batch])).pooler_output
            out.append(self.model.visual_projection(pooled))
        return torch.cat(out)

    def text_encoder_index(self, backbone) -> int:
        """The text encoder whose pooled output this CLIP projects (the last that fits: SDXL's second)."""
        fits = []
        for k, (_, _, enc) in enumerate(backbone.text_pairs()):
            cfg = enc.config
            own = getattr(enc, "text_projection", None)
            if own is not None and getattr(cfg, "projection_dim", None) == self.projection_dim:
                fits.append(k)
            elif own is None and getattr(cfg, "hidden_size", None) == self.text_projection.in_features:
                fits.append(k)
        if not fits:
            raise UsageError(f"method_args.clip: {self.folder}'s text projection takes width "
                             f"{self.text_projection.in_features} (to {self.projection_dim}); no text encoder of the model "
                             "fits it; give the CLIP the model's text encoder comes from")
        return fits[-1]


# ---- the method ----------------------------------------------------------------------------------


@register
class Clif(Method):
    name = "clif"
    Config = ClifConfig
    default_lr = 1e-4  # stage 3's LoRA
    preserve_refusal = ("clif: output preservation is not part of its stages; drop --preserve "
                        "(or --prior-preservation for stage 3)")

    def setup(self) -> list[dict]:
        c = self.config
        c.check("method_args")  # a config built without from_dict (the Python API) is checked too
        if len(self.concepts) < 2:
            raise UsageError("concepts: clif learns several concepts against each other; give two or more "
                             "(a concepts list in --config), or use another method for one")
        stages = c.stages()
        self.tokens = TokenEmbeddings(self.backbone, self.concepts, c.vectors)
        if c.stage in ("2", "3"):
            self._load_previous(Path(c.previous_run), int(c.stage) - 1)
        if 1 in stages:
            self._prepare_contrast()
        groups = [self.token_group(c.stage1_lr if c.stage == "1" else c.token_lr)]
        self._token_group = 0
        self.switch = None
        if 3 in stages:
            groups.append({"params": add_lora(self.backbone, self._lora_config(), ADAPTER)})
            self.switch = AdapterSwitch(self.backbone.denoiser)
        return groups

    def _lora_config(self) -> LoraConfig:
        return LoraConfig(rank=self.config.rank, alpha=self.config.alpha)

    def _prepare_contrast(self) -> None:
        from ..clif_pairs import build_pairs
        from ..data import ConceptImages

        self.clip = ClipImageSide(clip_folder(self.config, self.backbone.folder))
        self.text_index = self.clip.text_encoder_index(self.backbone)
        concepts = [ConceptImages.load(s) for s in self.concepts]
        self.pairs = build_pairs(concepts, self.clip.image_size, self.config.segments, self.config.mixes)
        if len(self.pairs) < self.config.pairs_batch:
            raise UsageError(f"method_args.pairs_batch: {self.config.pairs_batch} but only {len(self.pairs)} pairs; "
                             "lower it or give more images")
        self.pair_features = self.clip.image_features([p.image for p in self.pairs])
        self.pair_keys = torch.tensor([p.key for p in self.pairs])
        self.clip.model = None  # only the projection and the features are needed from here on

    def _load_previous(self, run: Path, stage: int) -> None:
        import yaml

        where = "method_args.previous_run"
        config = run / "config.yaml"
        if not run.is_dir() or not config.is_file():
            raise UsageError(f"{where}: {run} is no run folder (no config.yaml); give the finished CLIF stage-{stage} run")
        try:
            saved = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError):
            saved = {}
        args = saved.get("method_args") or {} if isinstance(saved, dict) else {}
        if saved.get("method") != "clif" or str(args.get("stage", "all")) != str(stage):
            raise UsageError(f"{where}: {run} is a {saved.get('method')} run (stage {args.get('stage', 'all')}), not a "
                             f"CLIF stage-{stage} run; give the run of the stage before this one")
        if not (run / "DONE").is_file():
            raise UsageError(f"{where}: {run} has not finished (no DONE); resume it to its end first")
        tokens = [c.get("token") for c in saved.get("concepts") or []]
        if tokens != [c.token for c in self.concepts] or int(args.get("vectors", 1)) != self.config.vectors:
            raise UsageError(f"{where}: {run} learned tokens {tokens} with {args.get('vectors', 1)} vector(s) each; this "
                             f"run names {[c.token for c in self.concepts]} with {self.config.vectors}; give the same concepts")
        from ..files import check_safetensors

        for k, e in enumerate(self.tokens.encoders):
            path = run / self.tokens.file_name(k, e.name)
            if not path.is_file():
                raise UsageError(f"{where}: {path} is missing; give a finished CLIF run")
            check_safetensors(path, where)
        self.tokens.load_saved(run)

    # ---- stages ----
    def stage_at(self, step: int) -> int:
        c = self.config
        if c.stage != "all":
            return int(c.stage)
        return 1 if step < c.stage1_steps else 2 if step < c.stage1_steps + c.stage2_steps else 3

    def adjust_learning_rates(self, param_groups: list[dict], step: int) -> None:
        """stage=all: the token rows learn at stage1_lr in stage 1, at token_lr after (times the scheduler's factor)."""
        if self.config.stage != "all":
            return
        group = param_groups[self._token_group]
        factor = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
        group["lr"] = (self.config.stage1_lr if self.stage_at(step) == 1 else self.config.token_lr) * factor

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Pooled output of the fitting text encoder through the CLIP text projection (its own, if it has one)."""
        _, tokenizer, encoder = self.backbone.text_pairs()[self.text_index]
        ids = tokenizer([self.tokens.prompt(p) for p in prompts], padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(encoder.device))
        if getattr(out, "text_embeds", None) is not None:
            return out.text_embeds
        projection = self.clip.text_projection.to(out.pooler_output.device)
        return projection(out.pooler_output.to(projection.weight.dtype))

    def contrastive_loss(self, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        c = self.config
        idx = torch.randperm(len(self.pairs), generator=generator)[:c.pairs_batch]
        text = self.text_features([self.pairs[i].caption for i in idx.tolist()])
        image = self.pair_features[idx].to(text.device)
        keys = self.pair_keys[idx].to(text.device)
        loss = clif_contrastive_loss(text.float(), image, keys, c.logit_scale or self.clip.logit_scale,
                                     c.normalize, c.mask_same_concept)
        return loss, {"stage": 1, "contrastive": loss.item()}

    def loss(self, batch: dict, generator: torch.Generator, prior_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        stage = self.stage_at(batch.get("step", 0))
        if stage == 1:
            return self.contrastive_loss(generator)
        if self.switch is not None:  # stage 2 is textual inversion on the original denoiser
            self.switch.use(ADAPTER if stage == 3 else None)
        loss, logs = super().loss(batch, generator, prior_weight)
        return loss, {"stage": stage, **logs}

    def trainable_denoiser_params(self):
        return lora_params(self.backbone.denoiser, ADAPTER) if 3 in self.config.stages() else {}

    @classmethod
    def load_denoiser(cls, run: Path, settings: dict, models):
        from ..sampling import Denoiser
        from .lora import lora_run_denoiser

        if (run / "pytorch_lora_weights.safetensors").is_file():  # stage 3: the LoRA with the embeddings
            return lora_run_denoiser(run, models)
        return Denoiser(models.backbone(), run.name, models.load_tokens(run))  # stages 1-2: embeddings only

    def save(self, out_dir: Path, export: list[str]) -> list[Path]:
        paths = [self.tokens.save(out_dir)]
        if 3 in self.config.stages():
            paths.append(save_lora(self.backbone, ADAPTER, self._lora_config(), out_dir))
            if "kohya" in export:
                paths.append(self.backbone.write_kohya(paths[-1], out_dir / "lora_kohya.safetensors", self.config.alpha))
        return paths


def dump_training_pairs(config, out: Path) -> Path:
    """The stage-1 pairs a run of `config` (a TrainConfig of method clif) would train on, written to `out`
    for inspection (clif_pairs.dump_pairs); nothing is trained."""
    from ..backbones import resolve_model
    from ..clif_pairs import build_pairs, dump_pairs
    from ..data import ConceptImages
    from ..files import check_writable_folder

    if config.method != "clif":
        raise UsageError(f"--dump-pairs: writes CLIF's training pairs; the method is {config.method!r} (--method clif)")
    method_config = ClifConfig.from_dict(config.method_args)
    check_writable_folder(out, "--dump-pairs")
    folder = clip_folder(method_config, resolve_model(config.model))
    size = int((json.loads((folder / "config.json").read_text(encoding="utf-8")).get("vision_config") or {}).get("image_size", 224))
    concepts = [ConceptImages.load(c) for c in config.concepts]
    if len(concepts) < 2:
        raise UsageError("concepts: clif learns several concepts against each other; give two or more")
    pairs = build_pairs(concepts, size, method_config.segments, method_config.mixes)
    return dump_pairs(pairs, out, [c.token for c in config.concepts])
