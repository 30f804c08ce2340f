"""`model.register_depth`: registers that enter before block k. Depth 0 is timm's model unchanged;
at depth k the tokens exist from block k on, for the model, the probes and the test-time registers."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from planted_neuron import background_images, plant_register_neuron
from pydantic import ValidationError
from timm.models.vision_transformer import VisionTransformer

from trainers.config import DataConfig, ModelConfig, OptimConfig, ProbeConfig, TrainConfig
from trainers.data.base import Batch
from trainers.loop import Trainer
from trainers.model import build_model, prefix_tokens_at
from trainers.objectives.base import decay_groups
from trainers.probes import names, run_probes
from trainers.probes.capture import capture
from trainers.test_time import TestTimeRegisterConfig, find_register_neurons, test_time_register

CPU = torch.device("cpu")
REGS, DEPTH_K = 3, 2  # micro has 4 blocks: registers enter before block 2
PATCHES = 16  # 32 px images, 8 px patches


def micro(depth: int = DEPTH_K, registers: int = REGS, seed: int = 0, patch: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(size="micro", img_size=32, patch_size=patch, num_registers=registers, register_depth=depth)
    return build_model(cfg, num_classes=5).eval()


def images(count: int = 4) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_depth_zero_is_timms_register_model_exactly() -> None:
    """The default builds timm's own class with reg_tokens + no_embed_class: same weights, same outputs."""
    model = micro(depth=0)
    torch.manual_seed(0)
    timm_model = VisionTransformer(
        img_size=32, patch_size=8, num_classes=5, embed_dim=64, depth=4, num_heads=2, class_token=True,
        reg_tokens=REGS, no_embed_class=True, global_pool="token",
    ).eval()
    assert type(model) is VisionTransformer
    assert model.state_dict().keys() == timm_model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), timm_model.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(model(images()), timm_model(images()))
        assert torch.equal(model.forward_features(images()), timm_model.forward_features(images()))


def test_a_late_model_has_depth_zeros_parameters_and_timms_register_init() -> None:
    """Same keys and shapes (a state dict moves between depths; name-based rules such as no weight
    decay on reg_token apply alike), the same initial values for the same seed, reg_token drawn
    as timm draws it (normal, std 1e-6)."""
    early, late = micro(depth=0), micro(depth=DEPTH_K)
    assert late.state_dict().keys() == early.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(late.state_dict().values(), early.state_dict().values()))
    assert late.reg_token.shape == (1, REGS, 64) and 0 < float(late.reg_token.detach().std()) < 1e-5
    assert late.num_prefix_tokens == 1 + REGS and late.num_reg_tokens == REGS
    assert [prefix_tokens_at(late, i) for i in range(4)] == [1, 1, 1 + REGS, 1 + REGS]
    groups = decay_groups(late.named_parameters(), 0.05)
    assert any(p is late.reg_token for g in groups if g["weight_decay"] == 0 for p in g["params"])
    with torch.no_grad():
        assert not torch.equal(late(images()), early(images()))  # the registers did move


def test_registers_enter_just_before_block_k_after_cls_without_position() -> None:
    """A hand-written forward: [CLS] + position-embedded patches through blocks 0..k-1, the raw
    register tokens inserted after [CLS], the rest of the blocks, the final norm, [CLS] to the head."""
    model = micro()
    with torch.no_grad():
        model.reg_token.normal_()  # visible: timm's 1e-6 init would hide a misplaced token
        x = images()
        tokens = model.patch_embed(x) + model.pos_embed
        tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        for i, block in enumerate(model.blocks):
            if i == DEPTH_K:
                regs = model.reg_token.expand(len(x), -1, -1)
                tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
            tokens = block.forward(tokens)  # forward, not __call__: no hook
        expected = model.head(model.norm(tokens)[:, 0])
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        # The logits alone could not tell where the registers sit (see the permutation test): the tokens do.
        torch.testing.assert_close(model.forward_features(x), model.norm(tokens), rtol=1e-5, atol=1e-5)


