"""The run planner (rcm_core/run/plan.py, workflows/plan.py): its arithmetic against real modules, on the CPU.

- parameter counts from the meta device equal the real modules' and Wan2.1's published sizes;
- 16 bytes per trained parameter is what an fp32 AdamW student really holds after a step;
- the per-token activation bytes of a block equal what autograd saves for the real block;
- illegal meshes are refused with the reason, and the configured mesh is checked before a run.

    pytest tests/test_plan.py
"""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rcm_core.config import ModelCfg, load_config
from rcm_core.parallel.mesh import MeshShape
from rcm_core.networks import build_network, cast_network
from rcm_core.run.plan import (BACKWARD_BLOCKS, SHARDED_BACKWARD_BLOCKS, GiB, Workload, activation_estimate,
                           block_saved_bytes, check_fits, count_params, plan_mesh, plan_run, read_step_table,
                           read_step_tables, recommend, refuse_reason, state_bytes)

ROOT = Path(__file__).resolve().parents[1]
STEP_TABLES = ROOT / "docs" / "results" / "gpu" / "step_tables"
STEP_TABLE = STEP_TABLES / "step_table_sdpa_grad.json"     # what the Wan configs ship
SMALL = dict(dim=64, ffn_dim=160, num_heads=4, num_layers=3, text_dim=32)


@pytest.mark.parametrize("extra", [{}, {"num_classes": 5, "label_tokens": 2}, {"patch_size": [1, 1, 1]}])
def test_meta_counts_equal_the_real_modules(extra):
    cfg = ModelCfg(**SMALL, **extra)
    counts = count_params(cfg)
    net = build_network(cfg)
    assert counts.total == sum(p.numel() for p in net.parameters())
    assert counts.block == sum(p.numel() for p in net.blocks[0].parameters()) and counts.layers == 3


@pytest.mark.parametrize("name,params", [("wan21_t2v_1p3b_rcm", 1_418_996_800), ("wan21_t2v_14b_rcm", 14_288_491_584)])
def test_wan_sizes_are_the_published_ones(name, params):
    """diffusers' WanTransformer3DModel sizes, counted on the meta device (no memory)."""
    assert count_params(load_config(ROOT / "experiments" / f"{name}.yaml").model).total == params


def test_sixteen_bytes_per_trained_parameter_and_sharding():
    """An fp32 student with AdamW after one step holds weights, gradients and two moments: the plan's 16 B/param;
    the fake score at rest (its gradients freed, `distill._free_gradients`) the same less the gradients."""
    cfg = ModelCfg(**SMALL)
    net = build_network(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.0, 0.999))
    net(torch.randn(2, 16, 2, 4, 4), torch.rand(2), torch.randn(2, 3, 32)).square().mean().backward()
    opt.step()
    held = sum(p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size() for p in net.parameters())
    held += sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    states = state_bytes(count_params(cfg), shard=1, uses_fake=True)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in net.parameters())
    assert states["student"] == held and states["fake"] == held - grads == 0.75 * held
    assert states["ema"] == held / 4 and states["teacher"] == held / 8 and states["fsdp"] == 0
    sharded = state_bytes(count_params(cfg), shard=4, uses_fake=False)
    assert sharded["student"] == held / 4 and sharded["fake"] == 0 and sharded["fsdp"] > 0


def test_twelve_bytes_per_trained_parameter_without_a_first_moment():
    """rCM's AdamW (β₁ = 0, `rcm_core.method.adamw`) after one step holds weights, gradients and the second moment
    only: 12 B/param, the plan's count for β₁ = 0 (8 at rest, without gradients)."""
    from rcm_core.method.adamw import AdamW
    cfg = ModelCfg(**SMALL)
    net = build_network(cfg)
    opt = AdamW(net.parameters(), lr=1e-3, betas=(0.0, 0.999))
    net(torch.randn(2, 16, 2, 4, 4), torch.rand(2), torch.randn(2, 3, 32)).square().mean().backward()
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    held = 2 * weights + sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
                             if k != "step")
    states = state_bytes(count_params(cfg), shard=1, uses_fake=True, first_moment=False)
    assert states["student"] == held == 3 * weights and states["fake"] == 2 * weights


@pytest.mark.parametrize("dim,ffn,heads", [(64, 160, 4), (80, 256, 5)])
def test_block_activation_bytes_match_autograd(dim, ffn, heads):
    """Bytes autograd saves per token in one bf16 block (flash-style attention keeps q, k, v, o, lse): the formula."""
    cfg = ModelCfg(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=1, text_dim=32)
    net = cast_network(build_network(cfg), torch.bfloat16)
    block = net.blocks[0]
    for attn in (block.attn1, block.attn2):
        attn.attention_fn = lambda q, k, v, **_: F.scaled_dot_product_attention(q, k, v)
    B, grid, L = 2, (2, 4, 6), 8              # N = 48, B·N = 96: no other dimension of the block has these sizes
    N = grid[0] * grid[1] * grid[2]
    x = torch.randn(B, N, dim, dtype=torch.bfloat16, requires_grad=True)
    e0 = torch.randn(B, 6, dim, requires_grad=True)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights and t.dim() and t.shape[0] in (B, B * N) and (N in t.shape or B * N in t.shape):
            saved[s.data_ptr()] = s.nbytes()          # per-token tensors; one storage counted once
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, torch.randn(B, L, dim, dtype=torch.bfloat16), e0, net.rope(grid, torch.device("cpu")), None)
    assert sum(saved.values()) == block_saved_bytes(dim, ffn, heads) * B * N


