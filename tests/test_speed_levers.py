"""The speed levers of issue 28, checked on CPU: the SDPA switch for tangent-free attention, regional
torch.compile of the DiT block, the wide D=64 autotune space and the official-kernel loader of kernels.bench.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_speed_levers.py -q

Bars: both attention paths and both block paths compute the same function, so in float64 they differ only by
round-off; the observed differences (printed by each test, seeded) are 1e-16–1e-14 relative, and the bars sit at
1e-12, two orders above, yet far below any real error (a wrong mask, scale or dropped term is ≥ 1e-3).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import kernels
import kernels.flash_jvp as katt
from rcm_core.config import ModelCfg
from rcm_core.networks import build_network
from rcm_core.networks.dit import set_attention, set_compile

BAR = 1e-12


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _qkv(gen, B=2, H=3, Lq=7, Lk=9, D=8):
    return [torch.randn(B, H, L, D, generator=gen, dtype=torch.float64, requires_grad=True)
            for L in (Lq, Lk, Lk)]


@pytest.mark.parametrize("primal", ["sdpa_grad", "sdpa"])
def test_sdpa_primal_matches_fused_outputs_and_grads_float64(primal):
    gen = torch.Generator().manual_seed(0)
    q, k, v = _qkv(gen)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1] = False                       # a sample with no valid key: output 0 on both paths
    do = torch.randn(2, 3, 7, 8, generator=gen, dtype=torch.float64)
    outs = {}
    for how in ("fused", primal):
        o = kernels.attention(q, k, v, key_padding_mask=mask, scale=0.3, primal=how)
        grads = torch.autograd.grad(o, (q, k, v), do)
        outs[how] = (o.detach(), *grads)
    errs = [_rel(a, b) for a, b in zip(outs[primal], outs["fused"])]
    print("relative differences o, dq, dk, dv:", errs)
    assert max(errs) < BAR
    assert torch.equal(outs[primal][0][1], torch.zeros_like(outs[primal][0][1]))


def test_sdpa_dispatch_rules(monkeypatch):
    """SDPA runs only for tangent-free calls: with grad (sdpa_grad), or always (sdpa); a dual tensor or a
    torch.func.jvp wrapper always takes the fused path; an unknown switch value raises."""
    calls = []
    real = katt._sdpa
    monkeypatch.setattr(katt, "_sdpa", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(1)
    q, k, v = (x.detach() for x in _qkv(gen))
    used = lambda: bool(calls and not calls.clear())          # noqa: E731  (read and reset)
    kernels.attention(q.requires_grad_(), k, v, primal="sdpa_grad")
    assert used()
    with torch.no_grad():
        kernels.attention(q, k, v, primal="sdpa_grad")
        assert not used()
        kernels.attention(q, k, v, primal="sdpa")
        assert used()
        with fwAD.dual_level():
            o = kernels.attention(fwAD.make_dual(q, torch.ones_like(q)), k, v, primal="sdpa")
            assert not used() and fwAD.unpack_dual(o).tangent is not None
    torch.func.jvp(lambda a: kernels.attention(a, k, v, primal="sdpa"), (q.detach(),), (torch.ones_like(q),))
    assert not used()
    with pytest.raises(ValueError, match="primal='flash'"):
        kernels.attention(q, k, v, primal="flash")


def test_fused_path_is_opaque_to_torch_compile():
    """Under torch.compile the fused path is a graph break (its Triton launch and autotuner stay eager) and
    gives the eager result; SDPA is traced into the graph. The eager backend: no inductor compile needed here."""
    from torch._dynamo.utils import counters
    gen = torch.Generator().manual_seed(3)
    q, k, v = (x.detach() for x in _qkv(gen))
    for primal, breaks in (("fused", True), ("sdpa", False)):
        torch._dynamo.reset()
        counters.clear()
        fn = torch.compile(lambda a, b, c: kernels.attention(a, b, c, primal=primal) * 2, backend="eager")
        with torch.no_grad():
            assert torch.equal(fn(q, k, v), kernels.attention(q, k, v, primal=primal) * 2)
        assert bool(counters["graph_break"]) == breaks, dict(counters["graph_break"])


def test_fused_path_breaks_only_around_the_kernel_call():
    """Made before the trace (`kernels.prepare_compile`, which every compiled DiT block calls first), the fused
    kernel's compile-opaque wrapper leaves one graph-break reason, the disabled call itself; made mid-trace, dynamo
    also breaks on `torch.compiler.disable` and on the list's append (torch 2.11 warned about the append on every
    GPU run of 2026-12-05)."""
    from torch._dynamo.utils import counters

    from rcm_core.networks import dit
    gen = torch.Generator().manual_seed(4)
    q, k, v = (x.detach() for x in _qkv(gen))
    reasons = {}
    for prepared in (False, True):
        torch._dynamo.reset()
        counters.clear()
        katt._OPAQUE.clear()
        if prepared:
            kernels.prepare_compile()
        fn = torch.compile(lambda a, b, c: kernels.attention(a, b, c) * 2, backend="eager")
        with torch.no_grad():
            assert torch.equal(fn(q, k, v), kernels.attention(q, k, v) * 2)
        reasons[prepared] = sorted(counters["graph_break"])
    print("graph-break reasons, made mid-trace / made before:", reasons)
    assert len(reasons[True]) == 1 and "_fused_attention" in reasons[True][0]
    assert len(reasons[False]) > 1
    katt._OPAQUE.clear()
    dit._compiled_block.__wrapped__(None)             # uncached: the DiT's compiled block prepares it first
    assert katt._OPAQUE


def _dit(activation_checkpointing_=True, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_network(ModelCfg(kind="dit", in_channels=4, dim=32, ffn_dim=64, num_heads=2, num_layers=2,
                                 text_dim=16, dtype="float64", activation_checkpointing=activation_checkpointing_,
                                 **kw))
    for p in net.parameters():                       # off adaLN-zero's identity start: a real function
        torch.nn.init.normal_(p, std=0.2)
    return net


def _inputs():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 2, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([300.0, 700.0], dtype=torch.float64)
    ctx = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    x_dot = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x, t, ctx, mask, x_dot, torch.tensor([0.5, -1.0], dtype=torch.float64)


def _run(net):
    """(output, parameter grads, JVP primal, JVP tangent) of the network on fixed inputs, with activation
    checkpointing in the backward and the dual-tensor JVP pass (rcm_core's training path)."""
    x, t, ctx, mask, x_dot, t_dot = _inputs()
    out = net(x, t, ctx, cond_mask=mask)
    grads = torch.autograd.grad(out.square().sum(), list(net.parameters()))
    with torch.no_grad(), fwAD.dual_level():
        y = net(fwAD.make_dual(x, x_dot), fwAD.make_dual(t, t_dot), ctx, cond_mask=mask)
        primal, tangent = fwAD.unpack_dual(y)
    assert tangent is not None
    return [out.detach(), *grads, primal, tangent]


def test_dit_attention_switch_keeps_outputs_grads_and_tangent():
    net = _dit()
    ref = _run(net)
    for primal in ("sdpa_grad", "sdpa"):
        set_attention(net, primal)
        assert net.cfg.attention == primal and all(b.attn1.primal == primal for b in net.blocks)
        errs = [_rel(a, b) for a, b in zip(_run(net), ref)]
        print(primal, "max relative difference over output, grads, JVP:", max(errs))
        assert max(errs) < BAR
    assert _dit(attention="sdpa").blocks[1].attn2.primal == "sdpa"      # the config key reaches every layer


@pytest.mark.slow
@pytest.mark.usefixtures("scalar_cpu_kernels")
def test_compiled_blocks_match_eager_and_keep_the_tangent():
    """Inductor on CPU at a tiny shape: output, every parameter gradient and the JVP pass's tangent with
    `model.compile=blocks` (the JVP pass's elementwise islands compiled too) equal eager; the two blocks, a deep copy and another token count share one compiled
    graph. ~1–2 min on a loaded 2-core box (inductor compiles C++ for the forward and the backward)."""
    from torch._dynamo.utils import counters

    from rcm_core.networks import tangent_islands as ti
    islands = (ti.modulated_norm, ti.gated_residual, ti.affine_norm, ti.qk_heads, ti.gelu_tanh)
    torch._dynamo.reset()
    counters.clear()
    for island in islands:
        island._compiled = None
    net = _dit(attention="sdpa")
    ref = _run(net)
    assert all(island._compiled is None for island in islands)          # eager: nothing compiled
    set_compile(net, "blocks")
    got = _run(net)
    errs = [_rel(a, b) for a, b in zip(got, ref)]
    print("compiled vs eager, max relative difference:", max(errs), "graphs:", dict(counters["stats"]))
    assert max(errs) < BAR
    # the JVP pass ran each elementwise island's primal + tangent compiled (tangent_islands.py), not eager
    assert all(island._compiled is not None for island in islands)
    graphs = counters["stats"]["unique_graphs"]
    x, t, ctx, mask = _inputs()[:4]
    copy.deepcopy(net)(x, t, ctx, cond_mask=mask)                     # a copy (student from teacher) reuses it
    longer = torch.cat([x, x], dim=2)                                 # twice the tokens: the same graph
    assert torch.isfinite(net(longer, t, ctx, cond_mask=mask)).all()
    assert counters["stats"]["unique_graphs"] == graphs


def test_wide_d64_space_adds_tiles_at_head_dim_64_only(monkeypatch):
    pytest.importorskip("triton")
    wide = katt._fwd_configs("wide")
    extra = {katt._tile(c) for c in wide} - set(katt._FWD_TILES)
    assert extra == set(katt._WIDE_D64_TILES) - set(katt._FWD_TILES) and extra
    for d, tangent in ((64, True), (64, False), (128, True), (128, False), (256, True)):
        kept = {katt._tile(c) for c in katt._prune_fwd(wide, {}, BLOCK_D=d, HAS_TANGENT=tangent)}
        narrow = {katt._tile(c) for c in katt._prune_fwd(katt._fwd_configs(), {}, BLOCK_D=d, HAS_TANGENT=tangent)}
        assert kept == (narrow | extra if d == 64 else narrow)
    monkeypatch.delenv("RCM_KERNELS_D64_SPACE", raising=False)
    assert katt.d64_space() == "wide"                                 # the default since it measured ahead
    monkeypatch.setenv("RCM_KERNELS_D64_SPACE", "huge")
    with pytest.raises(ValueError, match="RCM_KERNELS_D64_SPACE='huge'"):
        katt.d64_space()


def test_peer_kernel_loader(tmp_path, capsys):
    """kernels.bench --peer-kernel: a file shaped like the official one (top-level einops and flash-attn
    imports, an `attention` entry) loads whether or not those packages exist; a missing file or entry is refused."""
    from kernels.bench import load_peer
    peer = tmp_path / "peer.py"
    peer.write_text("from einops import rearrange\n"
                    "from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_varlen_backward\n"
                    "def attention(q, k, v, tq, tk, tv, sm_scale=None):\n    return q, tq\n")
    mod = load_peer(str(peer))
    assert mod.attention(1, 2, 3, 4, 5, 6, 0.1) == (1, 4)
    import importlib.util
    if importlib.util.find_spec("flash_attn") is None:
        assert "stand-ins raise" in capsys.readouterr().out
        with pytest.raises(RuntimeError, match="_flash_attn_backward is a stand-in"):
            mod._flash_attn_backward()
    with pytest.raises(SystemExit, match="no such file"):
        load_peer(str(tmp_path / "missing.py"))
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(SystemExit, match="no callable `attention"):
        load_peer(str(tmp_path / "bad.py"))


# ----------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
def test_gpu_bf16_levers_stay_within_the_fused_paths_error():
    """On CUDA in bf16 (the training precision) through a 2-block DiT at head dim 128: output, parameter
    gradients and JVP tangent of `sdpa_grad`, `sdpa` and `sdpa_grad` + compiled blocks, each measured against the
    same network in float64, err at most 2× the baseline's (fused kernel, eager) error plus a 1e-3 floor: the
    flash-attention rule the kernel tests use. The bar: a CPU dry run of this test in bf16 (the PyTorch twin in
    the fused path's place, no compile) gave baseline errors of 3e-3–3e-2 and SDPA errors within 0.7–1.4× of
    them (worst at 0.76 of the budget). `pytest -m gpu tests/test_speed_levers.py` (~1 min with the compile)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    cfg = dict(kind="dit", in_channels=16, dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64,
               activation_checkpointing=True)
    ref_net = build_network(ModelCfg(**cfg, dtype="float64")).cuda()
    for p in ref_net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    net = build_network(ModelCfg(**cfg, dtype="bfloat16")).cuda()
    net.load_state_dict(ref_net.state_dict())
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 16, 4, 16, 16, device="cuda", generator=gen)
    x_dot = torch.randn(x.shape, device="cuda", generator=gen)
    t, t_dot = torch.tensor([400.0], device="cuda"), torch.tensor([0.5], device="cuda")
    ctx = torch.randn(1, 32, 64, device="cuda", generator=gen)

    def run(m, dt):
        out = m(x.to(dt), t.to(dt), ctx.to(dt))
        grads = torch.autograd.grad(out.double().square().sum(), list(m.parameters()))
        with torch.no_grad(), fwAD.dual_level():
            y = m(fwAD.make_dual(x.to(dt), x_dot.to(dt)), fwAD.make_dual(t.to(dt), t_dot.to(dt)), ctx.to(dt))
            tangent = fwAD.unpack_dual(y).tangent
        return [out.detach().double(), *(g.double() for g in grads), tangent.double()]

    ref = run(ref_net, torch.float64)
    base = [_rel(a, b) for a, b in zip(run(net, torch.float32), ref)]
    for attention, compile_mode in (("sdpa_grad", "none"), ("sdpa", "none"), ("sdpa_grad", "blocks")):
        set_attention(net, attention)
        set_compile(net, compile_mode)
        errs = [_rel(a, b) for a, b in zip(run(net, torch.float32), ref)]
        worst = max(e / (2 * b + 1e-3) for e, b in zip(errs, base))
        print(attention, compile_mode, "worst error / budget:", worst)
        assert worst <= 1.0, (attention, compile_mode, errs, base)


def test_block_causal_calls_keep_the_fused_kernel_and_primal_reaches_causal_layouts(monkeypatch):
    """Issue 28 × issue 30: a block-causal call (chunk_sizes) runs the fused kernel whatever `primal` says (no dense
    mask for SDPA); the DiT's `model.attention` reaches the KV-cache calls of a causal network (SDPA there, same
    output in float64); `model.compile: blocks` leaves forwards under a causal layout eager."""
    from rcm_core.networks import dit
    from rcm_core.networks.causal import KVCache
    calls = []
    real = katt._sdpa
    monkeypatch.setattr(katt, "_sdpa", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(gen, Lq=9, Lk=9)
    ref = kernels.attention_ref(q, k, v, chunk_sizes=(4, 5))
    for primal in kernels.PRIMAL_BACKENDS:
        assert _rel(kernels.attention(q, k, v, chunk_sizes=(4, 5), primal=primal), ref) < BAR
        with torch.no_grad():
            assert _rel(kernels.attention(q, k, v, chunk_sizes=(4, 5), primal=primal), ref) < BAR
    assert not calls
    cfg = ModelCfg(kind="dit", in_channels=4, patch_size=[1, 2, 2], dim=32, ffn_dim=64, num_heads=2, num_layers=2,
                   freq_dim=16, text_dim=8, num_classes=4, label_tokens=2, dtype="float64", causal=True)
    torch.manual_seed(0)
    net = build_network(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(2, 4, 2, 4, 4, generator=gen, dtype=torch.float64)
    t, label = torch.full((2,), 500.0, dtype=torch.float64), torch.tensor([1, 2])

    def stream(primal: str) -> torch.Tensor:
        set_attention(net, primal)
        cache = KVCache()
        with torch.no_grad():
            return torch.cat([net(x[:, :, i:i + 1], t, label, cache=cache, append=True) for i in range(2)], dim=2)

    fused = stream("fused")
    assert not calls
    assert _rel(stream("sdpa"), fused) < BAR and calls
    monkeypatch.setattr(dit, "_compiled_block", lambda: pytest.fail("a causal layout reached the compiled block"))
    set_compile(net, "blocks")
    with torch.no_grad():
        assert _rel(net(x, t, label), fused) < 1e-10           # one block-causal forward = the cached stream
    assert _rel(stream("sdpa"), fused) < BAR


# ------------------------------------------------------------- lever 3: selective activation recomputation

RECOMPUTE = [True, "mm_only", "attention_only"]


@pytest.mark.parametrize("attention", ["sdpa_grad", "fused"])
@pytest.mark.parametrize("mode", RECOMPUTE)
def test_recomputation_keeps_outputs_grads_and_tangent_float64(mode, attention):
    """Every `model.activation_checkpointing` mode computes the network's function and its gradients: output,
    every parameter gradient and the (no-grad, never checkpointed) JVP pass equal the no-checkpoint run, through
    SDPA (kept by the selective policies) and the fused path (recomputed: on CPU its PyTorch twin)."""
    ref = _run(_dit(attention=attention, activation_checkpointing_=False))
    errs = [_rel(a, b) for a, b in zip(_run(_dit(attention=attention, activation_checkpointing_=mode)), ref)]
    print(mode, attention, "max relative difference over output, grads, JVP:", max(errs))
    assert max(errs) < BAR


def test_selective_recomputation_in_the_rcm_student_step_float64():
    """The rCM student iteration as training runs it (sCM with its no-grad JVP pass + DMD through the rollout's
    last call, a backward per term): loss and every student gradient under mm_only equal the no-checkpoint step."""
    from rcm_core.config import ExperimentCfg
    from rcm_core.data.latents import LatentBatch
    from rcm_core.method.denoiser import TrigFlowDenoiser
    from rcm_core.method.distill import build_state, distill_step
    from rcm_core.networks.dit import set_recompute

    def student_grads(mode):
        teacher = TrigFlowDenoiser(_dit(attention="sdpa_grad", activation_checkpointing_=False), "rf_velocity")
        cfg = ExperimentCfg(model=teacher.net.cfg)
        cfg.distill.tangent_warmup, cfg.teacher.guidance = 0, 3.0
        state = build_state(cfg, teacher)
        for role in (state.student, state.fake):
            set_recompute(role.net, mode)
        x, _, ctx = _inputs()[:3]
        metrics = distill_step(state, LatentBatch(latent=x, cond=ctx), cfg, torch.Generator().manual_seed(5))
        assert metrics["phase_student"] == 1.0
        return metrics, [p.grad for p in state.student.parameters()]

    (m_ref, g_ref), (m_sac, g_sac) = student_grads(False), student_grads("mm_only")
    assert all(g is not None for g in g_ref) and max(g.abs().max() for g in g_ref) > 0
    errs = [_rel(a, b) for a, b in zip(g_sac, g_ref)]
    print("rCM student step, mm_only vs none: max relative gradient difference", max(errs))
    assert max(errs) < BAR and abs(m_sac["loss"] - m_ref["loss"]) <= BAR * abs(m_ref["loss"])


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that run while it is active (here: during the backward, i.e. what is recomputed)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode,addmm,sdpa,layer_norm", [
    (False, 0, 0, 0),                   # nothing recomputed
    (True, 10, 2, 3),                   # the whole block: its 10 linears, 2 attentions, 3 layer norms
    ("mm_only", 0, 0, 3),               # matmuls and attentions kept, the norms (and the rest) recomputed
    ("attention_only", 10, 0, 3),       # attentions kept, linears and norms recomputed
])
def test_policy_keeps_its_ops_and_recomputes_the_rest(mode, addmm, sdpa, layer_norm):
    """Forward ops that run again during the backward, per block: a policy that kept nothing (= true) or
    everything (= false) fails here. A block has 10 linears (self q/k/v/o, cross q/k/v/o, FFN up/down: `addmm`),
    two SDPA calls and three layer norms; the backward itself runs none of these forward ops."""
    net = _dit(attention="sdpa_grad", activation_checkpointing_=mode)
    x, t, ctx, mask = _inputs()[:4]
    loss = net(x, t, ctx, cond_mask=mask).square().sum()
    with _OpCounter() as seen:
        loss.backward()
    sdpa_ops = sum(v for k, v in seen.counts.items() if k.startswith("_scaled_dot_product") and "backward" not in k)
    got = (seen.counts.get("addmm", 0), sdpa_ops, seen.counts.get("native_layer_norm", 0))
    assert got == (addmm * 2, sdpa * 2, layer_norm * 2), (mode, got, seen.counts)     # 2 blocks


def test_bad_recompute_value_is_one_line_naming_the_choices():
    from rcm_core.config import ConfigError, load_config
    from rcm_core.networks.dit import set_recompute
    for bad in ("mm", 1):
        with pytest.raises(ConfigError, match=rf"model.activation_checkpointing={bad!r} in .*: allowed values are "
                                              r"false, true, 'mm_only', 'attention_only'$"):
            load_config(None, [f"model.activation_checkpointing={bad}"])
    assert load_config(None, ["model.activation_checkpointing=mm_only"]).model.activation_checkpointing == "mm_only"
    assert load_config(None, ["model.activation_checkpointing=true"]).model.activation_checkpointing is True
    with pytest.raises(ValueError, match="activation_checkpointing='block': use one of false, true, mm_only"):
        set_recompute(_dit(), "block")


@pytest.mark.slow
@pytest.mark.usefixtures("scalar_cpu_kernels")
def test_compiled_blocks_under_mm_only_match_eager_without_checkpointing():
    """`model.compile: blocks` + `mm_only`: the checkpoint is compiled with the block (inductor applies the policy
    in its partitioner). Output, gradients and the JVP pass (eager blocks, compiled islands) equal the eager
    no-checkpoint network, one graph for both blocks. ~1 min on a loaded 2-core box."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    ref = _run(_dit(attention="sdpa_grad", activation_checkpointing_=False))
    net = _dit(attention="sdpa_grad", activation_checkpointing_="mm_only")
    set_compile(net, "blocks")
    errs = [_rel(a, b) for a, b in zip(_run(net), ref)]
    print("compiled mm_only vs eager none, max relative difference:", max(errs), dict(counters["stats"]))
    assert max(errs) < BAR
    # one graph for both blocks, plus the JVP pass's elementwise islands (tangent_islands.py): five islands, and
    # qk_heads twice (self-attention with RoPE, cross-attention without)
    assert counters["stats"]["unique_graphs"] == 1 + 6 and not counters["graph_break"]