def test_every_path_that_runs_the_blocks_gets_the_registers() -> None:
    """forward, forward_intermediates (NLC and NCHW), gradient checkpointing and a dynamo-compiled
    model give the same output and the same gradient for the late registers."""
    model = micro().train()
    with torch.no_grad():
        model.reg_token.normal_()
    x, target = images(), torch.tensor([0, 1, 2, 3])

    def loss_and_grad(forward) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward(x), target)
        loss.backward()
        return loss.detach(), model.reg_token.grad.clone()

    loss, grad = loss_and_grad(model)
    assert grad.abs().sum() > 0
    model.set_grad_checkpointing(True)
    checkpointed = loss_and_grad(model)
    model.set_grad_checkpointing(False)
    compiled = loss_and_grad(torch.compile(model, backend="aot_eager"))  # dynamo traces the block hook
    for other_loss, other_grad in (checkpointed, compiled):
        torch.testing.assert_close(other_loss, loss)
        torch.testing.assert_close(other_grad, grad)
    model.eval()
    with torch.no_grad():
        final, blocks = model.forward_intermediates(x, return_prefix_tokens=True, output_fmt="NLC")
        torch.testing.assert_close(final, model.forward_features(x))
        assert [(p.shape[1], c.shape[1]) for p, c in blocks] == [(PATCHES, 1), (PATCHES, 1), (PATCHES, 1 + REGS), (PATCHES, 1 + REGS)]
        grids = model.forward_intermediates(x, indices=[1, 3], output_fmt="NCHW", intermediates_only=True)
        for grid, (patches, _) in zip(grids, [blocks[1], blocks[3]]):
            torch.testing.assert_close(grid.flatten(2).transpose(1, 2), patches)


@pytest.mark.parametrize("depth", [0, DEPTH_K])
def test_the_sequence_position_of_a_register_changes_no_output(depth: int) -> None:
    """Registers carry no position embedding and attention (with the per-token MLP and norms) is
    permutation-equivariant, so where in the sequence a register sits changes nothing: shuffle all
    tokens after [CLS] (registers among the patches) where the registers enter, and the logits and
    the un-shuffled output tokens stay the same within float tolerance (docs/probes.md)."""
    model = micro(depth=depth)
    with torch.no_grad():
        model.reg_token.normal_()
        x = images()
        logits, features = model(x), model.forward_features(x)
        order = torch.randperm(REGS + PATCHES, generator=torch.Generator().manual_seed(5)) + 1
        full = torch.cat([torch.zeros(1, dtype=torch.long), order])  # [CLS] stays first: the head reads index 0

        def shuffle(_block, args):
            return (args[0][:, full], *args[1:])

        # After the late-register hook (hooks run in the order they were added): the registers are in.
        handle = model.blocks[depth].register_forward_pre_hook(shuffle)
        try:
            shuffled_logits, shuffled = model(x), model.forward_features(x)
        finally:
            handle.remove()
        assert not torch.equal(shuffled, features)  # the tokens did move
        torch.testing.assert_close(shuffled_logits, logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shuffled[:, torch.argsort(full)], features, rtol=1e-5, atol=1e-5)


def trainer_config(**model) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(size="micro", img_size=32, patch_size=8, num_registers=REGS, register_depth=DEPTH_K, **model),
        data=DataConfig(name="shapes", num_classes=4, train_size=256, val_size=64),
        optim=OptimConfig(lr=2e-3, batch_size=16, warmup_steps=2),
        probe=ProbeConfig(every=0, at_end=False),
        steps=6, log_every=2, eval_every=3, seed=3,
    )


def test_checkpoint_round_trip_gives_the_identical_next_loss(tmp_path) -> None:
    cfg = trainer_config()
    original = Trainer(cfg, CPU)
    assert original.model.register_depth == DEPTH_K
    batches = original.data.train_batches(0, cfg.optim.batch_size)
    for _ in range(3):
        original.train_step(next(batches))
    original.step = 3
    original.save(tmp_path)
    expected = original.train_step(next(batches))

    restored = Trainer(cfg, CPU)
    restored.load(tmp_path)
    assert torch.equal(restored.model.reg_token, original.model.reg_token) is False  # one more step moved it
    resumed_batch = next(restored.data.train_batches(restored.step, cfg.optim.batch_size))
    assert torch.equal(restored.train_step(resumed_batch), expected)


