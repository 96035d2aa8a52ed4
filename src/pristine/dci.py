"""DCI, divide-conquer-integrate (METHODS.md 5): a sampler of the engine in sampling.py.

For the early steps (t/T > 1 - agg_time) a second, auxiliary branch runs beside the concept branch: its
own latent from its own noise, the same fine-tuned model, the prompt without the concept tokens. In every
cross-attention layer the concept branch's attention output is blended per head and per pixel with the
auxiliary one, where the concept is not: the concept branch keeps the concept, the auxiliary branch
(which never saw the token, so it follows the prompt's context words) gives the rest. Both branches
are rows of one batched forward. Afterwards the auxiliary branch is dropped and sampling goes on as
the engine's. The constants are the authors': sharpness 10, scale 500.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import AttentionPass
from .errors import UsageError
from .phrases import phrase_spans, remove_phrase
from .sampling import GuidedSampler, SampleSettings, Term

SHARPNESS = 10.0  # softmax(10 x) over tokens and over pixels
# the authors' constant in front of the pixel softmax (not the pixel count). Made for SD1.x at 512 px,
# whose cross-attention maps have 4096, 1024, 256 and 64 pixels: on a model with smaller maps the same
# constant gives every pixel a larger share, and w_c goes to 1 everywhere (`scale` changes it). One
# literal, on the sampler's settings, which the CLI and the context bench default to as well.
SCALE = SampleSettings.dci_scale
AUX_SEED_OFFSET = 7_919  # the auxiliary latent's noise: seed + this, so it never is the concept's own


def dci_weights(probs_c: torch.Tensor, probs_a: torch.Tensor, concept_at: list[int], noun_at: list[int],
                length_c: int, length_a: int, lam: float, scale: float = SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_c, w_a), each (heads, pixels), from one concept row's and one auxiliary row's attention
    probabilities (heads, pixels, tokens). Positions count the start token as 0; lengths are the prompts'
    own tokens, which sit at 1..length."""
    renorm_c = (SHARPNESS * probs_c[..., 1:1 + length_c]).softmax(-1)
    renorm_a = (SHARPNESS * probs_a[..., 1:1 + length_a]).softmax(-1)
    on_concept = renorm_c[..., [p - 1 for p in concept_at]].sum(-1)
    off_noun = 1 - renorm_a[..., [p - 1 for p in noun_at]].sum(-1)
    m_c = scale * (SHARPNESS * on_concept).softmax(-1)  # over pixels
    m_a = scale * (SHARPNESS * off_noun).softmax(-1)
    w = torch.stack([m_c, lam * m_a]).softmax(0)  # over the two branches
    return w[0], w[1]


