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

Data parallel (DINOv2's SSLMetaArch under DDP): the student's whole step is one forward of
`DinoNetworks` (backbone, heads, mask token), which the loop wraps in DDP, so every trained
parameter's gradient is averaged over the ranks; the teacher is an EMA of identical students,
hence identical on every rank. Each rank trains its share of the global batch's views (the
views are drawn for the global batch, so they equal one process's); the teacher's centring
sums are all-reduced (dino_losses.py), the DINO and iBOT terms are means over the rank's
images that DDP's average turns into the global means. KoLeo is computed per rank, on the
rank's own images, as DINOv2 does: the one term that differs from one process by design.
The k-NN evaluation and the probes run on rank 0 (the loop).
"""

from __future__ import annotations

from typing import Any

import torch
from lightly.loss import KoLeoLoss
from lightly.models.modules import DINOProjectionHead
from lightly.utils.scheduler import cosine_schedule
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from trainers.config import TrainConfig
from trainers.data.base import Batch, DataSource
from trainers.model import build_model, run_blocks
from trainers.objectives.base import DECAY_KEY, Objective
from trainers.objectives.dino_losses import (
    MaskedPatches,
    TeacherCentring,
    dino_cross_entropy,
    ibot_cross_entropy,
    masked_patches,
)
from trainers.objectives.knn import knn_top1
from trainers.objectives.multicrop import Views, make_views
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
    return vit.norm(run_blocks(vit, x))  # train.grad_checkpointing acts here (trainers/model.py)


def patch_slots(vit: VisionTransformer, tokens: torch.Tensor, patches: MaskedPatches) -> torch.Tensor:
    """The output tokens [slots, D] of the masked patches' slots (a gather: no host sync)."""
    return tokens[:, vit.num_prefix_tokens :].flatten(0, 1).index_select(0, patches.index)


class DinoNetworks(nn.ModuleDict):
    """Backbone, DINO head, iBOT head (when separate) and the mask token, for student and teacher.

    Its forward is the student's whole step, so that one DDP wrapper around it averages the
    gradients of every trained parameter: global crops (with iBOT masks), local crops, the heads."""

    def forward(
        self, global_crops: torch.Tensor, masks: torch.Tensor | None, local_crops: torch.Tensor | None,
        patches: MaskedPatches | None,
    ) -> dict[str, torch.Tensor]:
        backbone: VisionTransformer = self["backbone"]  # type: ignore[assignment]
        tokens = encode(backbone, global_crops, masks, self["tokens"]["mask"])
        out = {"cls": tokens[:, 0], "global_logits": self["dino_head"](tokens[:, 0])}
        if local_crops is not None:
            out["local_logits"] = self["dino_head"](encode(backbone, local_crops)[:, 0])
        if patches is not None:
            out["patch_logits"] = self.patch_head(patch_slots(backbone, tokens, patches))
        return out

    @property
    def patch_head(self) -> nn.Module:
        """The iBOT head: a separate one, or the DINO head shared (DINOv2 default)."""
        return self["ibot_head"] if "ibot_head" in self else self["dino_head"]


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- m teacher + (1 - m) student, parameter by parameter (lightly's update_momentum),
    in two multi-tensor (foreach) calls as DINOv2 does, not two small kernels per tensor."""
    teacher_params = list(teacher.parameters())
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, list(student.parameters()), alpha=1.0 - momentum)


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
        # The student's step; the loop replaces it with the DDP wrapper of self.student under data parallelism.
        self.forward = self.student
        # With the iBOT loss off, the mask token (and a separate iBOT head) get no gradient: DDP must be told.
        self.unused_parameters = self.d.ibot_weight == 0
        self._freeze_steps = round(self.d.freeze_last_layer * cfg.steps)
        self._terms: dict[str, torch.Tensor] = {}
        self._schedule: dict[str, float] = {}

    def _networks(self) -> DinoNetworks:
        vit = build_model(self.cfg.model, 0, dynamic_img_size=True)
        dim = vit.embed_dim

        def head() -> DINOProjectionHead:
            return DINOProjectionHead(dim, self.d.head_hidden_dim, self.d.head_bottleneck_dim, self.d.head_prototypes)

        nets: dict[str, nn.Module] = {"backbone": vit, "dino_head": head()}
        if self.d.ibot_separate_head:
            nets["ibot_head"] = head()
        # DINOv2 initialises the mask token at zero.
        nets["tokens"] = nn.ParameterDict({"mask": nn.Parameter(torch.zeros(1, dim))})
        return DinoNetworks(nets)

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

    def views(self, batch: Batch, step: int) -> Views:
        """This rank's share of the views of step s: the loader cut this rank's crops from the whole
        images; the jitter and iBOT masks are drawn for the global batch, so they equal one process's."""
        d, cfg = self.d, self.cfg
        if batch.views is None:
            raise ValueError("objective dino needs the loader's crops (Batch.views): build the data with training_crops(cfg)")
        return make_views(
            batch.views, seed=cfg.seed, step=step, patch_size=cfg.model.patch_size, mask_ratio=d.ibot_mask_ratio,
            mask_probability=d.ibot_mask_probability, with_masks=d.ibot_weight > 0, jitter=d.colour_jitter,
            share=self.share,
        )

    def mask_slots(self, rows: int) -> int:
        """Slots for the masked patches of `rows` global crops: at most the masked images of the
        global batch (DINOv2's collate masks int(2B * probability) of them), each with at most
        the top mask ratio of its patches (+1 for the float rounding of the ratio). Known on the
        host, like DINOv2's `upperbound`, so that no step reads a count from the device. The
        arithmetic is DinoConfig.mask_slots, which the memory estimate (trainers/memory.py) shares."""
        return self.d.mask_slots(rows, self.cfg.optim.batch_size, self.cfg.model.num_patches)

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        d = self.d
        self._schedule = self.schedule(step)
        temp = self._schedule["teacher_temp"]
        distributed = self.share[1] > 1
        views = self.views(batch, step)
        patches = None if views.masks is None else masked_patches(views.masks, self.mask_slots(views.masks.shape[0]))
        teacher: DinoNetworks = self.teacher  # type: ignore[assignment]

        with torch.no_grad():
            t_tokens = encode(teacher["backbone"], views.global_crops)  # type: ignore[arg-type]
            # Crop i of the teacher and of the student is the same view: the loss pairs different crops only.
            t_probs = self.centring["dino"](teacher["dino_head"](t_tokens[:, 0]), temp, distributed=distributed).chunk(2)
            if patches is not None:
                t_patch_logits = teacher.patch_head(patch_slots(teacher["backbone"], t_tokens, patches))  # type: ignore[arg-type]
                t_patch_probs = self.centring["ibot"](t_patch_logits, temp, valid=patches.valid, distributed=distributed)

        out = self.forward(views.global_crops, views.masks, views.local_crops, patches)
        student_logits = list(out["global_logits"].chunk(2))
        if "local_logits" in out:
            student_logits += list(out["local_logits"].chunk(d.local_crops))
        dino = dino_cross_entropy(list(t_probs), student_logits, d.student_temp)
        # KoLeo on this rank's images (DINOv2), in fp32 as DINOv2's koleo_loss.py: nearest-neighbour
        # distances of bf16 features would round to zero.
        with torch.autocast(self.device.type, enabled=False):
            koleo = sum(self.koleo(c.float()) for c in out["cls"].chunk(2))
        total = dino + d.koleo_weight * koleo
        self._terms = {"dino_loss": dino.detach(), "koleo_loss": koleo.detach()}  # type: ignore[union-attr]
        if patches is not None:
            ibot = ibot_cross_entropy(t_patch_probs, out["patch_logits"], patches, d.student_temp)
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
        ema_update(self.student, self.teacher, self._schedule.get("momentum", self.d.momentum_teacher))

    def log_values(self) -> dict[str, float]:
        # Each term is a mean over the rank's images: their mean over the ranks is the global batch's
        # (KoLeo's: the mean of the ranks' own KoLeo). Every rank calls this at the same log points.
        terms = list(self._terms)
        values = {f"train/{key}": value for key, value in zip(terms, self.mean_over_ranks([self._terms[k] for k in terms]))}
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
