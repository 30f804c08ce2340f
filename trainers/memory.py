"""GPU memory of one training process, estimated from the config alone, without torch.

The sweep plan prints it per trial before anything starts (orchestrator/spec/plan.py), so it is
arithmetic, like trainers/cost.py. What it counts, per GPU (one process; a data-parallel
worker trains its share of the global batch):

- parameters: fp32 master weights of everything on the device (student, EMA teacher, heads,
  text tower). bf16 autocast keeps them fp32 and casts on the fly;
- gradients (fp32, trained parameters only) and, with workers, DDP's gradient buckets (as big again);
- optimizer state: AdamW and timm's Lamb keep two fp32 moments per trained parameter;
- activations: the tensors autograd saves for the backward pass, counted as
  `torch.autograd.graph.saved_tensors_hooks` sees them, bf16 weight casts that autograd saves
  included (tests/test_memory.py measures them on the CPU for each objective and asserts this
  estimate within 5% at two sizes);
- inputs: the batch (and DINO's crops, and the teacher's tokens the iBOT loss reads) on the device;
- the working set on top of that, the larger of two moments:
  - the end of the forward pass: the bf16 weight casts that autocast's cache holds but autograd
    does not save (the checkpointed blocks'), and the temporaries of the loss (DINO: fp32
    copies of the [tokens, prototypes] logits, Sinkhorn-Knopp's and the log-softmax's);
  - the backward pass: gradients as wide as a block's MLP hidden layer, and under grad
    checkpointing the block's recomputed activations and weight casts.

The previous step's gradients are freed only after the forward pass (the loop zeroes them
then), so gradients count whole at both moments. orchestrator/bench/memory.py measures the peak
of a whole training step on the CPU (every tensor alive at once, fused AdamW as on a GPU): the
estimate is never under it and at most 30% over at tiny sizes, where one block's recomputation
weighs most.

What one transformer block saves per token under SDPA (flash or memory-efficient attention:
q, k, v, output and the log-sum-exp, never the T x T matrix), with A bytes per activation
(2 under bf16, 4 in fp32), the residual stream and LayerNorm statistics in fp32 (autocast runs
LayerNorm in fp32): the block input and the residual after attention (2 x 4D), the two
LayerNorm outputs cast for their matmul (2 x AD), q/k/v (3AD), the attention output (AD), the
MLP hidden before and after GELU (2 x A x hidden), LayerScale's inputs (2AD), LayerNorm
statistics (4 x 4) and the log-sum-exp (4 x heads). Grad checkpointing (timm's
`checkpoint_seq`, non-reentrant) keeps only each block's fp32 input and recomputes the rest
in the backward pass. Not counted: the CUDA context and the allocator's cache and
fragmentation (the plan keeps a margin for them), the evaluation's k-NN bank, and what
torch.compile's partitioner changes (it usually saves less than eager).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.config import ClipConfig, DinoConfig, ModelConfig, TrainConfig

FP32, BF16 = 4, 2
OPTIMIZER_MOMENTS = 2  # AdamW's and Lamb's exp_avg and exp_avg_sq
CLIP_VOCAB = 49408  # open_clip's SimpleTokenizer (trainers/objectives/clip.py)
TEXT_MLP_RATIO = 4  # open_clip's text blocks
GB = 1e9


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one GPU for one training process of a trial."""

    batch: int  # images this process trains on per step (the per-worker batch)
    precision: str  # 'bf16' (autocast, fp32 master weights) or 'fp32'
    checkpointing: bool
    params: int
    grads: int
    optimizer: int
    activations: int  # saved for the backward pass (weight casts that autograd saves included)
    inputs: int
    forward_work: int  # at the end of the forward pass: unsaved weight casts, the loss's temporaries
    backward_work: int  # in the backward pass: gradients of a block, its recomputation
    teacher_work: int = 0  # DINO, before the student's forward: the teacher's targets being formed

    @property
    def model_state(self) -> int:
        """What does not shrink with the batch: weights, gradients, optimizer moments."""
        return self.params + self.grads + self.optimizer

    @property
    def transient(self) -> int:
        """The working set on top of the activations at the step's fullest moment. DINO's teacher
        moment comes before the student saves anything, so it competes with activations + working set."""
        return max(self.forward_work, self.backward_work, self.teacher_work - self.activations)

    @property
    def total(self) -> int:
        return self.model_state + self.activations + self.inputs + self.transient

    def gb(self, part: str = "total") -> float:
        return getattr(self, part) / GB


# ----------------------------------------------------------------------------- parameters