def test_selective_recomputation_through_the_triton_function(monkeypatch):
    """The fused path on a GPU is a Triton launch inside an autograd.Function that no policy can keep: under
    mm_only it is recomputed. Under the Triton interpreter (float32, the GPU's code path on CPU) the gradients
    equal the no-checkpoint network's; the recomputation repeats the same arithmetic, so they agree to round-off
    of fp32 (observed: exactly)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def grads(mode):
        torch.manual_seed(0)
        net = build_network(ModelCfg(kind="dit", in_channels=4, dim=32, ffn_dim=64, num_heads=2, num_layers=2,
                                     text_dim=16, dtype="float32", activation_checkpointing=mode))
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.2)
        x, t, ctx = (v.float() for v in _inputs()[:3])
        assert kernels.flash_jvp.use_triton(x)
        return torch.autograd.grad(net(x, t, ctx).square().sum(), list(net.parameters()))

    errs = [_rel(a, b) for a, b in zip(grads("mm_only"), grads(False))]
    print("Triton Function under mm_only vs none, max relative gradient difference:", max(errs))
    assert max(errs) < 1e-6


def test_backward_tiles_fit_the_head_dim():
    """The backward autotune spaces: 128×128 tiles only at head dim ≤ 64, ≤ 64×64 at 256, and every kind keeps
    at least one tile at every head dim (a pruned-empty space would fall back to an arbitrary config)."""
    pytest.importorskip("triton")
    for kind in ("dkdv", "dq"):
        configs = katt._bwd_configs(kind)
        for d, limit in ((16, 128 * 128), (64, 128 * 128), (128, 64 * 128), (256, 64 * 64)):
            kept = katt._prune_bwd(configs, {}, BLOCK_D=d)
            areas = [c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in kept]
            assert kept and max(areas) <= limit and max(areas) == max(a for a in (
                c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in configs) if a <= limit), (kind, d)