def test_checkpointing_keeps_block_inputs_only():
    m = ModelCfg(**SMALL)
    _, off = activation_estimate(m, batch=2, tokens=100, text_len=8, checkpointing=False, graphs=2, jvp=True)
    jvp, on = activation_estimate(m, batch=2, tokens=100, text_len=8, checkpointing=True, graphs=2, jvp=True)
    per_block = block_saved_bytes(64, 160, 4) * 200
    assert off == pytest.approx((2 * 3 + BACKWARD_BLOCKS["false"]) * per_block, rel=1e-12) and jvp > 0
    assert on == pytest.approx(2 * 3 * 2 * 64 * 200 + BACKWARD_BLOCKS["true"] * per_block, rel=1e-12)
    _, sharded = activation_estimate(m, batch=2, tokens=100, text_len=8, checkpointing=True, graphs=2, jvp=True,
                                     sharded=True)
    assert sharded == pytest.approx(2 * 3 * 2 * 64 * 200 + SHARDED_BACKWARD_BLOCKS["true"] * per_block, rel=1e-12)
    assert activation_estimate(m, batch=2, tokens=100, text_len=8, checkpointing=True, graphs=1, jvp=False)[0] == 0


def test_illegal_meshes_are_refused_with_the_reason():
    assert "does not divide the 12 attention heads" in refuse_reason(MeshShape(1, 1, 8), gpus=8, heads=12,
                                                                     tokens=32760, batch=8)
    assert "not the 8 GPUs" in refuse_reason(MeshShape(1, 2, 2), gpus=8, heads=12, tokens=32760, batch=8)
    assert "latent tokens" in refuse_reason(MeshShape(1, 2, 4), gpus=8, heads=12, tokens=31202, batch=8)
    assert "data-parallel groups" in refuse_reason(MeshShape(8, 1, 1), gpus=8, heads=12, tokens=32760, batch=4)
    assert refuse_reason(MeshShape(2, 2, 2), gpus=8, heads=12, tokens=32760, batch=8) is None


def test_plan_of_the_wan_configs_on_eight_80gb_gpus():
    """1.3B at one sample per GPU fits with FSDP over 8 and checkpointing; the 14B states alone need shard 8,
    and cp 8 is refused for 1.3B (12 heads). Only fitting meshes are recommended, each with the largest
    micro-batch that fits."""
    small = load_config(ROOT / "experiments" / "wan21_t2v_1p3b_rcm.yaml", ["data.batch_size=8"])
    plans = plan_run(small, gpus=8, gpu_memory=80 * GiB, latent=(16, 21, 60, 104), text_len=512,
                     tables=read_step_tables(STEP_TABLES))
    assert len(plans) == 2 * 10 and all(p.refused for p in plans if p.shape.cp == 8)
    best = recommend(plans)
    assert best.fits and best.checkpointing and best.seconds > 0
    # 14B on one 8 × 80 GB node: only shards over all 8 GPUs with CP and one latent per pass come in under 80 GB
    # (65.8 GiB at cp 2 with no first moments (β₁ = 0) and the fake score's gradients freed while the student
    # trains; 79.9 GiB at cp 4 before both: gradient accumulation is what makes it fit at all; its config asks for
    # 32 GPUs)
    big = load_config(ROOT / "experiments" / "wan21_t2v_14b_rcm.yaml", ["data.batch_size=8"])
    best = recommend(plan_run(big, gpus=8, gpu_memory=80 * GiB, latent=(16, 21, 60, 104), text_len=512))
    assert best.shape.dp_shard * best.shape.cp == 8 and best.shape.cp >= 2 and best.micro == 1
    assert 0.8 * 80 * GiB < best.total <= 0.85 * 80 * GiB


def test_check_fits_names_the_mesh_and_a_fix():
    cfg = load_config(ROOT / "experiments" / "wan21_t2v_1p3b_rcm.yaml",
                      ["data.batch_size=8", "parallel.dp_replicate=1", "parallel.dp_shard=8",
                       "model.activation_checkpointing=false"])
    assert check_fits(cfg, gpus=8, gpu_memory=80 * GiB, latent=(16, 21, 60, 104), text_len=512) is not None
    cfg.model.activation_checkpointing = True
    assert check_fits(cfg, gpus=8, gpu_memory=80 * GiB, latent=(16, 21, 60, 104), text_len=512) is None
    msg = check_fits(cfg, gpus=8, gpu_memory=16 * GiB, latent=(16, 21, 60, 104), text_len=512)
    assert "will not fit" in msg and "16.0 GiB" in msg