def mlp_hidden(dim: int, mlp_ratio: float) -> int:
    return int(dim * mlp_ratio)  # timm's Mlp


def vit_block_params(dim: int, hidden: int, layer_scale: bool) -> int:
    """qkv and projection (with biases), MLP, two LayerNorms, LayerScale's two gains."""
    return 4 * dim * dim + 4 * dim + 2 * dim * hidden + hidden + dim + 4 * dim + (2 * dim if layer_scale else 0)


def vit_params(m: ModelConfig, num_classes: int) -> int:
    """A timm VisionTransformer as trainers/model.py builds it (class token, registers, patch position embeddings)."""
    dim, depth, _ = m.dims
    hidden = mlp_hidden(dim, m.mlp_ratio)
    patch_embed = 3 * m.patch_size**2 * dim + dim
    tokens = dim * (1 + m.num_registers + m.num_patches)  # [CLS], registers, position embeddings
    head = dim * num_classes + num_classes if num_classes else 0
    return patch_embed + tokens + depth * vit_block_params(dim, hidden, m.layer_scale is not None) + 2 * dim + head


def vit_matrix_params(m: ModelConfig, num_classes: int) -> tuple[int, int]:
    """(matrices outside the blocks, matrices inside them): what bf16 autocast casts."""
    dim, depth, _ = m.dims
    hidden = mlp_hidden(dim, m.mlp_ratio)
    return 3 * m.patch_size**2 * dim + dim * num_classes, depth * (4 * dim * dim + 2 * dim * hidden)


def vit_bias_params(m: ModelConfig, num_classes: int) -> tuple[int, int]:
    """(biases outside the blocks, inside them): bf16 autocast caches a copy of each through the
    forward pass, which autograd does not save (a linear layer's backward needs no bias)."""
    dim, depth, _ = m.dims
    return dim + num_classes, depth * (5 * dim + mlp_hidden(dim, m.mlp_ratio))


def dino_head_params(in_dim: int, d: DinoConfig) -> tuple[int, int]:
    """(trained, frozen) of lightly's DINOProjectionHead: the MLP, the prototypes' direction
    (trained) and their weight-norm gain (frozen at 1)."""
    h, b, k = d.head_hidden_dim, d.head_bottleneck_dim, d.head_prototypes
    return in_dim * h + h + h * h + h + h * b + b + b * k, k


def text_params(c: ClipConfig) -> int:
    """open_clip's TextTransformer: token and position embeddings, blocks, final norm, projection."""
    w = c.text_width
    block = 4 * w + 3 * w * w + 3 * w + w * w + w + 4 * w * w + 4 * w + 4 * w * w + w
    return CLIP_VOCAB * w + c.context_length * w + c.text_layers * block + 2 * w + w * c.embed_dim


def trained_and_frozen_params(cfg: TrainConfig, num_classes: int) -> tuple[int, int]:
    """(parameters the optimizer trains, parameters on the device it does not: DINO's EMA teacher)."""
    m = cfg.model
    if cfg.objective == "supervised":
        return vit_params(m, num_classes), 0
    dim = m.dims[0]
    if cfg.objective == "clip":
        return vit_params(m, 0) + dim * cfg.clip.embed_dim + text_params(cfg.clip) + 1, 0
    heads = 2 if cfg.dino.ibot_separate_head else 1
    head_trained, head_frozen = dino_head_params(dim, cfg.dino)
    student = vit_params(m, 0) + heads * head_trained + dim  # + the mask token
    return student, heads * head_frozen + student + heads * head_frozen  # the teacher is a full copy


# ----------------------------------------------------------------------------- activations


def block_bytes_per_token(dim: int, heads: int, hidden: int, act: int, layer_scale: bool) -> int:
    """Saved by one pre-norm transformer block per token (see the module docstring)."""
    saved = 2 * FP32 * dim + 2 * act * dim + 3 * act * dim + act * dim + 2 * act * hidden + 4 * FP32 + FP32 * heads
    return saved + (2 * act * dim if layer_scale else 0)


def tower_bytes(tokens: int, dim: int, depth: int, heads: int, hidden: int, act: int, layer_scale: bool,
                checkpointing: bool) -> int:
    """Saved by a stack of blocks and its final LayerNorm, per sequence of `tokens`."""
    per_block = FP32 * dim if checkpointing else block_bytes_per_token(dim, heads, hidden, act, layer_scale)
    final_norm = FP32 * dim + 2 * FP32
    return tokens * (depth * per_block + final_norm)


