"""DINOv2-style self-distillation (Oquab et al. 2023) of a register ViT.

Student and teacher are the same ViT (same registers) with a DINO head (lightly's
DINOProjectionHead: MLP, L2-normalised bottleneck, weight-normalised prototypes). Per step:
2 global crops (model.img_size) and N local crops, cut by the loader from the whole image
(trainers/data/crops.py) (position embeddings interpolated to
their grid: timm's dynamic_img_size); the teacher (an EMA of the student, in eval mode)
sees the global crops; the student sees all crops, with iBOT masks on some global crops'
patches (a learned mask token replaces the masked patch embeddings). Loss = DINO [CLS]
cross-entropy over crop pairs + iBOT masked-patch cross-entropy + KoLeo on the student's
global [CLS] features, with DINOv2's scalings (ssl_meta_arch.py). Schedules (DINOv2
train.py): teacher temperature linear warmup, EMA momentum and weight decay cosine, the
prototypes frozen at first. Not reproduced: layer-wise lr decay, block-wise masking, blur
and solarisation.
"""

from __future__ import annotations

from typing import Any

import torch
from lightly.loss import KoLeoLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import update_momentum
from lightly.utils.scheduler import cosine_schedule
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from trainers.config import TrainConfig
from trainers.data.base import Batch, DataSource
from trainers.model import build_model
from trainers.objectives.base import DECAY_KEY, Objective
from trainers.objectives.dino_losses import TeacherCentring, dino_cross_entropy, ibot_cross_entropy
from trainers.objectives.knn import knn_top1
from trainers.objectives.multicrop import make_views
from trainers.probes import names

VAL_KNN_TOP1 = "val/knn_top1"


