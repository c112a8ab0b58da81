"""A Wan2.1 checkpoint (diffusers or original layout) and a stored negative-prompt embedding load as the teacher."""
import numpy as np
import pytest
import torch

from rcm_core.config import load_config
from rcm_core.networks import build_network
from rcm_core.networks.wan_io import export
from rcm_core.run.teacher import load_teacher

TINY = ["model.kind=dit", "model.in_channels=4", "model.dim=64", "model.ffn_dim=128", "model.num_heads=2",
        "model.num_layers=2", "model.text_dim=16"]


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_wan_checkpoint_and_negative_prompt_become_the_teacher(tmp_path, layout):
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    net = build_network(cfg.model)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    export(net, tmp_path / "ckpt", layout=layout)
    neg = np.random.default_rng(0).standard_normal((7, 16)).astype("float32")
    np.save(tmp_path / "neg.npy", neg)
    cfg.teacher.checkpoint, cfg.teacher.negative_context = str(tmp_path / "ckpt"), str(tmp_path / "neg.npy")
    teacher = load_teacher(cfg.teacher.checkpoint, cfg, torch.device("cpu"))
    assert torch.equal(teacher.net.negative_context, torch.from_numpy(neg))
    x, ctx = torch.randn(2, 4, 1, 4, 4), torch.randn(2, 7, 16)
    t = torch.tensor([300.0, 700.0])
    assert torch.allclose(teacher.net(x, t, ctx), net(x, t, ctx), atol=1e-6)
    null = teacher.null_cond(2, torch.device("cpu"), like=ctx)
    assert torch.equal(null[0], torch.from_numpy(neg))        # CFG's ∅ is the stored negative prompt


def test_wrong_checkpoint_names_the_keys(tmp_path):
    cfg = load_config(None, TINY)
    export(build_network(cfg.model), tmp_path / "ckpt", layout="diffusers")
    wrong = load_config(None, [*TINY, "model.num_layers=3"])
    with pytest.raises(ValueError, match="blocks.2"):
        load_teacher(str(tmp_path / "ckpt"), wrong, torch.device("cpu"))


def test_a_teacher_file_and_a_config_that_disagree_on_the_parametrization_fail(tmp_path):
    """A file of save_teacher records what its network predicts; teacher.parametrization saying otherwise is an error
    naming both, not a value silently ignored."""
    from rcm_core.method.denoiser import TrigFlowDenoiser
    from rcm_core.run.teacher import save_teacher

    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    save_teacher(TrigFlowDenoiser(build_network(cfg.model), "edm_eps"), cfg, tmp_path / "t.pt")
    with pytest.raises(ValueError, match=r"predicts 'edm_eps' but teacher.parametrization='rf_velocity'; set "
                                         r"teacher.parametrization=edm_eps"):
        load_teacher(tmp_path / "t.pt", cfg, torch.device("cpu"))
    agree = load_config(None, [*TINY, "teacher.parametrization=edm_eps"])
    assert load_teacher(tmp_path / "t.pt", agree, torch.device("cpu")).parametrization == "edm_eps"