def test_step_table_is_read_from_its_data_file(tmp_path):
    """The planner's ms/FLOP come from docs/results/gpu/step_tables/, the format rcm_step.py writes; a file
    the bench wrote (two rows, any order) is read the same way, and a malformed one is refused by name."""
    table = read_step_table(STEP_TABLE)
    assert table.tokens == (8190, 32760) and len(table.student_ms) == 2 and all(v > 0 for v in table.critic_ms)
    assert table.model.dim == 1536 and table.text_len == 512 and "H200" in table.card
    bench = json.loads(STEP_TABLE.read_text())
    bench["rows"] = [{"tokens": 32760, "student_ms": 10.0, "critic_ms": 5.0},
                     {"tokens": 8190, "student_ms": 2.0, "critic_ms": 1.0}]
    (tmp_path / "t.json").write_text(json.dumps(bench))
    assert read_step_table(tmp_path / "t.json").student_ms == (2.0, 10.0)
    assert read_step_table(tmp_path / "none.json") is None
    del bench["rows"][0]["critic_ms"]
    (tmp_path / "t.json").write_text(json.dumps(bench))
    with pytest.raises(ValueError, match="t.json.*critic_ms"):
        read_step_table(tmp_path / "t.json")


def test_cli_prints_the_table_and_the_recommendation(capsys):
    from workflows.plan import main, parse_memory

    assert parse_memory("80GiB") == 80 * GiB and parse_memory("141GB") == 141e9
    main(["--config", str(ROOT / "experiments" / "wan21_t2v_1p3b_rcm.yaml"), "--gpus", "8", "--gpu-memory", "80GiB",
          "data.batch_size=8"])
    out = capsys.readouterr().out
    assert "recommended: parallel.dp_replicate=" in out and "(1, 1, 8): cp=8 does not divide" in out
    # a table measured as the Wan configs run times their checkpointed rows, so no note there; another attention
    # gets one naming both
    table = read_step_table(STEP_TABLE)
    assert table.attention == "sdpa_grad" and "measured with model.attention" not in out
    assert f"  AC on: {STEP_TABLE.relative_to(ROOT)} (NVIDIA H200, 2026-12-05)\n" in out
    main(["--config", str(ROOT / "experiments" / "wan21_t2v_1p3b_rcm.yaml"), "--gpus", "8", "--gpu-memory", "80GiB",
          "data.batch_size=8", "model.attention=fused"])
    assert "measured with model.attention=sdpa_grad, this row uses fused" in capsys.readouterr().out