@pytest.mark.parametrize("objective", ["dino", "clip"])
def test_other_objectives_train_with_late_registers(objective: str) -> None:
    """DINO's encode and CLIP's image tower run the blocks themselves: the registers enter there too."""
    from trainers.config import ClipConfig, DinoConfig

    cfg = trainer_config().model_copy(update={
        "objective": objective,
        "dino": DinoConfig(head_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16, local_crops=2, local_crop_size=16,
                           knn_train_size=64, centering="momentum"),
        "clip": ClipConfig(embed_dim=16, text_width=32, text_layers=1, text_heads=2, context_length=20),
        "steps": 2, "eval_every": 0,
    })
    cfg = TrainConfig.model_validate(cfg.model_dump())
    trainer = Trainer(cfg, CPU)
    start = trainer.model.reg_token.detach().clone()
    seen: list[int] = []
    handle = trainer.model.blocks[DEPTH_K].register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1]))
    try:
        loss = trainer.train_step(next(trainer.data.train_batches(0, cfg.optim.batch_size)))
    finally:
        handle.remove()
    assert math.isfinite(float(loss))
    assert seen and all(n in (1 + REGS + PATCHES, 1 + REGS + 4) for n in seen)  # global crops, DINO's 16 px local crops
    assert not torch.equal(trainer.model.reg_token.detach(), start)  # the late registers learn


def test_configs_say_what_is_wrong_with_a_depth() -> None:
    with pytest.raises(ValidationError, match="register_depth 4 is no block of a 4-block model"):
        ModelConfig(size="micro", num_registers=4, register_depth=4)
    with pytest.raises(ValidationError, match="num_registers is 0"):
        ModelConfig(size="micro", register_depth=2)
    with pytest.raises(ValidationError):
        ModelConfig(size="micro", num_registers=4, register_depth=-1)


# ---------------------------------------------------------------- probes


PLANT_NORM = 150.0


def probe(model: torch.nn.Module, *, cutoff: float = 50.0):
    generator = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(8, 3, 32, 32, generator=generator), torch.arange(8) % 4)
    report = run_probes(model, batch, ProbeConfig(outlier_cutoff=cutoff), figures=False)
    return report.scalars, np.load(io.BytesIO(report.files[names.NORMS_FILE]))


def test_probe_captures_hold_the_registers_from_block_k_on() -> None:
    model = micro(patch=4)  # 64 patches
    cap = capture(model, images())
    assert [t.shape[1] for t in cap.block_tokens] == [1 + 64, 1 + 64, 1 + REGS + 64, 1 + REGS + 64]
    assert [cap.registers_at(i) for i in range(4)] == [0, 0, REGS, REGS]
    scalars, norms = probe(model)
    assert list(norms["registers_per_block"]) == [0, 0, REGS, REGS]
    for i in range(4):
        present = i >= DEPTH_K
        assert (names.norm_stat("mean", "reg", names.block(i)) in scalars) == present, i
        assert np.isnan(norms["stats_reg"][i]).all() != present
        assert (norms["hist_reg"][i].sum() > 0) == present
        assert norms["hist_patch"][i].sum() == 8 * 64  # every block counts the same patches
        assert norms["hist_cls"][i].sum() == 8
    assert names.norm_stat("mean", f"reg_{REGS - 1:02d}", names.OUTPUT) in scalars
    assert names.attn("entropy", f"reg_{REGS - 1:02d}") in scalars  # the last block's attention has every register