def vit_tower_bytes(m: ModelConfig, img_size: int, act: int, checkpointing: bool) -> int:
    """A ViT on one image of img_size: the patch embedding's input, the blocks, the final norm."""
    dim, depth, heads = m.dims
    tokens = (img_size // m.patch_size) ** 2 + 1 + m.num_registers
    pixels = 3 * img_size * img_size * act  # the conv saves its (cast) input
    return pixels + tower_bytes(tokens, dim, depth, heads, mlp_hidden(dim, m.mlp_ratio), act, m.layer_scale is not None,
                                checkpointing)


def pooled_input_bytes(tokens: int, dim: int, act: int) -> int:
    """What a linear layer on one pooled token saves per sequence. Under autocast it saves a
    bf16 copy of the token; in fp32 the token is a view, which keeps the whole normed sequence."""
    return act * dim if act == BF16 else FP32 * tokens * dim


def supervised_bytes(cfg: TrainConfig, num_classes: int, act: int, checkpointing: bool) -> int:
    """Per image: the ViT, the head's input and the loss (log-softmax output; soft targets and BCE keep two)."""
    m = cfg.model
    tokens = m.num_patches + 1 + m.num_registers
    loss = FP32 * num_classes * (2 if cfg.augment.mixing or cfg.augment.loss == "bce" else 1)
    return vit_tower_bytes(m, m.img_size, act, checkpointing) + pooled_input_bytes(tokens, m.dims[0], act) + loss


def clip_bytes(cfg: TrainConfig, global_batch: int, act: int, checkpointing: bool) -> int:
    """Per image-caption pair: both towers, their projections, and the loss (fp32) against the
    `global_batch` captions and images every rank scores its own against."""
    m, c = cfg.model, cfg.clip
    tokens = m.num_patches + 1 + m.num_registers
    image = vit_tower_bytes(m, m.img_size, act, checkpointing) + pooled_input_bytes(tokens, m.dims[0], act)
    w, length, e = c.text_width, c.context_length, c.embed_dim
    text = 8 * length  # token ids (int64); the embeddings' sum is the first block's input
    # open_clip checkpoints its text blocks (set_grad_checkpointing) as timm does the ViT's.
    text += tower_bytes(length, w, c.text_layers, c.text_heads, TEXT_MLP_RATIO * w, act, False, checkpointing)
    # The end-of-text token is gathered (a copy, not a view) for the projection, with its two
    # index vectors (int64: the rows and the argmax of the ids).
    text += act * w + 2 * 8
    # Per tower: the fp32 feature, its norm and clamp (F.normalize), the normalised feature and
    # its product with the logit scale (open_clip's ClipLoss); two [B, global batch] fp32
    # log-softmax outputs for the cross-entropies and the label (int64).
    loss = 2 * (FP32 * e + 2 * FP32 + 2 * FP32 * e) + 2 * FP32 * global_batch + 8
    return image + text + loss


def clip_gathered_bytes(cfg: TrainConfig, global_batch: int, workers: int) -> int:
    """Per process with more than one rank: ClipLoss's gathered image and text features of the
    global batch (fp32, all_gather with gradients), which its products with the rank's own save."""
    return 2 * FP32 * cfg.clip.embed_dim * global_batch if workers > 1 else 0


def ibot_slots(cfg: TrainConfig, batch: int) -> int:
    """Rows of iBOT's masked-patch buffer for a process of `batch` images: DinoObjective's slots
    (DinoConfig.mask_slots, a bound known on the host), which the student's and the teacher's
    iBOT heads and the loss see whole, whether a slot holds a masked patch or not."""
    d = cfg.dino
    if d.ibot_weight <= 0:
        return 0
    rows = 2 * batch
    patches = cfg.model.num_patches
    return min(d.mask_slots(rows, cfg.optim.batch_size, patches), rows * patches)


def dino_head_token_bytes(dim: int, d: DinoConfig, act: int) -> int:
    """Saved per token through lightly's DINO head: the MLP's inputs and GELU's (4 hidden-wide),
    the bottleneck before and after its L2 normalisation (and the norm and its clamp), and the
    fp32 log-softmax over the prototypes."""
    h, b = d.head_hidden_dim, d.head_bottleneck_dim
    return act * (dim + 4 * h + 2 * b + 2) + FP32 * d.head_prototypes


def dino_bytes(cfg: TrainConfig, batch: int, act: int, checkpointing: bool) -> int:
    """Per batch: the student on 2 global + N local crops, the head on every crop's [CLS] and on
    the masked patches, the teacher's targets the losses keep (probabilities per global crop and
    per masked patch), and the head's prototype matrix per call."""
    m, d = cfg.model, cfg.dino
    dim = m.dims[0]
    global_tokens = m.num_patches + 1 + m.num_registers
    local = m.model_copy(update={"img_size": d.local_crop_size})
    local_tokens = local.num_patches + 1 + m.num_registers
    crops = 2 * vit_tower_bytes(m, m.img_size, act, checkpointing) + d.local_crops * vit_tower_bytes(
        local, d.local_crop_size, act, checkpointing
    )
    slots = ibot_slots(cfg, batch)
    ibot = d.ibot_weight > 0
    cls_tokens = batch * (2 + d.local_crops)
    head_tokens = cls_tokens + slots
    # The global crops' [CLS] reach KoLeo as fp32 views (LayerNorm's output is fp32 under autocast
    # too), which keep the global crops' normed tokens whole; in fp32 the head's [CLS] inputs are
    # such views as well, of the local crops' tokens too (see pooled_input_bytes). Under autocast
    # the head saves bf16 copies instead (in dino_head_token_bytes).
    if act == FP32:
        cls_inputs = batch * FP32 * dim * (2 * global_tokens + d.local_crops * local_tokens) - cls_tokens * FP32 * dim
    else:
        cls_inputs = batch * FP32 * dim * 2 * global_tokens
    head_token = dino_head_token_bytes(dim, d, act)
    calls = (2 if d.local_crops else 1) + (1 if ibot else 0)  # global [CLS], local [CLS], iBOT slots
    prototypes = calls * (act * d.head_bottleneck_dim * d.head_prototypes + FP32 * d.head_prototypes)
    targets = FP32 * d.head_prototypes * (2 * batch + slots)
    # KoLeo (lightly, fp32) per global crop and image: the difference to the nearest neighbour,
    # its index (int64), the feature's norm and its clamp, the distance and its log. (The cosine
    # similarities that find the neighbour feed an argmax only: what they save is freed at once.)
    koleo = 2 * batch * (FP32 * dim + 8 + 4 * FP32)
    # The masks (bool) where the mask token replaces patch embeddings; the slots' gather saves its
    # index, a view of the stable sort of every global patch (int64), and the loss a weight per slot.
    masking = 2 * batch * m.num_patches * (1 + 8) + FP32 * slots if ibot else 0
    return batch * crops + cls_inputs + head_tokens * head_token + prototypes + targets + koleo + masking


# ----------------------------------------------------------------------------- the estimate


def per_worker_batch(cfg: TrainConfig, workers: int) -> int:
    return max(1, cfg.optim.batch_size // workers)


def estimate_memory(cfg: TrainConfig, num_classes: int, *, workers: int = 1, bf16: bool = True,
                    batch: int | None = None) -> MemoryEstimate:
    """Bytes per GPU of one process of a trial of `workers` data-parallel processes (batch:
    images per process, default the per-worker share of optim.batch_size)."""
    b = batch if batch is not None else per_worker_batch(cfg, workers)
    act = BF16 if bf16 else FP32
    ckpt = cfg.grad_checkpointing
    m = cfg.model
    dim, depth, heads = m.dims
    hidden = mlp_hidden(dim, m.mlp_ratio)
    trained, frozen = trained_and_frozen_params(cfg, num_classes)
    image = 3 * m.img_size**2 * FP32

    classes = num_classes if cfg.objective == "supervised" else 0
    outside, inside = vit_matrix_params(m, classes)
    biases = sum(vit_bias_params(m, classes))
    block_tokens = m.num_patches + 1 + m.num_registers
    teacher_work = params_extra = 0
    if cfg.objective == "supervised":
        activations = b * supervised_bytes(cfg, num_classes, act, ckpt)
        # This rank's share of the loader's images (crops, repeats included) and, with 3-Augment or
        # Mixup/CutMix, the augmented copy the forward pass reads.
        a = cfg.augment
        inputs = b * image * (2 if a.three_augment or a.mixing else 1)
        block_batch = b
        loss_work = 0
    elif cfg.objective == "clip":
        c = cfg.clip
        global_batch = b * workers
        activations = b * clip_bytes(cfg, global_batch, act, ckpt) + clip_gathered_bytes(cfg, global_batch, workers)
        w = c.text_width
        outside += dim * c.embed_dim + w * c.embed_dim
        inside += c.text_layers * 12 * w * w
        biases += c.text_layers * 9 * w  # attention's in and out projections, the MLP's two layers
        if bf16 and not ckpt:  # each text block's attention saves the causal mask cast to bf16
            activations += c.text_layers * BF16 * c.context_length**2
        inputs = b * (image + 8 * c.context_length)  # images and token ids
        block_batch = b
        loss_work = 2 * FP32 * b * global_batch  # ClipLoss's two [B, global batch] logits, held to its end
    else:
        d = cfg.dino
        activations = dino_bytes(cfg, b, act, ckpt)
        h, bottleneck, k = d.head_hidden_dim, d.head_bottleneck_dim, d.head_prototypes
        heads_per_network = 2 if d.ibot_separate_head else 1
        outside += heads_per_network * (dim * h + h * h + h * bottleneck)
        biases += heads_per_network * (2 * h + bottleneck)  # the prototype layer has none
        # Weight norm keeps each prototype layer's last computed weight (fp32) as a module
        # attribute, in the student and the teacher: as lasting as the parameters.
        params_extra = 2 * heads_per_network * FP32 * k * bottleneck
        local_pixels = 3 * d.local_crop_size**2 * FP32
        # The loader's crops (normalised), their colour-jittered copies (multicrop.make_views), and
        # the teacher's normed tokens of the global crops, kept for iBOT's slots.
        inputs = 2 * b * (2 * image + d.local_crops * local_pixels) + 2 * b * block_tokens * dim * FP32
        block_batch = 2 * b  # the global crops go through a block together
        slots = ibot_slots(cfg, b)
        logits = 0 if act == FP32 else act  # under autocast a head's logits are a bf16 array beside their fp32 copy
        # The end of the student's forward: its logits of every head call (in the step's dict) and the
        # teacher's iBOT logits, held until the loss returns, and one fp32 [rows, K] temporary of the
        # largest term (iBOT's over the slots, or one crop's [CLS] cross-entropy).
        # (And per slot its validity flag and its cross-entropy; the terms so far, three fp32 scalars.)
        loss_work = act * k * (b * (2 + d.local_crops) + 2 * slots) + FP32 * k * max(slots, b) + (1 + FP32) * slots
        loss_work += 3 * FP32
        # The teacher's moment (no_grad, before the student runs): its [CLS] targets, then iBOT's
        # Sinkhorn-Knopp over the slots, which holds four fp32 [slots, K] arrays at once (the logits'
        # fp32 copy, the masked copy, the scaled exponent, q) beside the bf16 logits; the [CLS]
        # centring before it holds three [2B, K].
        cls_moment = (logits + 3 * FP32) * k * 2 * b
        ibot_moment = FP32 * k * 2 * b + (logits + 4 * FP32) * k * slots if slots else 0
        teacher_work = max(cls_moment, ibot_moment)

    inputs += 8 * b  # the batch's labels (int64; -1 for image-text pairs)
    # autocast's cache holds a bf16 copy of every trained matrix and bias through the forward pass;
    # autograd saves those matrices of the blocks it does not recompute.
    unsaved_casts = ((inside if ckpt else 0) + biases) * BF16 if bf16 else 0
    activations += (outside + (0 if ckpt else inside)) * BF16 if bf16 else 0
    # Backward through a block holds gradients as wide as its MLP hidden layer, and under
    # checkpointing its recomputed activations and weight casts too.
    backward_work = 2 * block_batch * block_tokens * hidden * act
    if ckpt:
        layer_scale = m.layer_scale is not None
        backward_work += block_batch * block_tokens * block_bytes_per_token(dim, heads, hidden, act, layer_scale)
        block_weights = vit_matrix_params(m, 0)[1] + vit_bias_params(m, 0)[1]
        backward_work += (BF16 * block_weights // depth) if bf16 else 0
    return MemoryEstimate(
        batch=b,
        precision="bf16" if bf16 else "fp32",
        checkpointing=ckpt,
        params=FP32 * (trained + frozen) + params_extra,
        grads=FP32 * trained * (2 if workers > 1 else 1),
        optimizer=FP32 * OPTIMIZER_MOMENTS * trained,
        activations=activations,
        inputs=inputs,
        forward_work=unsaved_casts + loss_work,
        backward_work=backward_work,
        teacher_work=teacher_work,
    )


def largest_fitting_batch(cfg: TrainConfig, num_classes: int, budget_bytes: float, *, workers: int = 1,
                          bf16: bool = True) -> int:
    """The largest per-process batch whose estimate fits `budget_bytes` (0 if not even one image fits)."""
    def fits(b: int) -> bool:
        return estimate_memory(cfg, num_classes, workers=workers, bf16=bf16, batch=b).total <= budget_bytes

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
        if high > 1 << 24:
            return low
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
