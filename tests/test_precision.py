"""fp32 master weights for bf16 networks without FSDP (rcm_core.parallel.precision): the same arithmetic as an fp32
AdamW fed the bf16 gradients, updates below bf16's resolution kept, and an exact resume."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from rcm_core.parallel.precision import (
    MasterWeightOptimizer,
    master_parameters,
    with_master_weights,
)

LR = 1e-5          # AdamW steps of ~lr: far below half a bf16 ulp of weights ~0.5 (2^-9 ≈ 2e-3)


def _adamw(params):
    return torch.optim.AdamW(params, lr=LR, betas=(0.0, 0.999), weight_decay=0.0, eps=1e-8)


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    net[0].to(torch.bfloat16)                 # a bf16 trunk with an fp32 island, as Wan's KEEP_FP32
    with torch.no_grad():
        net[0].weight.uniform_(0.25, 0.75)
    return net


def _loss(net: nn.Module, seed: int) -> torch.Tensor:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return net[1](net[0](x).float()).square().mean()


def _train(net: nn.Module, opt, steps: range) -> None:
    for i in steps:
        opt.zero_grad(set_to_none=True)
        _loss(net, i).backward()
        opt.step()


def test_masters_equal_fp32_adamw_on_the_bf16_gradients():
    net, ref = _model(), _model()
    opt = with_master_weights(net.parameters(), _adamw)
    assert isinstance(opt, MasterWeightOptimizer)
    masters = [p.detach().float().clone().requires_grad_(True) for p in ref.parameters()]
    ref_opt = _adamw(masters)
    start = net[0].weight.detach().clone()
    for i in range(20):
        opt.zero_grad(set_to_none=True)
        _loss(net, i).backward()
        opt.step()
        ref.zero_grad(set_to_none=True)            # the reference: fp32 AdamW on the same bf16 gradients
        _loss(ref, i).backward()
        for p, m in zip(ref.parameters(), masters):
            m.grad = p.grad.float()
        ref_opt.step()
        with torch.no_grad():
            for p, m in zip(ref.parameters(), masters):
                p.copy_(m)
    for got, want in zip(master_parameters(net, opt), masters):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    moved = (master_parameters(net, opt)[0] - start.float()).abs()
    assert (moved > 0).all() and moved.max() > 5 * LR, "20 steps of ~lr each must move the fp32 masters"
    # A plain bf16 AdamW loses every one of these updates: each is below half an ulp of its weight.
    plain = _model()
    _train(plain, _adamw(plain.parameters()), range(20))
    assert torch.equal(plain[0].weight, start)
    assert torch.equal(net[0].weight, master_parameters(net, opt)[0].to(torch.bfloat16))


def test_nonfinite_entries_are_zeroed_and_counted_in_groups_on_the_device(monkeypatch):
    """`zero_nonfinite_counted` (what a one-pass step leaves: fp32 and bf16 tensors, one not contiguous, one
    empty), with groups of 40 elements so the tensors fall into several: each NaN/Inf entry 0, every other
    entry untouched to the bit, the count added to the counter's 3, and no host read."""
    import sys
    from pathlib import Path
    import rcm_core.parallel.precision as precision
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "bench"))
    import rcm_step
    monkeypatch.setattr(precision, "CAST_GROUP", 40)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 7, generator=g), torch.randn(30, generator=g).bfloat16(), torch.zeros(0),
             torch.randn(6, 4, generator=g).t(), torch.randn(50, generator=g)]
    spots = [(0, (1, 2), math.nan), (1, (29,), math.inf), (3, (3, 5), -math.inf), (4, (0,), math.nan),
             (4, (49,), math.inf)]
    for i, at, value in spots:
        grads[i][at] = value
    before = [t.clone() for t in grads]
    counter = torch.tensor(3)
    with rcm_step._HostReads() as reads:
        precision.zero_nonfinite_counted(grads, counter)
    assert int(counter) == 3 + len(spots) and sum(reads.counts.values()) == 0
    for got, was in zip(grads, before):
        bad = ~torch.isfinite(was)
        assert torch.equal(got[bad], torch.zeros_like(got[bad])) and torch.equal(got[~bad], was[~bad])
    assert not grads[3].is_contiguous()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_multi_tensor_casts_give_the_per_tensor_loops_bits(device):
    """step() casts the bf16 gradients up and the fp32 masters down as multi-tensor copies (on a GPU a kernel of
    its own, grouping tensors, where copy_ ran per tensor): after five steps every master and working copy equals
    the per-tensor reference bit for bit, and a parameter without a gradient leaves its master without one (AdamW
    skips it). 24 parameters, so the GPU's multi-tensor kernel takes several groups of mixed sizes."""
    torch.manual_seed(1)
    net = nn.Sequential(*[nn.Linear(16 * (1 + i % 3), 16 * (1 + (i + 1) % 3)) for i in range(12)])
    net = net.to(device, torch.bfloat16)
    ref = copy.deepcopy(net)
    opt = with_master_weights(net.parameters(), _adamw)
    masters = [p.detach().float().clone().requires_grad_(True) for p in ref.parameters()]
    ref_opt = _adamw(masters)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    for _ in range(5):
        for model in (net, ref):
            model.zero_grad(set_to_none=True)
            model(x).float().square().mean().backward()
            model[3].weight.grad = None                     # no gradient this step (a frozen or unused weight)
        opt.step()
        for p, m in zip(ref.parameters(), masters):
            m.grad = None if p.grad is None else p.grad.float()
        ref_opt.step()
        with torch.no_grad():
            for p, m in zip(ref.parameters(), masters):
                p.copy_(m)
    assert opt.masters[6].grad is None                      # net[3].weight's master
    for got, want in zip(opt.masters, masters):
        assert torch.equal(got, want)
    for got, want in zip(net.parameters(), ref.parameters()):
        assert torch.equal(got, want)