def test_each_row_is_timed_by_the_step_table_measured_most_like_it(capsys, tmp_path):
    """The shipped folder holds the variant the Wan configs run (SDPA with grad, whole blocks, no compile), the
    levers adopted in docs/BENCHMARKS.md (+ compiled blocks + attention_only) and, compiled, no checkpointing and
    mm_only. A row takes the table with its own levers; failing that the fewest differences, compile first (it
    moves the time most). At one latent of 32,760 tokens on one GPU the plan's s/iteration is then the measured 1:4
    mean of that table: 6.67 s as shipped, 4.61 s with the levers, 4.36 s compiled without checkpointing (one H200,
    2026-12-05)."""
    from rcm_core.run.plan import choose_step_table
    from workflows.plan import main

    tables = read_step_tables(STEP_TABLES)
    names = {Path(t.source).name: t for t in tables}
    assert set(names) == {"step_table_sdpa_grad.json", "step_table_sdpa_grad_compile_attention_only.json",
                          "step_table_sdpa_grad_compile_off.json", "step_table_sdpa_grad_compile_mm_only.json"}
    shipped, levers = names["step_table_sdpa_grad.json"], names["step_table_sdpa_grad_compile_attention_only.json"]
    compiled_off = names["step_table_sdpa_grad_compile_off.json"]
    model = ModelCfg(kind="dit", attention="sdpa_grad", compile="none")
    assert choose_step_table(tables, model, True) is shipped
    assert choose_step_table(tables, model, "attention_only") is shipped        # one difference each: compile wins
    assert choose_step_table(tables, model, False) is shipped                   # no uncompiled off table
    assert choose_step_table(tables, ModelCfg(kind="dit", attention="sdpa_grad", compile="blocks"),
                             False) is compiled_off
    assert choose_step_table(tables, ModelCfg(kind="dit", attention="sdpa_grad", compile="blocks"),
                             "mm_only") is names["step_table_sdpa_grad_compile_mm_only.json"]
    assert choose_step_table(tables, ModelCfg(kind="dit", attention="sdpa_grad", compile="blocks"),
                             "attention_only") is levers
    assert choose_step_table(tables, ModelCfg(kind="dit", attention="fused", compile="blocks"), True) is levers
    assert choose_step_table((), model, True) is None

    base = ["--config", str(ROOT / "experiments" / "wan21_t2v_1p3b_rcm.yaml"), "--gpus", "1", "--gpu-memory", "141GiB",
            "--latent", "16,21,60,104", "data.batch_size=1"]
    main(base)
    out = capsys.readouterr().out
    assert "~6.67 s/iteration" in out and "model.activation_checkpointing=true" in out.split("recommended:")[1]
    assert "to time a variant as it runs" not in out     # only the off row differs, as every shipped table does
    main([*base, "model.compile=blocks", "model.activation_checkpointing=attention_only"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("1      1   1")]
    assert [r[3] for r in rows] == ["off", "on", "attention_only"] and [r[-1] for r in rows] == ["4.36", "4.61", "4.61"]
    # the on row is timed by attention_only's table (the nearest); compiled, no checkpointing fits 141 GB at 32,760
    # tokens (`compiled_block_saved_bytes`; measured 124.2 GiB) and is the fastest there; on 80 GB it does not fit
    assert "model.activation_checkpointing=false data.micro_batch_size=1  (125.4 of 141.0 GiB, ~4.36" in out
    assert ("AC off: docs/results/gpu/step_tables/step_table_sdpa_grad_compile_off.json (NVIDIA H200, "
            "2026-12-05)\n") in out
    main([*base[:5], "80GiB", *base[6:], "model.compile=blocks", "model.activation_checkpointing=attention_only"])
    out = capsys.readouterr().out
    assert "model.activation_checkpointing=attention_only data.micro_batch_size=1  (53.5 of 80.0 GiB, ~4.61" in out
    assert ("AC on: docs/results/gpu/step_tables/step_table_sdpa_grad_compile_attention_only.json (NVIDIA H200, "
            "2026-12-05); measured with model.activation_checkpointing=attention_only, this row uses true") in out
    # --step-table takes one file (every row timed by it) or a folder; a path with none is refused by name
    main([*base, "model.compile=blocks", "--step-table", str(STEP_TABLE)])
    out = capsys.readouterr().out
    assert "~6.67 s/iteration" in out and "measured with model.compile=none, this row uses blocks" in out
    assert "to time a variant as it runs: experiments/bench/rcm_step.py --variants" in out
    with pytest.raises(SystemExit, match="--step-table .*empty.*no step table there"):
        (tmp_path / "empty").mkdir()
        main([*base, "--step-table", str(tmp_path / "empty")])


def test_cli_prints_the_configured_modes_memory(capsys):
    """The configured line gives the run's own mode's memory, so a selective mode (issue 28, lever 3) shows what it
    costs: attention_only keeps 9,312 B per token and block on top of whole-block checkpointing's 3,072 (one H200,
    batch 1, one with-grad graph at a time, the fake score's gradients freed while the student trains, no first
    moments: 47.8 → 53.5 GiB). One GPU with β₁ = 0: the optimiser step takes the bf16 gradients in one pass, so
    it holds nothing the backward did not. With β₁ = 0.9 (no one pass) the states less the stepping network's
    fp32 gradient copies sit beside the activations, and all of them in the optimiser step (`plan.peak_bytes`)."""
    from workflows.plan import main

    base = ["--config", str(ROOT / "experiments" / "wan21_t2v_1p3b_rcm.yaml"), "--gpus", "1", "--gpu-memory", "141GiB",
            "data.batch_size=1"]
    lines = {}
    for mode, extra in (("true", []), ("attention_only", []), ("true", ["optim.betas=[0.9,0.999]"])):
        main([*base, f"model.activation_checkpointing={mode}", *extra])
        lines[(mode, *extra)] = capsys.readouterr().out.strip().splitlines()[-1]
    assert lines[("true",)] == ("configured mesh (parallel.*, model.activation_checkpointing=true): fits, "
                                "~47.8 GiB per GPU (states 37.0, activations 8.8)")
    assert lines[("attention_only",)] == ("configured mesh (parallel.*, model.activation_checkpointing="
                                          "attention_only): fits, ~53.5 GiB per GPU (states 37.0, activations 14.5)")
    assert lines[("true", "optim.betas=[0.9,0.999]")] == (
        "configured mesh (parallel.*, model.activation_checkpointing=true): fits, ~58.3 GiB per GPU (states 47.6 "
        "+ 2.6 in the optimiser step, activations 8.8)")


def test_preflight_stops_a_gpu_run_that_cannot_fit(tmp_path):
    """distill.py's check: the latent shape comes from the data set's manifest, the mesh from parallel.*."""
    from rcm_core.config import from_dict
    from workflows.plan import preflight
    from workflows.prepare_latents import prepare

    cfg = from_dict({"model": {**SMALL, "in_channels": 2, "patch_size": [1, 1, 1], "num_classes": 4},
                     "data": {"source": "gmm", "url": str(tmp_path / "gmm"), "num_rows": 64, "batch_size": 8},
                     "resources": {"use_gpu": True, "num_workers": 2}})
    prepare(cfg.data)
    assert preflight(cfg, gpu_memory=80 * GiB) is None
    with pytest.raises(SystemExit, match="will not fit.*GiB"):
        preflight(cfg, gpu_memory=2 * GiB)          # below the 2 GiB allowance alone
    cfg.resources.use_gpu = False
    assert preflight(cfg, gpu_memory=2 * GiB) is None   # CPU runs are not checked


WAN_480P = (16, 21, 60, 104)       # Wan2.1 VAE latent of 832×480×81 frames (workflows/plan.py)
SHIPPED_GPU_MEMORY = 80 * GiB      # every shipped GPU config is written for 80 GB cards (their comments say so)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "experiments").glob("*.yaml")))
def test_every_shipped_gpu_config_fits_the_gpus_it_states(path):
    """`plan.py --config X --gpus <resources.num_workers> --gpu-memory 80GiB` says "fits" for the configured mesh,
    at the configured global batch (gradient accumulation through data.micro_batch_size)."""
    cfg = load_config(ROOT / path)
    if not cfg.resources.use_gpu or cfg.model.kind != "dit":
        pytest.skip(f"{path} is a CPU config")
    assert check_fits(cfg, gpus=cfg.resources.num_workers, gpu_memory=SHIPPED_GPU_MEMORY, latent=WAN_480P,
                      text_len=512) is None


def test_wan_1p3b_smoke_run_on_one_h200_needs_only_the_worker_count():
    """The 1.3B config with resources.num_workers=1 fits one 141 GB H200: same global batch, 256 micro-batches."""
    cfg = load_config(ROOT / "experiments/wan21_t2v_1p3b_rcm.yaml", ["resources.num_workers=1"])
    assert cfg.data.batch_size == 256
    assert check_fits(cfg, gpus=1, gpu_memory=141 * GiB, latent=WAN_480P, text_len=512) is None
    # and the planner would refuse it without accumulation: the whole batch of 256 at once cannot fit
    whole = load_config(ROOT / "experiments/wan21_t2v_1p3b_rcm.yaml", ["resources.num_workers=1",
                                                                         "data.micro_batch_size=0"])
    assert "will not fit" in check_fits(whole, gpus=1, gpu_memory=141 * GiB, latent=WAN_480P, text_len=512)


def test_preflight_says_when_it_cannot_check(tmp_path, capsys):
    """A GPU run whose manifest cannot be read is not checked; the driver says so and why, instead of nothing."""
    from rcm_core.config import from_dict
    from workflows.plan import preflight

    cfg = from_dict({"model": {**SMALL, "in_channels": 2, "patch_size": [1, 1, 1], "num_classes": 4},
                     "data": {"source": "gmm", "url": str(tmp_path / "absent"), "num_rows": 64, "batch_size": 8},
                     "resources": {"use_gpu": True, "num_workers": 2}})
    assert preflight(cfg, gpu_memory=2 * GiB) is None        # 2 GiB would not fit (above): unchecked, said loudly
    out = capsys.readouterr().out
    assert f"plan: memory check skipped: cannot read the data set's manifest at {tmp_path / 'absent'}" in out


class _OutputStorages(torch.utils._python_dispatch.TorchDispatchMode):
    """Weak references to the storage of every tensor an op returns while active, with its size: after a forward,
    those still alive are what the graph keeps for the backward (autograd's saved tensors, the selective
    checkpoint's cache), whatever mechanism keeps them."""

    def __init__(self, before: list[torch.Tensor]):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef
        self.ref = StorageWeakRef
        self.before = {StorageWeakRef(t.untyped_storage()) for t in before}
        self.out: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = self.ref(t.untyped_storage())
                if ref not in self.before:
                    self.out[ref] = t.untyped_storage().nbytes()
        return out

    def alive(self) -> int:
        return sum(n for ref, n in self.out.items() if not ref.expired())


def _block_bytes_per_token(dim: int, ffn: int, heads: int, count, attention: str = "sdpa_grad",
                           compile_mode: str = "none") -> float:
    """Bytes per latent token `count(block, inputs)` finds for a bf16 one-block network's with-grad forward: the
    difference between two token counts, so per-sample tensors (modulation, cross-attention k, v) drop out."""
    from rcm_core.networks.dit import set_attention, set_compile
    cfg = ModelCfg(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=1, text_dim=32)
    net = set_attention(cast_network(build_network(cfg), torch.bfloat16), attention)
    set_compile(net, compile_mode)
    block, B, found = net.blocks[0], 2, []
    for grid in ((2, 4, 6), (4, 4, 6)):
        x = torch.randn(B, math.prod(grid), dim, dtype=torch.bfloat16, requires_grad=True)
        ctx, e0 = torch.randn(B, 8, dim, dtype=torch.bfloat16), torch.randn(B, 6, dim, requires_grad=True)
        found.append((count(block, (x, ctx, e0, net.rope(grid, torch.device("cpu")))), B * math.prod(grid)))
    (a, n0), (b, n1) = found
    return (b - a) / (n1 - n0)


def _kept_bytes_per_token(mode, dim: int, ffn: int, heads: int, attention: str = "sdpa_grad") -> float:
    """Bytes per latent token a bf16 block leaves alive after its with-grad forward under `mode` (whatever keeps
    them: autograd's saved tensors or the selective checkpoint's cache). attention "fused" runs the fused kernel's
    PyTorch twin here (CPU, no interpreter): plain ops outside SAVED_OPS, like the kernel."""
    def alive(block, inputs) -> int:
        x, ctx, e0, rope = inputs
        with _OutputStorages([x, ctx, e0, *rope, *block.parameters()]) as seen:
            if mode is True:
                out = torch.utils.checkpoint.checkpoint(block, x, ctx, e0, rope, None, use_reentrant=False)
            else:
                out = block(x, ctx, e0, rope, None, recompute=mode or None)
        graph = out.grad_fn          # keeps the graph (and what it saved) alive; the output itself is dropped
        del out
        n = seen.alive()
        del graph
        return n
    return _block_bytes_per_token(dim, ffn, heads, alive, attention=attention)


@pytest.mark.parametrize("dim,ffn,heads", [(64, 160, 4), (80, 256, 5)])
def test_selective_recomputation_keeps_what_the_planner_counts(dim, ffn, heads):
    """Measured bytes per token a block keeps, by mode, against the planner, to the byte (observed: exact): the
    block's bf16 input is the caller's tensor, so the measurement lacks the 2·D the planner counts for it.
    - mm_only / attention_only: `selective_saved_bytes` − 2·D.
    - true (whole block): nothing; the planner's 2·D is the input.
    - false: `block_saved_bytes` + 4·head_dim, the fp32 cos/sin RoPE tables apply_rope casts per block, kept for
      the backward and not in the planner's formula (0.4 % of it at Wan2.1-1.3B's head_dim 128; the older
      saved-tensor test above counts only [B, …] / [B·N, …] tensors, so it does not see them either). Under the
      selective policies the cast is recomputed, not kept."""
    from rcm_core.run.plan import selective_saved_bytes
    measured = {mode: _kept_bytes_per_token(mode, dim, ffn, heads) for mode in (False, True, "mm_only",
                                                                              "attention_only")}
    print("bytes per token kept:", measured)
    assert measured[False] == block_saved_bytes(dim, ffn, heads) + 4 * (dim // heads)
    assert measured[True] == 0
    for mode in ("mm_only", "attention_only"):
        assert measured[mode] == selective_saved_bytes(dim, ffn, heads, mode) - 2 * dim
        fused = _kept_bytes_per_token(mode, dim, ffn, heads, attention="fused")
        assert fused == selective_saved_bytes(dim, ffn, heads, mode, keeps_attention=False) - 2 * dim, mode


def _saved_bytes_per_token(dim: int, ffn: int, heads: int, compile_mode: str) -> float:
    """Bytes per latent token a bf16 block saves for its backward, counted with saved-tensor hooks, which see what
    a compiled graph saves too (a dispatch mode does not see inductor's buffers)."""
    def saved(block, inputs) -> int:
        weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
        found = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(*inputs, None)
        return sum(found.values())
    return _block_bytes_per_token(dim, ffn, heads, saved, compile_mode=compile_mode)


@pytest.mark.parametrize("dim,ffn,heads", [(64, 160, 4), (80, 256, 5)])
def test_a_compiled_block_saves_what_the_planner_counts(dim, ffn, heads):
    """Under model.compile=blocks without checkpointing, inductor's partitioner recomputes elementwise work in the
    backward: the block saves `compiled_block_saved_bytes` per token (36·D + 4·F + 8·heads + 36, observed exact)
    plus the RoPE tables (2·head_dim here), where eager autograd saves `block_saved_bytes` (64·D + …) plus 4·head_dim.
    One H200, 1.3B at 8,190 tokens without checkpointing (2026-12-05): 59.0 GiB compiled, 69.2 eager."""
    from rcm_core.run.plan import compiled_block_saved_bytes
    head_dim = dim // heads
    assert _saved_bytes_per_token(dim, ffn, heads, "none") == block_saved_bytes(dim, ffn, heads) + 4 * head_dim
    compiled = _saved_bytes_per_token(dim, ffn, heads, "blocks")
    assert compiled == compiled_block_saved_bytes(dim, ffn, heads) + 2 * head_dim
    off = ModelCfg(**{**SMALL, "compile": "blocks"})
    kw = dict(batch=1, tokens=100, text_len=8, checkpointing=False, graphs=1, jvp=False)
    assert activation_estimate(off, **kw)[1] < activation_estimate(ModelCfg(**SMALL), **kw)[1]


def test_selective_estimate_lies_between_none_and_block():
    """mm_only's backward peak sits between whole-block checkpointing's and none's, attention_only's between
    block's and mm_only's, and each follows its per-token count."""
    from rcm_core.run.plan import selective_saved_bytes
    m = load_config(ROOT / "experiments" / "wan21_t2v_1p3b_rcm.yaml").model
    kw = dict(batch=1, tokens=32760, text_len=512, graphs=2, jvp=True)
    peak = {mode: activation_estimate(m, checkpointing=mode, **kw)[1] for mode in (False, True, "mm_only",
                                                                                  "attention_only")}
    assert peak[True] < peak["attention_only"] < peak["mm_only"] < peak[False]
    assert selective_saved_bytes(1536, 8960, 12, "mm_only") == 48736
    per_block = block_saved_bytes(1536, 8960, 12) * 32760
    want = 2 * 30 * 48736 * 32760 + BACKWARD_BLOCKS["mm_only"] * per_block
    assert peak["mm_only"] == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="'block'"):
        activation_estimate(m, checkpointing="block", **kw)


def test_attention_only_plan_follows_the_attention_backend():
    """attention_only keeps SDPA's outputs only: with model.attention fused it keeps what whole-block checkpointing
    keeps. The planner against the one-H200 training peaks of experiments/bench/scale_step.py (1.3B, 32,760 tokens,
    batch 1, 2026-12-04; docs/BENCHMARKS.md): sdpa_grad 75.10 GiB measured, fused 66.15, whole blocks 66.12 — each
    within the issue's 10 %. Those runs' student step summed its loss terms before one backward, so it held two
    with-grad graphs, and the fake score's gradients from its last step: the estimate is compared with both, what
    was measured; the plan (one graph at a time since `distill._accumulate` backs each term through alone, the
    fake score's gradients freed while the student trains, `distill._free_gradients`, and no first moments with
    β₁ = 0, `rcm_core.method.adamw`) is lower by one graph's kept bytes, those gradients and two first moments."""
    from rcm_core.run.plan import COMPUTE, GRAD, attention_keepable, peak_bytes
    cfg = load_config(ROOT / "experiments" / "wan21_t2v_1p3b_rcm.yaml")
    assert cfg.model.attention == "sdpa_grad"
    work = Workload(latent=(16, 21, 60, 104), tokens=32760, text_len=512, batch=1)

    def planned(checkpointing, attention: str, graphs: int, old_states: bool = False) -> float:
        model = dataclasses.replace(cfg.model, activation_checkpointing=checkpointing, attention=attention)
        c = dataclasses.replace(cfg, model=model)
        counts = count_params(c.model)
        p = plan_mesh(c, MeshShape(1, 1, 1), gpus=1, gpu_memory=141 * GiB, work=work, counts=counts,
                      checkpointing=checkpointing, table=None)
        jvp, kept = activation_estimate(model, batch=1, tokens=work.tokens, text_len=work.text_len,
                                        checkpointing=checkpointing, graphs=graphs, jvp=True)
        if graphs == 1:
            assert (p.jvp_peak, p.backward_peak) == (jvp, kept)      # what plan_mesh uses
        # what those runs held besides: the fake score's gradients (bf16 and their fp32 copies) and both networks'
        # first moments
        before = counts.total * (COMPUTE + GRAD + 2 * 4) if old_states else 0
        return peak_bytes({**p.states, "before": before}, p.step_only, max(jvp, kept)) / GiB

    assert attention_keepable(cfg.model) and not attention_keepable(dataclasses.replace(cfg.model, attention="fused"))
    for graphs in (1, 2):
        whole = planned(True, "sdpa_grad", graphs)
        assert planned("attention_only", "fused", graphs) == whole
        assert planned("attention_only", "sdpa_grad", graphs) > whole
    assert planned("attention_only", "sdpa_grad", 1) < planned("attention_only", "sdpa_grad", 2)
    old = dict(graphs=2, old_states=True)             # the code those peaks were measured on
    for plan_gib, measured in ((planned("attention_only", "sdpa_grad", **old), 75.10),
                               (planned("attention_only", "fused", **old), 66.15),
                               (planned(True, "sdpa_grad", **old), 66.12)):
        assert abs(plan_gib - measured) <= 0.10 * measured, (plan_gib, measured)


@pytest.mark.parametrize("mode", ["attention_only", "mm_only"])
def test_the_step_bench_sets_its_iteration_peaks_beside_the_cli_estimate(capsys, mode):
    """experiments/bench/rcm_step.py prints the planner's estimate beside each variant's measured iteration peaks
    (issue 28's memory bar, from one command); its Wan2.1-1.3B model and shape must be what `workflows/plan.py`
    plans for the shipped 1.3B config at 32,760 tokens with that recomputation mode, to the printed digit."""
    import sys
    sys.path.insert(0, str(ROOT / "experiments" / "bench"))
    import rcm_step
    from workflows.plan import main

    _, latent, text_len = rcm_step.SHAPES["32k"]
    bench = rcm_step.planned_gib(rcm_step.WAN_1P3B, f"sdpa_grad+compile+{mode}", latent, text_len)
    main(["--config", str(ROOT / "experiments" / "wan21_t2v_1p3b_rcm.yaml"), "--gpus", "1", "--gpu-memory", "141GiB",
          "--latent", ",".join(map(str, latent)), "data.batch_size=1", f"model.activation_checkpointing={mode}"])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("configured mesh")][0]
    assert f"~{bench:.1f} GiB per GPU" in line, (bench, line)