@dataclass
class BlendPlan:
    """Which rows of the batched forward are the concept branch and the auxiliary one (n each, row r of
    one pairs with row r of the other), and where their words sit."""

    concept: int  # the first concept row
    aux: int  # the first auxiliary row
    concept_at: list[list[int]]  # per row: the concept tokens' positions in the concept prompt
    noun_at: list[list[int]]  # per row: the class noun's positions in the auxiliary prompt
    length_c: list[int]
    length_a: list[int]
    lam: float
    scale: float = SCALE

    def blend(self, out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """out (batch, heads, pixels, head_dim), probs (batch, heads, pixels, tokens): O_c <- w_c O_c + w_a O_a."""
        out = out.clone()
        for r in range(len(self.concept_at)):
            c, a = self.concept + r, self.aux + r
            w_c, w_a = dci_weights(probs[c].float(), probs[a].float(), self.concept_at[r], self.noun_at[r],
                                   self.length_c[r], self.length_a[r], self.lam, self.scale)
            out[c] = (w_c[..., None] * out[c].float() + w_a[..., None] * out[a].float()).to(out.dtype)
        return out


class BlendCrossAttention:
    """A cross-attention processor that blends as `state["plan"]` says; with no plan (other forwards,
    self-attention) it is the processor it replaced."""

    def __init__(self, original, state: dict):
        self.original, self.state = original, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        plan = self.state.get("plan")
        if plan is None or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, temb=temb, **kwargs)
        p = AttentionPass(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        heads = torch.bmm(p.probs, p.value)  # per head, before the output projection: where the blend happens
        heads = plan.blend(heads.view(p.batch, attn.heads, p.pixels, -1), p.probs.view(p.batch, attn.heads, p.pixels, -1))
        return p.finish(heads.reshape(p.batch * attn.heads, p.pixels, -1))


def prompt_length(backbone, prompt: str) -> int:
    """How many of the prompt's own tokens the encoder keeps (start, end and padding not counted)."""
    ends = backbone.end_positions(prompt)
    return (ends[0] if ends else backbone.tokenizer.model_max_length - 1) - 1


def run_tokens(denoiser) -> dict[str, int]:
    """The concept tokens a term's denoiser knows, with their vector counts (a DreamBooth run carries its
    token inside its own text encoder, so it is read from the run's concepts)."""
    tokens = dict(denoiser.tokens)
    for c in getattr(denoiser, "concepts", None) or []:
        if isinstance(c, dict) and c.get("token"):
            tokens.setdefault(c["token"], 1)
    return tokens


def branch_prompts(backbone, prompt: str, tokens: dict[str, int], classes: dict[str, str]) -> dict:
    """The auxiliary prompt and the word positions DCI reads, found from the prompts:
    concept tokens in the (expanded) concept prompt, the class noun in the auxiliary prompt."""
    named = [t for t in tokens if phrase_spans(prompt, t)]
    if not named:
        raise UsageError(f"--sampler dci: prompt {prompt!r} names none of the run's tokens ({', '.join(tokens) or 'none'}); "
                         "DCI splits a concept prompt, so add the token")
    expanded = backbone.expand_prompt(prompt, tokens)
    concept_at = sorted({p for t in named
                         for p in backbone.phrase_positions(expanded, " ".join([t] + [f"{t}_{k}" for k in range(1, tokens[t])]))})
    aux = prompt
    for t in named:
        aux = remove_phrase(aux, t)
    noun_at = sorted({p for t in named if classes.get(t) for p in backbone.phrase_positions(aux, classes[t])})
    length_c, length_a = prompt_length(backbone, expanded), prompt_length(backbone, aux)
    return {"aux": aux, "concept_at": [p for p in concept_at if p <= length_c],
            "noun_at": [p for p in noun_at if p <= length_a], "length_c": length_c, "length_a": length_a}


class DCISampler(GuidedSampler):
    """The engine's loop with DCI's two branches for the first `agg_time` of the steps."""

    def __init__(self, unconditional, scheduler: str = "ddim", agg_time: float = 0.3, lam: float = 0.0,
                 shared_guidance: bool = True, scale: float = SCALE):
        super().__init__(unconditional, scheduler)
        self.agg_time, self.lam, self.shared_guidance, self.scale = agg_time, lam, shared_guidance, scale

    def concept_term(self, terms: list[Term]) -> int:
        """The one guidance term whose prompt names its run's token: the concept branch."""
        found = [i for i, term in enumerate(terms)
                 if any(phrase_spans(p, t) for p in term.prompts for t in run_tokens(term.denoiser))]
        if len(found) != 1:
            tokens = sorted({t for term in terms for t in run_tokens(term.denoiser)})
            what = (f"no guidance term's prompt names its run's token ({', '.join(tokens) or 'no run given'})" if not found
                    else f"{len(found)} terms name their run's token")
            raise UsageError(f"--sampler dci: {what}; DCI needs exactly one concept term (--adapter RUN with a prompt "
                             "naming its token)")
        return found[0]

    def plan(self, term: Term, n: int) -> tuple[list[str], BlendPlan]:
        from .backbones.base import Backbone

        backbone = term.denoiser.backbone
        if type(backbone).phrase_positions is Backbone.phrase_positions:
            raise UsageError(f"--sampler dci: the {backbone.family} family provides no cross-attention maps by word here; "
                             "DCI needs an SD-family model (SD1.x/2.x, SDXL or pristine-mini)")
        tokens = run_tokens(term.denoiser)
        classes = {c["token"]: c.get("class_word", "") for c in getattr(term.denoiser, "concepts", None) or []
                   if isinstance(c, dict) and c.get("token")}
        branches = [branch_prompts(backbone, p, tokens, classes) for p in term.prompts]
        # rows: the concept branch's n, then the auxiliary branch's n (set by dci_predictions)
        plan = BlendPlan(0, n, [b["concept_at"] for b in branches], [b["noun_at"] for b in branches],
                         [b["length_c"] for b in branches], [b["length_a"] for b in branches], self.lam, self.scale)
        return [b["aux"] for b in branches], plan

    def dci_predictions(self, x, x_aux, t, terms: list[Term], k: int, aux_cond: dict, plan: BlendPlan, state: dict):
        """(f0(x), [f_i(x)], f0 for the auxiliary branch, f_k(x' | aux prompt)): every group one forward,
        the concept term and the auxiliary branch in the same one with the blend on."""
        n = len(x)
        members: dict[tuple, list] = {self.unconditional.key: [("u", self.unconditional, self._uncond(n), x)]}
        if not self.shared_guidance:
            members[self.unconditional.key].append(("ua", self.unconditional, self._uncond(n), x_aux))
        for i, term in enumerate(terms):
            members.setdefault(term.denoiser.key, []).append((i, term.denoiser, term.denoiser.encode(term.prompts), x))
        concept_key = terms[k].denoiser.key
        members[concept_key].append(("a", terms[k].denoiser, aux_cond, x_aux))
        found = {}
        for key, group in members.items():
            ids = [m[0] for m in group]
            if key == concept_key:
                plan.concept, plan.aux = n * ids.index(k), n * ids.index("a")
                state["plan"] = plan
            denoiser = group[0][1]
            cond = {c: torch.cat([m[2][c] for m in group]) for c in group[0][2]}
            try:
                with denoiser.active():
                    out = denoiser.predict(torch.cat([m[3] for m in group]), t, cond)
            finally:
                state["plan"] = None
            found.update(zip(ids, out.split(n)))
        f0 = found["u"]
        return f0, [found[i] for i in range(len(terms))], (f0 if self.shared_guidance else found["ua"]), found["a"]

    @torch.no_grad()
    def sample(self, terms: list[Term], generators: list[torch.Generator], steps: int):
        scheduler, latents, extra = self.start(generators, steps)
        total = scheduler.config.num_train_timesteps
        early = [float(t) / total > 1 - self.agg_time for t in scheduler.timesteps]
        restore = None
        k = self.concept_term(terms) if self.agg_time > 0 else None  # a misuse is told whatever the steps
        if any(early):
            aux_prompts, plan = self.plan(terms[k], len(generators))
            aux_cond = terms[k].denoiser.encode(aux_prompts)
            aux_generators = [torch.Generator().manual_seed(g.initial_seed() + AUX_SEED_OFFSET) for g in generators]
            aux_scheduler, aux, aux_extra = self.start(aux_generators, steps)
            state = {"plan": None}
            restore = self._install(terms[k].denoiser.backbone, state)
        try:
            for i, t in enumerate(scheduler.timesteps):
                if not early[i]:
                    if restore is not None:  # the early stage is over: the auxiliary branch goes
                        restore()
                        restore = None
                    latents = self.step(scheduler, t, latents, terms, extra)
                    continue
                x, x_aux = scheduler.scale_model_input(latents, t), aux_scheduler.scale_model_input(aux, t)
                f0, fs, f0_aux, f_aux = self.dci_predictions(x, x_aux, t, terms, k, aux_cond, plan, state)
                latents = scheduler.step(self.combine(f0, fs, terms), t, latents, **extra, return_dict=False)[0]
                guided_aux = f0_aux + terms[k].weight * (f_aux - f0_aux)
                aux = aux_scheduler.step(guided_aux, t, aux, **aux_extra, return_dict=False)[0]
        finally:
            if restore is not None:
                restore()
        return self.finish(latents)

    @staticmethod
    def _install(backbone, state: dict):
        """Blending processors on the cross-attention layers; returns what puts the old ones back."""
        denoiser = backbone._unwrapped(backbone.denoiser)
        original = denoiser.attn_processors
        layers = [name for name in backbone.cross_attention_layers() if ".attn2." in name]
        if not layers:
            raise UsageError(f"--sampler dci: the {backbone.family} model has no separate cross-attention layers; "
                             "DCI needs an SD-family model (SD1.x/2.x, SDXL or pristine-mini)")
        denoiser.set_attn_processor({name: BlendCrossAttention(proc, state) if name in layers else proc
                                     for name, proc in original.items()})
        return lambda: denoiser.set_attn_processor(original)