def encode(vit: VisionTransformer, images: torch.Tensor, masks: torch.Tensor | None = None,
           mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """Normed output tokens [B, prefix + patches, D]; masked patch embeddings become the mask token
    before the position embedding is added (DINOv2 prepare_tokens_with_masks)."""
    x = vit.patch_embed(images)  # NHWC: the model is built with dynamic_img_size
    if masks is not None and mask_token is not None:
        x = torch.where(masks.unsqueeze(-1), mask_token.to(x.dtype), x)
    x = vit._pos_embed(x)
    x = vit.norm_pre(vit.patch_drop(x))
    return vit.norm(vit.blocks(x))


class DinoObjective(Objective):
    name = "dino"

    def __init__(self, cfg: TrainConfig, data: DataSource, device: torch.device) -> None:
        super().__init__(cfg, data, device)
        self.d = cfg.dino
        self.student = self._networks().to(device)
        self.teacher = self._networks().to(device)
        # Built twice and copied: weight-normalised heads cannot be deep-copied.
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.model: VisionTransformer = self.student["backbone"]  # type: ignore[assignment]
        k = self.d.head_prototypes
        self.centring = nn.ModuleDict(
            {key: TeacherCentring(self.d.centering, k, self.d.center_momentum) for key in ("dino", "ibot")}
        ).to(device)
        self.koleo = KoLeoLoss()
        self._freeze_steps = round(self.d.freeze_last_layer * cfg.steps)
        self._terms: dict[str, torch.Tensor] = {}
        self._schedule: dict[str, float] = {}

    def _networks(self) -> nn.ModuleDict:
        vit = build_model(self.cfg.model, 0, dynamic_img_size=True)
        dim = vit.embed_dim

        def head() -> DINOProjectionHead:
            return DINOProjectionHead(dim, self.d.head_hidden_dim, self.d.head_bottleneck_dim, self.d.head_prototypes)

        nets: dict[str, nn.Module] = {"backbone": vit, "dino_head": head()}
        if self.d.ibot_separate_head:
            nets["ibot_head"] = head()
        # DINOv2 initialises the mask token at zero.
        nets["tokens"] = nn.ParameterDict({"mask": nn.Parameter(torch.zeros(1, dim))})
        return nn.ModuleDict(nets)

    def trainable(self) -> nn.Module:
        return self.student

    @property
    def probe_model(self) -> VisionTransformer:
        return self.teacher["backbone"]  # type: ignore[return-value]

    def train(self) -> None:
        self.student.train()
        self.teacher.eval()

    # ---------------------------------------------------------------- schedules

    def schedule(self, step: int) -> dict[str, float]:
        """Teacher temperature, EMA momentum and weight decay at `step` (pure functions of the step)."""
        d, steps = self.d, self.cfg.steps
        warmup = round(d.teacher_temp_warmup * steps)
        if warmup and step < warmup:
            temp = d.warmup_teacher_temp + (d.teacher_temp - d.warmup_teacher_temp) * step / warmup
        else:
            temp = d.teacher_temp
        return {
            "teacher_temp": float(temp),
            "momentum": float(cosine_schedule(step, steps, d.momentum_teacher, d.final_momentum_teacher)),
            "weight_decay": float(cosine_schedule(step, steps, self.cfg.optim.weight_decay, d.weight_decay_end)),
        }

    # ---------------------------------------------------------------- one step

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        d, cfg = self.d, self.cfg
        self._schedule = self.schedule(step)
        temp = self._schedule["teacher_temp"]
        with_ibot = d.ibot_weight > 0
        if batch.views is None:
            raise ValueError("objective dino needs the loader's crops (Batch.views): build the data with training_crops(cfg)")
        views = make_views(
            batch.views, seed=cfg.seed, step=step, patch_size=cfg.model.patch_size, mask_ratio=d.ibot_mask_ratio,
            mask_probability=d.ibot_mask_probability, with_masks=with_ibot, jitter=d.colour_jitter, share=self.share,
        )
        prefix = self.model.num_prefix_tokens
        s_ibot_head = self.student["ibot_head"] if d.ibot_separate_head else self.student["dino_head"]
        t_ibot_head = self.teacher["ibot_head"] if d.ibot_separate_head else self.teacher["dino_head"]

        with torch.no_grad():
            t_tokens = encode(self.teacher["backbone"], views.global_crops)  # type: ignore[arg-type]
            # Crop i of the teacher and of the student is the same view: the loss pairs different crops only.
            t_cls = self.teacher["dino_head"](t_tokens[:, 0]).chunk(2)
            t_probs = self.centring["dino"](torch.cat(t_cls), temp).chunk(2)

        mask_token = self.student["tokens"]["mask"]
        s_global = encode(self.model, views.global_crops, views.masks, mask_token)
        s_cls_global = s_global[:, 0]
        student_logits = list(self.student["dino_head"](s_cls_global).chunk(2))
        if views.local_crops is not None:
            s_local = encode(self.model, views.local_crops)[:, 0]
            student_logits += list(self.student["dino_head"](s_local).chunk(d.local_crops))
        dino = dino_cross_entropy(list(t_probs), student_logits, d.student_temp)
        koleo = sum(self.koleo(c.float()) for c in s_cls_global.chunk(2))
        total = dino + d.koleo_weight * koleo
        self._terms = {"dino_loss": dino.detach(), "koleo_loss": koleo.detach()}  # type: ignore[union-attr]

        if with_ibot and views.masks is not None:
            flat = views.masks.flatten(1)
            with torch.no_grad():
                t_patches = t_tokens[:, prefix:][flat]
                t_patch_probs = self.centring["ibot"](t_ibot_head(t_patches), temp)
            s_patches = s_global[:, prefix:][flat]
            ibot = ibot_cross_entropy(t_patch_probs, s_ibot_head(s_patches), views.masks, d.student_temp)
            total = total + d.ibot_weight * ibot
            self._terms["ibot_loss"] = ibot.detach()
        return total

    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        # The prototypes stay fixed for the first steps (DINO: the first epoch) for stability.
        if step < self._freeze_steps:
            for head in ("dino_head", "ibot_head"):
                if head in self.student:
                    for param in self.student[head].last_layer.parameters():
                        param.grad = None
        for group in optimizer.param_groups:
            if group.get(DECAY_KEY):
                group["weight_decay"] = self._schedule.get("weight_decay", self.cfg.optim.weight_decay)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        update_momentum(self.student, self.teacher, self._schedule.get("momentum", self.d.momentum_teacher))

    def log_values(self) -> dict[str, float]:
        values = {f"train/{key}": float(value) for key, value in self._terms.items()}
        values.update({f"train/{key}": value for key, value in self._schedule.items()})
        return values

    # ---------------------------------------------------------------- measuring

    def evaluate(self, batch_size: int) -> dict[str, float]:
        """k-NN top-1 on the teacher's frozen [CLS] features: a training-image bank, val queries."""
        teacher: VisionTransformer = self.teacher["backbone"]  # type: ignore[assignment]
        top1 = knn_top1(
            lambda images: teacher.forward_features(images)[:, 0],
            self.data.reference_batches(self.d.knn_train_size, batch_size),
            self.data.val_batches(batch_size),
            self.data.num_classes,
            self.d.knn_k,
            self.d.knn_temperature,
        )
        if top1 is None:  # no labelled training images (image-text data): no k-NN bank
            return {}
        # val/top1 is each objective's own top-1 (here k-NN), so specs can name one metric for all.
        return {VAL_KNN_TOP1: top1, names.VAL_TOP1: top1}

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        student = {k: v.state_dict() for k, v in self.student.items() if k != "backbone"}
        return {
            "student": student,  # the backbone is the checkpoint's "model"
            "teacher": self.teacher.state_dict(),
            "centring": self.centring.state_dict(),
            "schedule": dict(self._schedule),  # for reading; a resumed run recomputes it from the step
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, sub in state["student"].items():
            self.student[key].load_state_dict(sub)
        self.teacher.load_state_dict(state["teacher"])
        self.centring.load_state_dict(state["centring"])
        self._schedule = dict(state.get("schedule", {}))
