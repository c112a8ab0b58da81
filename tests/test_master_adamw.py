"""The one-pass master-weight AdamW step (kernels.master_adamw, wired in by rcm_core.method.adamw.AdamW's
`step_in_one_pass`): its maths against float64, its bf16 rounding, and the product's step against the cast +
PyTorch fused AdamW + refresh step it replaces. On CPU the Triton kernel runs under the interpreter.

    .venv/bin/python -m pytest tests/test_master_adamw.py -q            # GPU: pytest -m gpu tests/test_master_adamw.py
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kernels.master_adamw import BLOCK, constants, master_adamw, master_adamw_ref
from rcm_core.method.adamw import AdamW
from rcm_core.parallel.precision import with_master_weights

SETTINGS = dict(lr=1e-3, beta2=0.999, weight_decay=0.1, eps=1e-8)
SHAPES = [(3, 5), (BLOCK + 1,), (7,), (64, 33), (0,)]      # one tensor over a chunk with a one-element tail, one empty
# Errors in fp32 ulps against float64 arithmetic on the same fp32 inputs and constants: the master in ulps of the
# larger of its old and new magnitudes (the update may cancel it), the second moment in ulps of its own. Largest
# over seeds 0-2999 of `_draw` (2026-12-05, interpreter): kernel 4.98 / 1.24, twin 5.83 / 1.24; bars 8 and 2.
MASTER_ULPS, SECOND_MOMENT_ULPS = 8.0, 2.0


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _draw(seed: int, device: str = "cpu"):
    """Gradients spanning five decades, masters ~N(0, 1), second moments up to 1e-4, step counters 1-4999 (small t
    is where the bias correction cancels)."""
    g = torch.Generator().manual_seed(seed)
    grads = [(torch.randn(s, generator=g) * 10 ** torch.empty(s).uniform_(-6, -1, generator=g)).bfloat16()
             for s in SHAPES]
    masters = [torch.randn(s, generator=g) for s in SHAPES]
    second = [torch.rand(s, generator=g) * 1e-4 for s in SHAPES]
    steps = [torch.tensor(float(torch.randint(1, 5000, (1,), generator=g))) for _ in SHAPES]
    out = grads, masters, second, [m.bfloat16() for m in masters], steps
    return tuple([t.to(device) for t in ts] for ts in out)


def _float64(grads, masters, second, steps) -> tuple[list, list]:
    """The step in float64 from the same fp32 values and fp32 constants."""
    c = {k: float(torch.tensor(x, dtype=torch.float32)) for k, x in constants(**SETTINGS).items()}
    out_p, out_v = [], []
    for g, p, v, t in zip(grads, masters, second, steps):
        g, p, v = g.double(), p.double(), v.double()
        p = p - c["lr_wd"] * p
        v = c["beta2"] * v + c["one_minus_beta2"] * g * g
        bias_correction2_sqrt = math.sqrt(-math.expm1(float(t) * c["log_beta2"]))
        out_p.append(p - c["lr"] * g / (v.sqrt() / bias_correction2_sqrt + c["eps"]))
        out_v.append(v)
    return out_p, out_v


def _ulps(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> float:
    if got.numel() == 0:
        return 0.0
    scale = scale.float().abs().cpu()
    ulp = (torch.nextafter(scale, torch.full_like(scale, math.inf)) - scale).double()
    return ((got.double().cpu() - want.cpu()).abs() / ulp).max().item()


def _errors(seed: int, fn, device: str = "cpu", counted: bool = False) -> tuple[float, float]:
    """Worst master and second-moment ulps of one seed's step against float64; `counted`: with a non-finite
    counter, as the product steps (it must stay 0: `_draw`'s gradients are finite)."""
    grads, masters, second, weights, steps = _draw(seed, device)
    old = [m.clone() for m in masters]
    want_p, want_v = _float64(grads, masters, second, steps)
    counter = torch.zeros((), dtype=torch.int64, device=device) if counted else None
    fn(grads, masters, second, weights, steps, **SETTINGS, nonfinite=counter)
    assert counter is None or int(counter) == 0
    assert all(torch.equal(w, m.bfloat16()) for w, m in zip(weights, masters)), "weights are not bf16(master)"
    p = max(_ulps(m, r, torch.maximum(r.abs().float().to(m.device), o.abs())) for m, r, o in zip(masters, want_p, old))
    v = max(_ulps(s, r, r) for s, r in zip(second, want_v))
    return p, v


@pytest.mark.parametrize("fn", [master_adamw, master_adamw_ref], ids=["kernel", "twin"])
def test_the_step_is_float64_adamw_to_a_few_ulps(interpret, fn):
    """Kernel (interpreter) and twin against float64 on the same inputs, seeds 0-19: masters within
    `MASTER_ULPS`, second moments within `SECOND_MOMENT_ULPS`, and each bf16 working weight the master rounded
    to nearest even (checked in `_errors`)."""
    worst = [max(e) for e in zip(*(_errors(seed, fn) for seed in range(20)))]
    assert worst[0] <= MASTER_ULPS and worst[1] <= SECOND_MOMENT_ULPS, worst


def test_the_bias_correction_keeps_its_digits_at_the_first_step(interpret):
    """At t = 1, 1 − β₂ᵗ = 0.001: computed as 1 − exp(ln β₂) in fp32 it is 1.3e-5 off (the step 6.4e-6 of itself,
    ~100 fp32 ulps); the kernel's series keeps it to fp32 precision. One tensor, v = 0, so the step is
    lr·g/(|g|·√(1−β₂)/√(1−β₂) + ε) = lr·sign(g) to within ε/|g|: within 16 fp32 ulps of lr here."""
    g = torch.full((8,), 0.25).bfloat16()
    p, v, w, t = torch.zeros(8), torch.zeros(8), torch.zeros(8).bfloat16(), torch.tensor(1.0)
    master_adamw([g], [p], [v], [w], [t], lr=1e-3, beta2=0.999, weight_decay=0.0, eps=1e-12)
    assert (p + 1e-3).abs().max().item() <= 16 * 2 ** -24 * 1e-3, p


def test_the_working_weight_is_rounded_to_nearest_even(interpret):
    """lr = 0 leaves the masters as they are, so the weights show the kernel's fp32 → bf16 rounding alone: ties
    to even either way, the largest finite values, infinities, NaN and subnormals, as PyTorch's copy_ rounds
    (the interpreter's own conversion truncates)."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF, 0x7F7F7FFF, 0xFF800000,
                         0x7F800000, 0x7FC00000, 0x00008000, 0x00018000, 0x80000001, 0xBF808000], dtype=torch.int64)
    p = bits.to(torch.int32).view(torch.float32).clone()
    w = torch.zeros_like(p).bfloat16()
    master_adamw([torch.zeros_like(w)], [p], [torch.zeros_like(p)], [w], [torch.tensor(1.0)],
                 lr=0.0, beta2=0.999, weight_decay=0.0, eps=1e-8)
    want = p.bfloat16()
    assert torch.equal(w.isnan(), want.isnan())
    assert torch.equal(w[~want.isnan()], want[~want.isnan()]), (w, want)


def _poisoned(seed: int, device: str = "cpu"):
    """`_draw`'s tensors with NaN, +Inf and −Inf gradient entries in a full chunk and in the tail chunk of the
    tensor over a chunk, and in two small tensors; and the same gradients with those entries set to 0."""
    grads, masters, second, weights, steps = _draw(seed, device)
    poisoned = [g.clone() for g in grads]
    places = {0: [(1, 2)], 1: [(0,), (BLOCK - 1,), (BLOCK,)], 3: [(5, 7), (63, 32)]}
    values = [math.nan, math.inf, -math.inf]
    count = 0
    for i, spots in places.items():
        for spot in spots:
            poisoned[i][spot] = values[count % 3]
            count += 1
    zeroed = [torch.where(torch.isfinite(g), g, torch.zeros_like(g)) for g in poisoned]
    return poisoned, zeroed, masters, second, weights, steps, count


@pytest.mark.parametrize("fn,device", [(master_adamw, "cpu"), (master_adamw_ref, "cpu"),
                                       pytest.param(master_adamw, "cuda", marks=pytest.mark.gpu)],
                         ids=["kernel", "twin", "compiled"])
def test_nonfinite_gradient_entries_step_as_zero_and_are_counted(interpret, monkeypatch, fn, device):
    """With a counter, each NaN/Inf gradient entry steps as 0 (rCM's rule): masters, second moments and weights
    bit-equal to a counted step on the same gradients with those entries zeroed beforehand, the counter holding
    how many there were, added to what it held, and the gradients left as they were (the caller frees them). With
    finite gradients the counter stays 0 and the step is the one without a counter, to the bit: compiled too, where
    the two are separate compilations (`test_the_compiled_step_rounds_every_product_and_sum_as_written`)."""
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        monkeypatch.delenv("TRITON_INTERPRET")                  # the compiled kernel
    poisoned, zeroed, masters, second, weights, steps, count = _poisoned(0, device)
    seen = [g.clone() for g in poisoned]
    runs = {}
    for name, grads, counter in (("counted", poisoned, torch.tensor(5, device=device)), ("zeroed first", zeroed, None),
                                 ("finite, counted", zeroed, torch.tensor(0, device=device))):
        state = [[t.clone() for t in ts] for ts in (masters, second, weights)]
        fn(grads, *state[:2], state[2], steps, **SETTINGS, nonfinite=counter)
        runs[name] = state, counter
    assert int(runs["counted"][1]) == 5 + count == 11 and int(runs["finite, counted"][1]) == 0
    for got, want in zip(runs["counted"][0], runs["finite, counted"][0]):
        assert all(torch.equal(a, b) for a, b in zip(got, want)), "a non-finite entry did not step as 0"
    for got, want in zip(runs["finite, counted"][0], runs["zeroed first"][0]):
        assert all(torch.equal(a, b) for a, b in zip(got, want)), "the counter changed the step"
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(poisoned, seen))


# Compiles the kernel for sm_90 (Triton ships ptxas; no GPU needed) with and without a counter, with the launch's
# own options, and prints the floating-point arithmetic instructions of each PTX.
_PTX_OPS = r"""
import collections, json, re, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, sys.argv[1])
from kernels import _triton_master_adamw as k
from kernels.master_adamw import BLOCK, NUM_WARPS
sig = {n: t for n, t in zip(k._master_adamw.arg_names, ["*i64", "*i64", "*i32", "*i64", "i32", "*i64"] + ["fp32"] * 6
                                                      + ["constexpr"] * 2)}
for zero in (False, True):
    src = ASTSource(k._master_adamw, sig, constexprs={"BLOCK": BLOCK, "ZERO_NONFINITE": zero})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": NUM_WARPS, **k.COMPILE_OPTIONS}).asm["ptx"]
    print(json.dumps(collections.Counter(re.findall(r"^\s*((?:fma|mul|add|sub|div|sqrt)\.[a-z.]*f32)", ptx, re.M))))
"""


def test_the_compiled_step_rounds_every_product_and_sum_as_written():
    """The kernel's launch options forbid FMA contraction, so the compiled kernels with and without a counter (two
    compilations) round every product and sum alike, as the interpreter does. Compiled for sm_90 on this CPU:
    no fused multiply-add in either, and the same count of each fp32 operation (with contraction both held 40
    `fma.rn.f32`, fused differently: 386 of 4,183 second moments one ulp apart on an H100, 2026-12-05)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # a compile, not the interpreter
    run = subprocess.run([sys.executable, "-c", _PTX_OPS, str(Path(__file__).resolve().parents[1])], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    uncounted, counted = map(json.loads, run.stdout.splitlines())
    assert uncounted == counted and uncounted["mul.rn.f32"] > 0, run.stdout
    assert not any(op.startswith("fma") for op in uncounted), run.stdout


def test_without_a_counter_nonfinite_gradients_step_as_pytorchs_adamw_would(interpret):
    """No counter, no zeroing: a NaN gradient entry makes its master and second moment NaN, as in PyTorch."""
    poisoned, _, masters, second, weights, steps, _ = _poisoned(0)
    master_adamw(poisoned, masters, second, weights, steps, **SETTINGS)
    assert masters[0][1, 2].isnan() and second[0][1, 2].isnan() and torch.isfinite(masters[0][0]).all()


def test_the_counter_must_be_one_int64_beside_the_gradients():
    grads, masters, second, weights, steps = _draw(0)
    with pytest.raises(ValueError, match="nonfinite must be one int64 element on the gradients' device, got "
                                         "torch.int32 of 1 on cpu; make it with torch.zeros"):
        master_adamw(grads, masters, second, weights, steps, **SETTINGS, nonfinite=torch.tensor(0, dtype=torch.int32))


def test_a_checked_call_still_refuses_lists_of_other_lengths():
    """`checked=True` skips the per-tensor `refusal` (the optimiser asked it already), never the lengths."""
    grads, masters, second, weights, steps = _draw(0)
    with pytest.raises(ValueError, match="5 gradients but 4 masters"):
        master_adamw(grads, masters[:4], second, weights, steps, **SETTINGS, checked=True)


def test_the_switch_takes_on_or_off(monkeypatch):
    from kernels.master_adamw import enabled
    monkeypatch.setenv("RCM_KERNELS_MASTER_ADAMW", "0")
    with pytest.raises(ValueError, match="RCM_KERNELS_MASTER_ADAMW='0': use on or off"):
        enabled()


def test_the_step_refuses_what_it_cannot_take():
    grads, masters, second, weights, steps = _draw(0)
    with pytest.raises(ValueError, match="5 gradients but 4 masters"):
        master_adamw(grads, masters[:4], second, weights, steps, **SETTINGS)
    with pytest.raises(ValueError, match="must be bfloat16, got torch.float16"):
        master_adamw([g.half() for g in grads], masters, second, weights, steps, **SETTINGS)
    with pytest.raises(ValueError, match="shapes differ"):
        master_adamw(grads, masters[::-1], second, weights, steps, **SETTINGS)
    offset = torch.zeros(16).bfloat16()[1:]                  # 2 bytes past an aligned start
    with pytest.raises(ValueError, match="16-byte aligned"):
        master_adamw([offset], [torch.zeros(15)], [torch.zeros(15)], [torch.zeros(15).bfloat16()],
                     [torch.tensor(1.0)], **SETTINGS)


def _net(seed: int = 0) -> nn.Module:
    """A bf16 trunk (several tensors, one over a chunk) with a tiny fp32 head, as Wan keeps its time path."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(48, 64), nn.Linear(64, 40), nn.Linear(40, 2))
    net[:2].to(torch.bfloat16)
    return net


def _loss(net: nn.Module, seed: int) -> torch.Tensor:
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(seed)).bfloat16()
    return net[2](net[1](net[0](x)).float()).square().mean()


def _optimisers(cls, net: nn.Module, **flags):
    return with_master_weights(net.parameters(), lambda ps: cls(ps, lr=1e-3, betas=(0.0, 0.999),
                                                                weight_decay=0.1, eps=1e-8, **flags))


def test_one_pass_steps_as_the_cast_fused_adamw_and_refresh_it_replaces(interpret):
    """The product's step (our AdamW, fused, with masters: one kernel for the bf16 tensors) against what it
    replaces (casts, torch.optim.AdamW's fused kernel, refresh), six steps, one weight without a gradient in
    some: masters within `MASTER_ULPS` of their magnitude, the fp32 head and every step counter equal, the
    stepped bf16 weights bf16(master), no gradient left on a bf16 parameter, and no first moment kept."""
    net, ref = _net(), _net()
    opt, ref_opt = _optimisers(AdamW, net, fused=True), _optimisers(torch.optim.AdamW, ref, fused=True)
    for step in range(6):
        for model, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=True)
            _loss(model, step).backward()
            if step % 2:
                model[1].bias.grad = None
            o.step()
        assert all(p.grad is None for p in net[:2].parameters())
    for got, want in zip(opt.masters, ref_opt.masters):
        scale = want.abs().max()
        assert (got - want).abs().max() <= MASTER_ULPS * (torch.nextafter(scale, scale * 2) - scale), (got, want)
    assert torch.equal(opt.masters[-1], ref_opt.masters[-1]) and torch.equal(net[2].weight, ref[2].weight)
    assert all(torch.equal(p, m.bfloat16()) for p, m in zip(net[:2].parameters(), opt.masters))
    for m, r in zip(opt.masters, ref_opt.masters):
        assert float(opt.state[m]["step"]) == float(ref_opt.state[r]["step"]) in (3.0, 6.0)
        assert set(opt.state[m]) == {"step", "exp_avg_sq"}


def test_one_pass_makes_no_fp32_gradient(interpret):
    """What the kernel saves in memory: the cast step makes an fp32 copy of every bf16 gradient (4 B per
    parameter at the step's peak); the one-pass step makes no float tensor larger than the fp32 head's (18
    elements; every bf16 tensor has ≥ 40). Counted over every op the step dispatches; the same count on the
    cast step finds its copies, so the test can tell the two apart."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self.numel = max(self.numel, t.numel())
            return out

    largest = {}
    for name, cls in (("one pass", AdamW), ("cast", torch.optim.AdamW)):
        net = _net()
        opt = _optimisers(cls, net, fused=True)
        for step in range(2):                              # the second step: every state exists already
            opt.zero_grad(set_to_none=True)
            _loss(net, step).backward()
            with Largest() as seen:
                opt.step()
        largest[name] = seen.numel
    assert largest["one pass"] <= 18 < 40 <= largest["cast"], largest


@pytest.mark.parametrize("switch", ["on", "off"])
def test_only_fused_bf16_groups_take_one_pass(interpret, monkeypatch, switch):
    """The kernel repeats PyTorch's fused arithmetic for aligned bf16 parameters: a foreach AdamW, a float16
    network, or a fused bf16 network whose gradients start off a 16-byte boundary, steps as before, to the bit;
    with RCM_KERNELS_MASTER_ADAMW=off a fused bf16 network does too."""
    monkeypatch.setenv("RCM_KERNELS_MASTER_ADAMW", switch)
    cases = [({"foreach": True}, torch.bfloat16), ({"fused": True}, torch.float16), ({"fused": True}, "offset")]
    for flags, dtype in cases + ([({"fused": True}, torch.bfloat16)] if switch == "off" else []):
        offset = dtype == "offset"
        dtype = torch.bfloat16 if offset else dtype
        nets = [_net().to(dtype) for _ in range(2)]
        for net in nets:
            net[2].float()
        opts = [_optimisers(AdamW, nets[0], **flags), _optimisers(torch.optim.AdamW, nets[1], **flags)]
        for step in range(3):
            for net, opt in zip(nets, opts):
                opt.zero_grad(set_to_none=True)
                net[2](net[1](net[0](torch.randn(6, 48, generator=torch.Generator().manual_seed(step)).to(dtype)))
                       .float()).square().mean().backward()
                if offset:                                  # each gradient a view 2 bytes into a larger buffer
                    for p in net[:2].parameters():
                        p.grad = torch.cat([p.grad.new_zeros(1), p.grad.flatten()])[1:].view_as(p.grad)
                opt.step()
        assert all(torch.equal(a, b) for a, b in zip(opts[0].masters, opts[1].masters)), (flags, dtype)


def test_one_pass_resumes_bit_for_bit(interpret):
    """A state dict written after one-pass steps loads into a fresh optimiser, and the two go on the same."""
    net = _net()
    opt = _optimisers(AdamW, net, fused=True)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        _loss(net, step).backward()
        opt.step()
    twin = copy.deepcopy(net)
    twin_opt = _optimisers(AdamW, twin, fused=True)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(2, 4):
        for model, o in ((net, opt), (twin, twin_opt)):
            o.zero_grad(set_to_none=True)
            _loss(model, step).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(opt.masters, twin_opt.masters))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("counted", [False, True], ids=["uncounted", "counted"])
def test_the_compiled_kernel_is_float64_adamw_to_a_few_ulps_on_cuda(counted):
    """The compiled kernel on the GPU, seeds 0-19, without a counter and with one (the product's compilation):
    the same bars as the interpreter's. Seeds 0-199 on one H200 (2026-12-05): 5.28 / 0.99 ulps, both."""
    worst = [max(e) for e in zip(*(_errors(seed, master_adamw, "cuda", counted) for seed in range(20)))]
    assert worst[0] <= MASTER_ULPS and worst[1] <= SECOND_MOMENT_ULPS, worst


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_pass_steps_as_the_cast_and_fused_adamw_on_cuda():
    """The product's GPU step against the one it replaces, 120 bf16 tensors of up to 3 M elements, five steps:
    masters within `MASTER_ULPS` of each tensor's magnitude, weights bf16(master)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    sizes = [int(s) for s in torch.randint(1, 3_000_000, (120,), generator=torch.Generator().manual_seed(0))]
    made = [torch.randn(n, device="cuda", generator=g).bfloat16() for n in sizes]
    ps = [nn.Parameter(t.clone()) for t in made]
    qs = [nn.Parameter(t.clone()) for t in made]
    opt = with_master_weights(ps, lambda m: AdamW(m, lr=1e-3, betas=(0.0, 0.999), weight_decay=0.1, fused=True))
    ref = with_master_weights(qs, lambda m: torch.optim.AdamW(m, lr=1e-3, betas=(0.0, 0.999), weight_decay=0.1,
                                                              fused=True))
    for _ in range(5):
        for p, q in zip(ps, qs):
            p.grad = (torch.randn(p.shape, device="cuda", generator=g) * 1e-3).bfloat16()
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for got, want in zip(opt.masters, ref.masters):
        scale = want.abs().max()
        assert (got - want).abs().max() <= MASTER_ULPS * (torch.nextafter(scale, scale * 2) - scale)
    assert all(torch.equal(p, m.bfloat16()) for p, m in zip(ps, opt.masters))


def test_the_host_time_bench_runs_its_three_arms_and_puts_everything_back(capsys):
    """experiments/bench/optimiser_host.py at a tiny tensor count: a row per arm, and the kernel module as it was
    (its stubbed launch and patched check undone)."""
    import sys
    from pathlib import Path
    import kernels.master_adamw as module
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "bench"))
    from optimiser_host import ARMS, main

    before = (module.use_kernel, module.triton_module, module.check)
    out = main(["--bf16", "6", "--fp32", "2", "--steps", "2", "--rounds", "1"])
    assert set(out) == set(ARMS) and all(ms > 0 for ms in out.values())
    assert (module.use_kernel, module.triton_module, module.check) == before
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == len(ARMS) + 1 and all(arm in "".join(rows) for arm in ARMS)