@pytest.mark.parametrize("mode", [False, True, "attention_only", "mm_only"])
def test_activation_estimate_bounds_the_cpu_allocators_peak(mode):
    """experiments/bench/memory_cpu.py on a small bf16 Wan-shaped DiT: the allocator's peak during one
    flow-matching forward + backward grows with the tokens by at least what the policy keeps (those bytes are
    real) and by no more than the planner's estimate (which is an upper bound here: measured 0.4–1.2 blocks of
    allowance where it counts 1–2; docs/BENCHMARKS.md). The byte counts repeat exactly in a given process history
    and move by ~32 kB with what ran before in the process (lazy caches), against margins of ~1.5 MB here."""
    import sys
    sys.path.insert(0, str(ROOT / "experiments" / "bench"))
    import memory_cpu

    model = ModelCfg(kind="dit", in_channels=16, dim=128, ffn_dim=768, num_heads=1, num_layers=2, text_dim=64,
                     dtype="bfloat16", activation_checkpointing=mode, attention="sdpa_grad")
    (n0, g0), (n1, g1) = (memory_cpu.measure(model, frames, 8) for frames in (2, 4))
    planned = [activation_estimate(model, batch=1, tokens=n, text_len=8, checkpointing=mode, graphs=1,
                                   jvp=False)[1] for n in (n0, n1)]
    kept = memory_cpu.kept_per_token(model, mode) * (n1 - n0)
    print(mode, "growth", g1 - g0, "kept", kept, "planned growth", planned[1] - planned[0], "peaks", g0, g1, planned)
    assert kept <= g1 - g0 <= planned[1] - planned[0]
    assert g1 <= planned[1]


