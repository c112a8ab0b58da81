"""Each Causal rCM mode through the training loop on toy video, and under Ulysses context parallelism.

    .venv/bin/python -m pytest tests/test_causal_loop.py -q

`run_training` (what every Ray Train worker runs, workflows/distill.py) trains tf, df, tf_dcm, tf_scm and sf_dmd
for a few iterations on moving Fashion-MNIST latents (4 frames of 8×8 pixels, 2×2 DCT patches → [4, 4, 4, 4],
chunks of one latent frame), and the EMA student then streams a video chunk by chunk. Under cp = 2 (two gloo
processes forming one Ulysses group) tf_scm (teacher-forcing packing + JVP through the all-to-all) and sf_dmd (the
KV cache of the rollout, kept per rank for its heads) give the parameters of one process: float64, tolerance as
tests/test_parallel_loop.py (observed ~1e-15).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_parallel import full, spawn

from rcm_core.config import CAUSAL_MODES, from_dict
from rcm_core.data.codec import PatchDCT
from rcm_core.data.latents import LatentBatch
from rcm_core.data.moving_fashion import generate
from rcm_core.eval.evaluate import EvalBank, student_samples, teacher_samples
from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.streaming import DEFAULT_MID_T, stream_sample
from rcm_core.networks import build_network
from rcm_core.parallel.sharding import causal_cp_sizes
from rcm_core.run.loop import run_training

MODEL = {"kind": "dit", "in_channels": 4, "patch_size": [1, 2, 2], "dim": 32, "ffn_dim": 64, "num_heads": 2,
         "num_layers": 2, "freq_dim": 32, "text_dim": 16, "num_classes": 10, "label_tokens": 2, "dtype": "float64",
         "causal": True, "first_chunk_t": 1, "chunk_t": 1}
LATENT = (4, 4, 4, 4)                # C = 2² DCT coefficients, T = 4 frames, 8×8 pixels → 4×4; 4 tokens per frame


def toy_video(n: int = 16) -> LatentBatch:
    videos = generate(n, frames=4, size=8, item=4, seed=3)
    latents = torch.from_numpy(PatchDCT(2).encode(videos.videos)).double()
    return LatentBatch(latent=latents, label=torch.from_numpy(videos.labels))


def teacher(seed: int = 1) -> TrigFlowDenoiser:
    torch.manual_seed(seed)
    net = build_network(from_dict({"model": MODEL, "distill": {"mode": "tf"}}).model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return TrigFlowDenoiser(net)


def _cfg(mode: str, run_dir: Path, cp: int = 1, dp_shard: int = 1, world: int | None = None):
    parallel = {"cp": cp, "dp_replicate": 1, "dp_shard": dp_shard} if cp * dp_shard > 1 else {}
    return from_dict({"model": MODEL, "teacher": {"guidance": 2.0}, "parallel": parallel,
                      "distill": {"mode": mode, "tangent_warmup": 1, "student_update_freq": 2, "max_rollout_steps": 2,
                                  "sf_steps_per_chunk": [2, 1], "dcm_total_steps": 8, "p_G_frame_shift": False},
                      "sampler": {"mid_t": DEFAULT_MID_T, "teacher_steps": 4, "step_counts": [1, 2]},
                      "optim": {"lr": 1e-3, "fake_lr": 1e-3, "lr_warmup": 0},
                      "train": {"steps": 3, "checkpoint_every": 100, "log_every": 1, "run_dir": str(run_dir),
                                "device": "cpu"},
                      "resources": {"num_workers": world or cp * dp_shard}})


def _batches(start: int):
    data = toy_video()
    return (LatentBatch(latent=data.latent[2 * (i % 8):2 * (i % 8) + 2], label=data.label[2 * (i % 8):2 * (i % 8) + 2])
            for i in range(start, 10 ** 6))


@pytest.mark.parametrize("mode", CAUSAL_MODES)
def test_each_causal_mode_trains_on_toy_video_and_streams(mode, tmp_path):
    losses: list[float] = []
    state = run_training(_cfg(mode, tmp_path), _batches, lambda s, m, c: losses.append(m["train/loss"]),
                         teacher=teacher(), latent_shape=LATENT)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert state.student.net.causal and state.ema.module.net.causal
    assert state.teacher.net.causal == (mode in ("tf_dcm", "tf_scm"))
    assert state.fake is None or not state.fake.net.causal
    moved = max((p - q).abs().max().item() for p, q in zip(state.student.parameters(), teacher().parameters()))
    assert moved > 1e-4
    video = stream_sample(state.ema.module, torch.randn(2, *LATENT, dtype=torch.float64), torch.tensor([1, 7]),
                          steps_per_chunk=[2, 1], mid_t_per_chunk=[DEFAULT_MID_T], sigma_max=80.0)
    assert video.shape == (2, *LATENT) and torch.isfinite(video).all()
    # the evaluator streams causal networks (the teacher too, when it is causal)
    cfg, bank = _cfg(mode, tmp_path), EvalBank.make(LATENT, torch.tensor([1, 7]), seed=5)
    ref, floor, _ = teacher_samples(state.teacher, bank, cfg, torch.device("cpu"))
    students = student_samples(state.ema.module, bank, cfg, torch.device("cpu"))
    assert sorted(students) == ["nfe_1", "nfe_2"]
    assert all(torch.isfinite(x).all() and x.shape == (2, *LATENT) for x in (ref, floor, *(v for v, _ in students.values())))


def _train(directory: str, mode: str, cp: int, dp_shard: int = 1, world: int | None = None) -> None:
    name = f"{mode}-cp{cp}-shard{dp_shard}-world{world}"
    cfg = _cfg(mode, Path(directory) / name, cp, dp_shard, world)
    state = run_training(cfg, _batches, lambda s, m, c: None, teacher=teacher(), latent_shape=LATENT)
    params = {n: full(p).detach().clone() for n, p in state.student.named_parameters()}   # collective when sharded
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(params, Path(directory) / f"{name}.pt")


def _same(directory: Path, a: str, b: str) -> None:
    x, y = (torch.load(directory / f"{n}.pt", weights_only=True) for n in (a, b))
    for k, v in y.items():
        torch.testing.assert_close(x[k], v, atol=1e-9, rtol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("mode", ["tf_scm", "sf_dmd"])
def test_context_parallel_equals_one_process(mode, tmp_path):
    spawn(_train, 2, str(tmp_path), mode, 2)
    _train(str(tmp_path), mode, 1)
    _same(tmp_path, f"{mode}-cp2-shard1-worldNone", f"{mode}-cp1-shard1-worldNone")


def test_fsdp2_equals_replicated_for_self_forcing(tmp_path):
    """sf_dmd under FSDP2 (dp_shard = 2: the rollout's cached forwards and the replay through sharded blocks)
    gives the parameters of plain data parallelism on the same 2 ranks, as tests/test_parallel_loop.py checks rCM."""
    spawn(_train, 2, str(tmp_path), "sf_dmd", 1, 2)
    spawn(_train, 2, str(tmp_path), "sf_dmd", 1, 1, 2)
    _same(tmp_path, "sf_dmd-cp1-shard2-worldNone", "sf_dmd-cp1-shard1-world2")


def test_illegal_cp_is_refused_in_one_line():
    """cp must divide the heads, the tokens of one chunk and, for packed teacher forcing, its 2T frames."""
    cfg = _cfg("tf_scm", Path("unused"))
    assert causal_cp_sizes(cfg, (4, 3, 4, 4)) == [1, 2]            # 2·3 = 6 packed frames, 4 tokens per chunk
    cfg = from_dict({"model": {**MODEL, "num_heads": 4, "dim": 32}, "distill": {"mode": "df"}})
    assert causal_cp_sizes(cfg, (4, 3, 4, 4)) == [1]               # df: 3 frames
    from rcm_core.parallel.sharding import check_causal_cp
    with pytest.raises(ValueError, match="legal cp: \\[1\\]") as e:
        check_causal_cp(cfg, (4, 3, 4, 4), 2)
    assert "\n" not in str(e.value)


def test_recipe_tf_then_tf_dcm_then_sf_dmd_through_checkpoint_files(tmp_path):
    """The official recipe as three runs: tf fine-tunes the bidirectional teacher into a causal one; tf_dcm distils
    it (teacher.checkpoint = the tf run's EMA); sf_dmd starts its student from the tf_dcm EMA
    (distill.student_checkpoint) with the bidirectional teacher and fake score."""
    from rcm_core.run.teacher import load_teacher, save_teacher

    tf = run_training(_cfg("tf", tmp_path / "tf"), _batches, lambda *a: None, teacher=teacher(), latent_shape=LATENT)
    save_teacher(tf.ema.module, _cfg("tf", tmp_path), tmp_path / "causal_teacher.pt")
    cfg = _cfg("tf_dcm", tmp_path / "dcm")
    causal_teacher = load_teacher(tmp_path / "causal_teacher.pt", cfg, torch.device("cpu"))
    dcm = run_training(cfg, _batches, lambda *a: None, teacher=causal_teacher, latent_shape=LATENT)
    assert dcm.teacher.net.causal and all(torch.equal(p, q) for p, q in zip(dcm.teacher.parameters(),
                                                                             tf.ema.module.parameters()))
    save_teacher(dcm.ema.module, cfg, tmp_path / "dcm_student.pt")
    sf_cfg = from_dict({
        "model": MODEL, "distill": {"mode": "sf_dmd", "student_checkpoint": str(tmp_path / "dcm_student.pt")},
        "train": {"steps": 0, "run_dir": str(tmp_path / "sf"), "device": "cpu"}})
    sf = run_training(sf_cfg, _batches, lambda *a: None, teacher=teacher(), latent_shape=LATENT)
    assert sf.student.net.causal and not sf.teacher.net.causal and not sf.fake.net.causal
    assert all(torch.equal(p, q) for p, q in zip(sf.student.parameters(), dcm.ema.module.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(sf.fake.parameters(), teacher().parameters()))


def test_planner_refuses_causal_cp_and_counts_the_packed_sequence():
    """workflows/plan.py's arithmetic: a cp that cannot split the block-causal run is refused with the legal sizes,
    and teacher forcing's activations are those of the packed [clean | noisy] sequence (2× the tokens)."""
    from rcm_core.config import load_config
    from rcm_core.run.plan import plan_run

    wan = ["model.dim=1536", "model.ffn_dim=8960", "model.num_heads=12", "model.num_layers=30", "model.text_dim=4096",
           "model.causal=true"]
    latent = (16, 21, 60, 104)
    plans = {mode: {(p.shape.cp, p.checkpointing): p for p in plan_run(
        load_config(None, [*wan, f"distill.mode={mode}"]), gpus=4, gpu_memory=80 * 2**30, latent=latent,
        text_len=512)} for mode in ("tf_scm", "sf_dmd", "tf", "df")}
    assert "legal cp: [1, 2, 3, 6]" in plans["tf_scm"][(4, False)].refused
    assert plans["sf_dmd"][(4, False)].refused is None and "legal cp: [1, 3]" in plans["df"][(2, False)].refused
    # The same losses but tf's packed sequence, compared at one micro-batch size (plan_run picks the largest that
    # fits, which differs between the two: the packed sequence fits fewer samples per pass).
    from rcm_core.run.plan import MeshShape, Workload, count_params, plan_mesh
    tf, df = (plan_mesh(cfg, MeshShape(4, 1, 1), gpus=4, gpu_memory=80 * 2**30, checkpointing=True, table=None,
                        work=Workload.from_config(cfg, latent, 512), counts=count_params(cfg.model), micro=1)
              for cfg in (load_config(None, [*wan, f"distill.mode={mode}"]) for mode in ("tf", "df")))
    assert tf.micro == df.micro == 1
    assert 1.9 < tf.backward_peak / df.backward_peak <= 2.0


@pytest.mark.parametrize("mode", ["tf_scm", "sf_dmd"])
def test_last_step_context_trains_and_evaluates(mode, tmp_path):
    """distill.chunk_context=last_step (official context_from_last_step, from chunk 1 as its 2-step preset): the
    teacher-forcing context is noised to the cached time, the rollout caches last steps, evaluation streams so."""
    from rcm_core.config import load_config
    cfg = load_config(None, ["distill.chunk_context=last_step", "distill.last_step_from_chunk=1"],
                      base=_as_dict(_cfg(mode, tmp_path)))
    losses: list[float] = []
    state = run_training(cfg, _batches, lambda s, m, c: losses.append(m["train/loss"]), teacher=teacher(),
                         latent_shape=LATENT)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    bank = EvalBank.make(LATENT, torch.tensor([1, 7]), seed=5)
    students = student_samples(state.ema.module, bank, cfg, torch.device("cpu"))
    assert all(torch.isfinite(x).all() for x, _ in students.values())


def _as_dict(cfg):
    from rcm_core.config import to_dict
    return to_dict(cfg)