def test_a_planted_high_norm_register_is_measured_from_block_k_on() -> None:
    """reg_token planted at norm 150: it exists from block k on, so its norm is measured from there;
    before k the rows after [CLS] are patches, and none of them is high."""
    model = micro(patch=4)
    with torch.no_grad():
        direction = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(2)), dim=0)
        model.reg_token.copy_(direction.expand(1, REGS, 64) * PLANT_NORM)
    scalars, _ = probe(model)
    for i in range(4):
        assert scalars[names.outlier_frac(names.block(i))] == 0.0
        assert scalars[names.outlier_frac(names.block(i), "abs")] == 0.0
        median = scalars[names.norm_stat("median", "patch", names.block(i))]
        if i < DEPTH_K:
            assert names.norm_stat("mean", "reg", names.block(i)) not in scalars
            assert median < 10
        else:
            assert scalars[names.norm_stat("mean", "reg", names.block(i))] == pytest.approx(PLANT_NORM, rel=0.05)


def test_planted_patch_outliers_are_found_at_their_patches_before_and_after_block_k() -> None:
    """High-norm patches forced from block 1 on: each block's map flags the same patches, so every
    block slices its patches after its own prefix (a prefix of 1 + REGS before k would shift them)."""
    model = micro(patch=4)
    planted = [0, 7, 56, 63]
    direction = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(2)), dim=0)

    def plant(index: int):
        def hook(_module, _inputs, output):
            output = output.clone()
            output[:, [prefix_tokens_at(model, index) + p for p in planted]] = direction * PLANT_NORM
            return output

        return hook

    for i in range(1, 4):
        model.blocks[i].register_forward_hook(plant(i))
    scalars, norms = probe(model)
    expected = np.zeros(64)
    expected[planted] = 1.0
    for i in range(4):
        np.testing.assert_array_equal(norms["outlier_map_robust"][i].flatten(), expected * (i >= 1))
        assert scalars[names.outlier_frac(names.block(i))] == pytest.approx(len(planted) / 64 if i >= 1 else 0.0)


@pytest.mark.parametrize("depth", [1, 3])
def test_test_time_register_search_and_intervention_on_a_late_model(depth: int) -> None:
    """A register neuron planted in block 1 (before and at the registers' entry): the search finds
    it, the test-time register takes the artifacts, and the late registers stay where they belong."""
    torch.manual_seed(0)
    cfg = ModelConfig(size="micro", img_size=32, patch_size=4, num_registers=REGS, register_depth=depth)
    model = plant_register_neuron(build_model(cfg, num_classes=4).eval(), layer=1, unit=7)
    search_images, _ = background_images(16, 32, 4, chosen_per_image=3, seed=0)
    probe_images, chosen = background_images(8, 32, 4, chosen_per_image=3, seed=1)
    search = find_register_neurons(model, search_images, TestTimeRegisterConfig(max_layer=2, top_k=1))
    assert [(n.layer, n.unit) for n in search.neurons] == [(1, 7)]
    batch = Batch(probe_images, torch.arange(8) % 4)
    before = run_probes(model, batch, ProbeConfig(), figures=False).scalars
    assert before[names.outlier_frac(names.OUTPUT)] == pytest.approx(float(chosen.float().mean()))
    with test_time_register(model, search):
        moved = run_probes(model, batch, ProbeConfig(), figures=False).scalars
        assert [prefix_tokens_at(model, i) for i in range(4)] == [2 if i < depth else 2 + REGS for i in range(4)]
    assert moved[names.outlier_frac(names.OUTPUT)] == 0.0
    ttr = names.norm_stat("mean", f"reg_{REGS:02d}", names.OUTPUT)  # the test-time register is the last one
    assert moved[ttr] > 10 * moved[names.norm_stat("median", "patch", names.OUTPUT)]
    assert model.num_prefix_tokens == 1 + REGS  # restored on exit