def test_the_readme_shows_the_planners_own_output(capsys):
    """README's "Will it fit?" example is the command's output, line for line (the first line, which says whether
    this checkout holds the data set's manifest, aside): a change to the planner's numbers or footer shows here."""
    from workflows.plan import main

    command = "$ python workflows/plan.py --config experiments/wan21_t2v_1p3b_rcm.yaml --gpus 8 --gpu-memory 80GiB\n"
    readme = (ROOT / "README.md").read_text()
    start = readme.index(command) + len(command)
    shown = readme[start:readme.index("```", start)].splitlines()
    main(["--config", str(ROOT / "experiments" / "wan21_t2v_1p3b_rcm.yaml"), "--gpus", "8", "--gpu-memory", "80GiB"])
    printed = capsys.readouterr().out.splitlines()

    def body(lines: list[str]) -> list[str]:
        return [x for x in lines if not x.startswith("plan: cannot read the data set's manifest")]
    assert body(shown) == body(printed)


BF16_DIT = {"kind": "dit", "in_channels": 4, "patch_size": [1, 2, 2], "dim": 128, "ffn_dim": 384, "num_heads": 2,
            "num_layers": 4, "freq_dim": 32, "text_dim": 16, "num_classes": 4, "label_tokens": 2, "dtype": "bfloat16"}


