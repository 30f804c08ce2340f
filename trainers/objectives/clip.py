"""CLIP-style image-text contrastive training (Radford et al. 2021; open_clip's training code).

The image tower is the project's register ViT ([CLS] feature, then a linear projection); the
text tower, tokenizer and loss come from open-clip-torch: `TextTransformer` (causal, EOT
pooled, projected), `SimpleTokenizer` (its BPE vocabulary ships in the wheel: no download)
and `ClipLoss` (symmetric cross-entropy over the batch's image-text similarities). The
temperature is learned as a logit scale, initialised to 1/0.07 and clamped to 100 after each
step as open_clip does. Evaluation: zero-shot top-1 on the labelled val split, classifying
each image by its nearest class embedding (prompt templates averaged, open_clip's
build_zero_shot_classifier).

Data parallel (open_clip's training with --local-loss --gather-with-grad): each rank encodes its
share of the images and captions; ClipLoss gathers every rank's features
(`torch.distributed.nn.all_gather`, whose backward returns each rank the gradients of its own
features from every rank's loss) and each rank scores its own images and captions against all
of the global batch (`local_loss`). The mean of the ranks' losses is one process's loss on the
global batch, and DDP's gradient average over the towers (the logit scale included, so it stays
the same on every rank) is one process's gradient. The loss runs in fp32: logits scaled up to
100 would keep only two or three significant digits in bf16.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from trainers.config import ClipConfig, TrainConfig
from trainers.data.base import Batch, DataSource
from trainers.model import build_model, forward_features
from trainers.objectives.base import Objective
from trainers.probes import names

VAL_ZEROSHOT_TOP1 = "val/zeroshot_top1"
VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer


class ClipTowers(nn.Module):
    """Image tower, text tower and the learned logit scale: open_clip's CLIP, with our ViT inside."""

    def __init__(self, vit: VisionTransformer, cfg: ClipConfig) -> None:
        super().__init__()
        self.visual = vit
        self.image_projection = nn.Linear(vit.embed_dim, cfg.embed_dim, bias=False)
        self.text = TextTransformer(
            context_length=cfg.context_length, vocab_size=VOCAB_SIZE, width=cfg.text_width,
            heads=cfg.text_heads, layers=cfg.text_layers, output_dim=cfg.embed_dim,
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        # The ViT's pooled [CLS]; its blocks run through trainers/model.py (grad checkpointing).
        pooled = self.visual.forward_head(forward_features(self.visual, images))
        features = self.image_projection(pooled).float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.text(tokens).float()
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A step's whole use of the towers (what DDP wraps): normalised image and text features and the logit scale."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp()


class ClipObjective(Objective):
    name = "clip"

    def __init__(self, cfg: TrainConfig, data: DataSource, device: torch.device) -> None:
        super().__init__(cfg, data, device)
        self.towers = ClipTowers(build_model(cfg.model, 0), cfg.clip).to(device)
        self.model: VisionTransformer = self.towers.visual
        self.tokenizer = SimpleTokenizer(context_length=cfg.clip.context_length)
        self.forward = self.towers  # the loop replaces it with the DDP wrapper under data parallelism
        self._losses: dict[tuple[int, int], ClipLoss] = {}
        self._max_log_scale = math.log(cfg.clip.max_logit_scale)
        self._terms: dict[str, torch.Tensor] = {}

    def trainable(self) -> nn.Module:
        return self.towers

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)
        self.towers.text.set_grad_checkpointing(enable)  # open_clip's: the text blocks too

    @property
    def clip_loss(self) -> ClipLoss:
        """open_clip's ClipLoss for this rank: with more than one rank, features gathered with
        gradients and each rank's loss over its own rows (local_loss), labels offset by its rank."""
        rank, ranks = self.share
        if self.share not in self._losses:
            many = ranks > 1
            self._losses[self.share] = ClipLoss(
                local_loss=many, gather_with_grad=many, cache_labels=True, rank=rank, world_size=ranks
            )
        return self._losses[self.share]

    def tokens(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts)
        if self.device.type == "cuda":  # queue the copy behind the running step instead of waiting for it
            return tokens.pin_memory().to(self.device, non_blocking=True)
        return tokens.to(self.device)

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        if batch.captions is None:
            raise ValueError(f"objective clip needs captions, and data {self.cfg.data.name!r} gave none")
        # The loader tokenises the captions in its workers (Batch.tokens); tokenise here only for a batch without them.
        tokens = batch.tokens if batch.tokens is not None else self.tokens(batch.captions)
        image, text, scale = self.forward(batch.images, tokens)
        self._terms = {"logit_scale": scale.detach()}
        with torch.autocast(self.device.type, enabled=False):
            return self.clip_loss(image.float(), text.float(), scale.float())

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        # open_clip: clamp to [0, ln 100] so that the temperature never drops below 0.01.
        self.towers.logit_scale.clamp_(0, self._max_log_scale)

    def log_values(self) -> dict[str, float]:
        # The logit scale is a DDP-trained parameter, the same on every rank: no reduction needed.
        return {f"train/{key}": float(value) for key, value in self._terms.items()}

    def evaluate(self, batch_size: int) -> dict[str, float]:
        self.towers.eval()
        try:
            classifier = build_zero_shot_classifier(
                self.towers, self.tokenizer, self.data.class_names, self.cfg.clip.prompts, device=self.device
            )
            correct, count = torch.zeros((), device=self.device), 0
            for batch in self.data.val_batches(batch_size):
                features = self.towers.encode_image(batch.images)
                with torch.autocast(self.device.type, enabled=False):  # fp32 similarities, as the loss
                    logits = features.float() @ classifier.float()
                correct += (logits.argmax(dim=-1) == batch.labels).sum()
                count += len(batch)
        finally:
            self.towers.train()
        top1 = float(correct) / count
        # val/top1 is each objective's own top-1 (here zero-shot), so specs can name one metric for all.
        return {VAL_ZEROSHOT_TOP1: top1, names.VAL_TOP1: top1}

    def state_dict(self) -> dict[str, Any]:
        towers = {k: v for k, v in self.towers.state_dict().items() if not k.startswith("visual.")}
        return {"towers": towers}  # the image tower's ViT is the checkpoint's "model"

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing, unexpected = self.towers.load_state_dict(state["towers"], strict=False)
        if unexpected or any(not k.startswith("visual.") for k in missing):
            raise KeyError(f"checkpoint does not match the CLIP towers: missing {missing}, unexpected {unexpected}")
