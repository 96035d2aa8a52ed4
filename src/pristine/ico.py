"""ICO, image-specific context optimization (METHODS.md 5): each training image gets its own learnable
context vectors, `n_ctx` before and `n_end` after `<v> <class>`, so what the images do not share
(background, place, style) goes into them instead of into the token and the weights.

The training prompt of image i is `[SOS][ctx_i] <v> <class> [end_i][pad]`; the caption's other words are
not used. The vectors train with the method's parameters at `ctx_lr_scale` times its learning rate, are
in every training checkpoint (a resumed run continues them) and in no output: at inference the
contexts are dropped and the token is used alone.
"""

from __future__ import annotations

import torch

# the words the vectors start from (the authors' init strings "A" and ".")
PREFIX_WORD, SUFFIX_WORD = "a", "."


class ImageContexts:
    """The context vectors of every instance image of a training set, in its order (concepts in turn,
    each concept's images in folder order: `TrainingSet.draw`'s `index`)."""

    def __init__(self, backbone, concepts, images_per_concept: list[int], n_ctx: int = 1, n_end: int = 1):
        self.backbone = backbone
        self.cores = [f"{c.token} {c.class_word}" for c, n in zip(concepts, images_per_concept) for _ in range(n)]
        n_images = len(self.cores)
        self.prefix = torch.nn.Parameter(backbone.context_init(PREFIX_WORD, n_ctx)[None].repeat(n_images, 1, 1))
        self.suffix = torch.nn.Parameter(backbone.context_init(SUFFIX_WORD, n_end)[None].repeat(n_images, 1, 1))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in (self.prefix, self.suffix) if p.numel()]

    def encode(self, method, batch: dict) -> dict[str, torch.Tensor]:
        """The batch's conditioning: instance images with their own contexts, prior images with their
        captions as usual; rows in the batch's order."""
        index = batch["index"].tolist()
        prior = [bool(p) for p in batch["is_prior"]] if "is_prior" in batch else [False] * len(index)
        mine = [i for i, p in enumerate(prior) if not p]
        parts, order = [], []
        if mine:
            rows = torch.tensor([index[i] for i in mine], device=self.prefix.device)
            prompts = [self.cores[index[i]] for i in mine]
            if method.tokens is not None:
                prompts = [method.tokens.prompt(p) for p in prompts]
            parts.append(self.backbone.encode_with_contexts(prompts, self.prefix[rows], self.suffix[rows]))
            order += mine
        others = [i for i, p in enumerate(prior) if p]
        if others:
            parts.append(method.encode([batch["prompts"][i] for i in others]))
            order += others
        back = torch.tensor(order).argsort()
        return {k: torch.cat([part[k] for part in parts])[back.to(parts[0][k].device)] for k in parts[0]}

    def state(self) -> dict[str, torch.Tensor]:
        return {"contexts.prefix": self.prefix.detach().clone(), "contexts.suffix": self.suffix.detach().clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.prefix.copy_(state["contexts.prefix"])
            self.suffix.copy_(state["contexts.suffix"])