def _state_bytes_worker(world: int, out) -> None:
    import torch.distributed as dist
    from test_parallel import sample_batch
    from rcm_core.config import from_dict
    from rcm_core.method.denoiser import TrigFlowDenoiser
    from rcm_core.method.distill import build_state, distill_step
    from rcm_core.parallel.mesh import build_mesh
    from rcm_core.parallel.sharding import parallelize_state
    from rcm_core.run.loop import step_generator
    rank = dist.get_rank() if dist.is_initialized() else 0
    cfg = from_dict({"model": BF16_DIT, "distill": {"mode": "rcm", "tangent_warmup": 0, "student_update_freq": 2,
                                                    "max_rollout_steps": 2},
                     "data": {"batch_size": world}, "optim": {"lr": 1e-3, "fake_lr": 1e-3}})
    torch.manual_seed(0)
    state = build_state(cfg, TrigFlowDenoiser(build_network(ModelCfg(**BF16_DIT)), "rf_velocity"))
    if world > 1:
        state = parallelize_state(state, build_mesh(MeshShape(1, world, 1), num_heads=BF16_DIT["num_heads"]))
    for it in range(3):                                   # student, critic, student: the student just stepped
        distill_step(state, sample_batch(it + 10 * rank, batch=1), cfg,
                     step_generator(0, rank, it, torch.device("cpu")))
    if rank == 0:
        from rcm_core.run.plan import held_state_bytes
        out.update(held_state_bytes(state))