def test_inspect_loads_a_late_register_trial_by_run_id_and_adds_a_test_time_register(tmp_path) -> None:
    """`python -m orchestrator.inspect run:RUN_ID` builds the model from the checkpoint's config,
    late registers included, and the test-time register works on it (neuron in block 1, registers from 2)."""
    import json
    from pathlib import Path

    from mlflow.tracking import MlflowClient
    from planted_neuron import planted_trial_checkpoint

    from orchestrator.inspect.__main__ import main

    cfg = TrainConfig(
        model=ModelConfig(size="micro", patch_size=4, img_size=32, num_registers=REGS, register_depth=DEPTH_K),
        data=DataConfig(name="shapes", val_size=64), probe=ProbeConfig(batch_size=32), steps=10, eval_every=0,
    )
    checkpoint = planted_trial_checkpoint(tmp_path / "checkpoint_000000", cfg)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("sweep"), tags={
        "sweep.role": "trial", "checkpoint_uri": str(checkpoint.parent), "mlflow.runName": "micro-r3@2",
    })
    client.set_terminated(run.info.run_id, "FINISHED")
    code = main([f"run:{run.info.run_id}", "--test-time-registers", "--tracking-uri", uri, "--out", str(tmp_path / "out")])
    assert code == 0
    inspected = client.search_runs([client.get_experiment_by_name("inspect").experiment_id])
    inspected = [r for r in inspected if r.data.tags.get("sweep.role") == "inspection"]
    runs = {r.data.tags["inspect.variant"]: r.data for r in inspected}
    trained, moved = runs["as trained"], runs["test-time register"]
    assert trained.params["register_depth"] == str(DEPTH_K) and trained.tags["num_registers"] == str(REGS)
    assert trained.metrics[names.outlier_frac(names.OUTPUT)] == pytest.approx(1 / 8)  # every eighth patch planted
    assert moved.metrics[names.outlier_frac(names.OUTPUT)] == 0.0
    ttr = names.norm_stat("mean", f"reg_{REGS:02d}", names.OUTPUT)
    assert moved.metrics[ttr] > 10 * moved.metrics[names.norm_stat("median", "patch", names.OUTPUT)]
    assert names.norm_stat("mean", "reg", names.block(DEPTH_K - 1)) not in trained.metrics
    assert names.norm_stat("mean", "reg", names.block(DEPTH_K)) in trained.metrics
    summary = json.loads(Path(tmp_path / "out" / "summary.json").read_text())
    assert [s["variant"] for s in summary] == ["as trained", "test-time register"]
    assert f"{REGS} from block {DEPTH_K}" in (tmp_path / "out" / "report.md").read_text()


def _ddp_rank(rank: int, world_size: int, port: int, cfg_json: str, out: str) -> None:
    """One data-parallel rank (gloo): three steps on the global batches, then its parameters to `out`."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        cfg = TrainConfig.model_validate_json(cfg_json)
        trainer = Trainer(cfg, CPU, rank=rank, world_size=world_size)
        batches = trainer.data.train_batches(0, cfg.optim.batch_size)
        for _ in range(3):
            trainer.train_step(next(batches))
        torch.save(trainer.model.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch and timm: ~30 s on 2 cores, no Ray
def test_two_ddp_ranks_train_late_registers_as_one_process_does(tmp_path) -> None:
    """Under DDP (the multi-worker trials' path, without Ray here) the late registers get their
    gradient averaged like every parameter: both ranks end where one process on the whole batch ends."""
    import socket

    import torch.multiprocessing as mp

    cfg = trainer_config()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, cfg.model_dump_json(), str(tmp_path)), nprocs=2, join=True)
    single = Trainer(cfg, CPU)
    batches = single.data.train_batches(0, cfg.optim.batch_size)
    for _ in range(3):
        single.train_step(next(batches))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    start = Trainer(cfg, CPU).model.state_dict()  # the same seed: the ranks' and the process's first weights
    assert not torch.equal(ranks[0]["reg_token"], start["reg_token"])  # the late registers trained
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)
        # Float sums in another order move Adam's steps a little where a gradient is near zero:
        # each parameter ends within 1% of how far it moved.
        moved = float((value - start[key]).abs().max())
        torch.testing.assert_close(ranks[0][key], value, rtol=0, atol=0.01 * moved + 1e-7, msg=key)