def test_the_step_frees_each_bf16_gradient_once_cast(monkeypatch):
    """step() casts the bf16 gradients to fp32 a group at a time and frees each group once cast, so at no cast does
    it hold both whole sets: live gradient bytes stay within the fp32 copies plus one group's bf16 gradients (all
    of both, 6 B per parameter, before; 2.6 GiB more at Wan2.1-1.3B's one-GPU step). Counted at every multi-tensor
    copy the step launches, with groups of ~300 elements over 24 parameters (several groups); the masters and
    working copies equal those of one group (the default size here) to the bit, and no bf16 gradient is left."""
    import rcm_core.parallel.precision as precision
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(1)
    net = nn.Sequential(*[nn.Linear(16 * (1 + i % 3), 16 * (1 + (i + 1) % 3)) for i in range(12)]).to(torch.bfloat16)
    ref = copy.deepcopy(net)
    opt, ref_opt = with_master_weights(net.parameters(), _adamw), with_master_weights(ref.parameters(), _adamw)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)

    def live() -> int:
        grads = [p.grad for p in net.parameters()] + [m.grad for m in opt.masters]
        return sum(g.numel() * g.element_size() for g in grads if g is not None)

    class AtEachCopy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._foreach_copy_.default:
                self.seen.append(live())
            return func(*args, **(kwargs or {}))

    numel = sum(p.numel() for p in net.parameters())
    group = 300
    largest = max(p.numel() for p in net.parameters())
    for step in range(3):
        for model in (net, ref):
            model.zero_grad(set_to_none=True)
            model(x).float().square().mean().backward()
        monkeypatch.setattr(precision, "CAST_GROUP", group)
        with AtEachCopy() as copies:
            opt.step()
        monkeypatch.undo()
        ref_opt.step()
        casts = len(copies.seen) - 1                        # the last copy refreshes the bf16 working copies
        assert casts >= 4, f"{casts} groups: the bound below would not tell the two ways apart"
        assert max(copies.seen) <= 4 * numel + 2 * max(group, largest), (step, copies.seen)
        assert all(p.grad is None for p in net.parameters())
    for got, want in zip(opt.masters, ref_opt.masters):
        assert torch.equal(got, want)
    for got, want in zip(net.parameters(), ref.parameters()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_ema_multi_tensor_lerp_gives_the_per_tensor_loops_bits(device):
    """PowerEMA.update averages with one multi-tensor lerp: three updates from the fp32 masters of a bf16 network
    equal per-tensor lerp_ bit for bit (on a GPU a different kernel from lerp_)."""
    from rcm_core.method.ema import PowerEMA
    torch.manual_seed(3)
    net = nn.Sequential(*[nn.Linear(24, 24) for _ in range(10)]).to(device, torch.bfloat16)
    ema = PowerEMA(net, 0.05)
    shadow = [p.detach().clone() for p in ema.module.parameters()]
    for step in range(3):
        masters = [p.detach().float() + 1e-3 * torch.randn(p.shape, device=device) for p in net.parameters()]
        ema.update(net, masters)
        weight = 1.0 - ema.beta(step + 1)
        for s_, m in zip(shadow, masters):
            s_.lerp_(m, weight)
    for got, want in zip(ema.module.parameters(), shadow):
        assert torch.equal(got, want)


def test_fp32_model_gets_the_plain_optimizer():
    net = nn.Linear(3, 3)
    assert isinstance(with_master_weights(net.parameters(), _adamw), torch.optim.AdamW)


def test_resume_from_state_dict_is_exact():
    net = _model()
    opt = with_master_weights(net.parameters(), _adamw)
    _train(net, opt, range(5))
    saved_model = {k: v.clone() for k, v in net.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())     # state_dict() holds live moment tensors
    _train(net, opt, range(5, 9))
    other = _model()
    other.load_state_dict(saved_model)
    opt2 = with_master_weights(other.parameters(), _adamw)
    opt2.load_state_dict(saved_opt)
    _train(other, opt2, range(5, 9))
    for a, b in zip(master_parameters(net, opt), master_parameters(other, opt2)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_sharded_checkpoint_into_bf16_without_fsdp_says_how(tmp_path):
    """A DCP folder cannot fill masters kept outside the module: the error names the way to resume."""
    import pytest

    from rcm_core.config import from_dict
    from rcm_core.parallel.dcp import load_distributed
    from rcm_core.method.denoiser import TrigFlowDenoiser
    from rcm_core.method.distill import build_state
    from rcm_core.networks import build_network

    cfg = from_dict({"model": {"kind": "mlp", "in_channels": 2, "hidden": 8, "depth": 1, "freq_dim": 8,
                               "dtype": "bfloat16"}})
    state = build_state(cfg, TrigFlowDenoiser(build_network(cfg.model)))
    (tmp_path / ".metadata").write_bytes(b"")
    with pytest.raises(ValueError, match="dp_shard > 1"):
        load_distributed(state, tmp_path)


def test_evaluation_samples_the_ema_in_the_students_compute_dtypes():
    """The EMA shadow is fp32; evaluation runs a copy in the student's layout (bf16 trunk, fp32 islands), with
    each weight the bf16 rounding of the average, and leaves the shadow itself untouched."""
    from rcm_core.config import ModelCfg
    from rcm_core.method.denoiser import TrigFlowDenoiser
    from rcm_core.method.ema import PowerEMA
    from rcm_core.networks import build_network

    torch.manual_seed(0)
    cfg = ModelCfg(kind="dit", in_channels=4, patch_size=[1, 2, 2], dim=32, ffn_dim=64, num_heads=2, num_layers=1,
                   freq_dim=16, text_dim=8, num_classes=3, dtype="bfloat16")
    student = TrigFlowDenoiser(build_network(cfg))
    ema = PowerEMA(student, 0.05)
    layout = [p.dtype for p in student.parameters()]
    assert torch.bfloat16 in layout and torch.float32 in layout, "the test needs a net with fp32 islands"
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    work = ema.compute_copy(student)
    assert [p.dtype for p in work.parameters()] == layout
    for p, shadow in zip(work.parameters(), ema.module.parameters()):
        assert torch.equal(p, shadow.to(p.dtype))
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())       # the shadow stays fp32
    fp32_student = TrigFlowDenoiser(build_network(ModelCfg(**{**vars(cfg), "dtype": "float32"})))
    ema32 = PowerEMA(fp32_student, 0.05)
    assert ema32.compute_copy(fp32_student) is ema32.module          # nothing to cast: no second copy in memory


def _bf16_fsdp2_ema_worker() -> None:
    """Rank body: a bf16 tiny DiT (fp32 modulation tables and norms, as Wan's) sharded over 2 ranks; two sCM
    student iterations with fused AdamW; the second EMA update must equal per-tensor lerp_ from the shadow after
    the first."""
    from torch.distributed.tensor import DTensor

    from rcm_core.config import ModelCfg, from_dict
    from rcm_core.method.denoiser import TrigFlowDenoiser
    from rcm_core.method.distill import build_state, distill_step
    from rcm_core.networks import build_network
    from rcm_core.parallel.mesh import MeshShape, build_mesh
    from rcm_core.parallel.sharding import parallelize_state
    from rcm_core.run.loop import step_generator
    from test_parallel import HEADS, TINY, TOKENS, sample_batch

    model = {**TINY, "dtype": "bfloat16"}
    cfg = from_dict({"model": model, "distill": {"mode": "scm", "tangent_warmup": 0},
                     "optim": {"lr": 1e-3, "lr_warmup": 0}, "teacher": {"guidance": 3.0}})
    torch.manual_seed(0)
    state = build_state(cfg, TrigFlowDenoiser(build_network(ModelCfg(**model)), "rf_velocity"))
    mesh = build_mesh(MeshShape(1, 2, 1), num_heads=HEADS, num_tokens=TOKENS)
    parallelize_state(state, mesh)
    kinds = {type(p) for p in state.ema.module.parameters()}
    assert kinds == {DTensor, nn.Parameter}, kinds       # the mix the multi-tensor lerp must take apart
    assert {type(p) for p in state.student.parameters()} == kinds
    for group in state.opt_student.param_groups:
        group["fused"] = True                                # what a GPU run takes (distill.adamw_kernel)
    local = [p.to_local() if isinstance(p, DTensor) else p for p in state.ema.module.parameters()]
    for it in range(2):
        if it == 1:
            shadow = [p.detach().clone() for p in local]
        distill_step(state, sample_batch(it + 10 * mesh.dp_rank), cfg, step_generator(0, mesh.dp_rank, it,
                                                                                           torch.device("cpu")))
    weight = 1.0 - state.ema.beta(2)
    assert 0.0 < weight < 1.0 and state.ema.num_updates == 2
    masters = [p.to_local() if isinstance(p, DTensor) else p
               for p in master_parameters(state.student, state.opt_student)]
    for got, before, m in zip(local, shadow, masters, strict=True):
        assert torch.equal(got, before.lerp_(m.detach().float(), weight))


def test_ema_update_of_a_bf16_network_under_fsdp2():
    """Under FSDP2 a bf16 network holds DTensor shards and replicated plain tensors (the fp32 modulation tables).
    AdamW steps them in separate groups (sharding._rebuild_optimizer); the EMA's multi-tensor lerp took both in
    one call and failed ("mixed torch.Tensor and DTensor") at the first student step of every sharded bf16 run.
    Two gloo ranks, the real step with fused AdamW as on a GPU: the EMA gives per-tensor-loop bits."""
    from test_parallel import spawn
    spawn(_bf16_fsdp2_ema_worker, 2)