def test_the_planners_sharded_state_bytes_are_what_fsdp2_holds_per_rank(monkeypatch):
    """A bf16 rCM run on two gloo ranks under FSDP2, after a student step (its gradients held, the fake score at
    rest: freed gradients, β₁ = 0 without a first moment): per rank, each network's parameters, gradients and
    optimiser state are `plan.state_bytes` (12 / 8 / 4 / 2 B per parameter over the shard) within the share of the
    fp32 tables FSDP2 leaves replicated (1 % at Wan2.1-1.3B; 0.2-12 % in this small DiT, most in the teacher, whose
    weights are otherwise bf16). One process without FSDP2 (fp32 masters beside bf16 weights), stepping as a CPU
    run does (casts, then AdamW), holds what `state_bytes(..., masters=True)` counts (14 / 10 / 4 / 2: the bf16
    working copies, and the stepped network's fp32 gradients without their bf16 originals, freed by the step)
    within the same tables' share (its fp32 tables are their own masters, without a bf16 copy). Stepping as a GPU
    run does (fused AdamW, so one pass from the bf16 gradients: the kernel under the interpreter), the stepped
    network holds no gradient after its step, so 2 B/param less than `one_pass=True` counts for the step itself
    (12: its bf16 gradients are still held while the kernel reads them)."""
    import multiprocessing as mp
    from test_parallel import spawn
    from rcm_core.method import distill
    from rcm_core.run.plan import state_bytes
    counts = count_params(ModelCfg(**BF16_DIT))
    with mp.Manager() as manager:              # a dict the forked ranks can write; its server stops at the end
        for world, one_pass, bars in ((2, False, {"student": 0.01, "fake": 0.01, "ema": 0.01, "teacher": 0.15}),
                                      (1, False, {"student": 0.05, "fake": 0.05, "ema": 0.0, "teacher": 0.15}),
                                      (1, True, {"student": 0.05, "fake": 0.05, "ema": 0.0, "teacher": 0.15})):
            out = manager.dict()
            if world == 1:
                with monkeypatch.context() as patch:
                    if one_pass:
                        patch.setenv("TRITON_INTERPRET", "1")
                        patch.setattr(distill, "adamw_kernel", lambda params: {"fused": True})
                    _state_bytes_worker(1, out)
            else:
                spawn(_state_bytes_worker, world, world, out)
            planned = state_bytes(counts, world, True, first_moment=False, masters=world == 1, one_pass=one_pass)
            if one_pass:
                planned["student"] -= 2 * counts.total      # the step freed the bf16 gradients it read
            per_param = {k: out[k] * world / counts.total for k in planned if k in out}
            print(world, one_pass, {k: round(v, 2) for k, v in per_param.items()})
            for k, bar in bars.items():
                assert abs(out[k] - planned[k]) <= bar * planned[k], (k, one_pass, out[k], planned[k])
