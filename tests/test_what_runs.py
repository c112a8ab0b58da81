"""What you configure is what runs (issue #22): no key that nothing reads, a Wan folder used where it lies, the
config's S3 endpoint for checkpoints, data keys checked against the data set already written, one device. No Ray.
(The resume check runs through Ray in tests/test_workflow_distill.py.)

    .venv/bin/python -m pytest tests/test_what_runs.py -q
"""
import ast
import re
from pathlib import Path

import pytest
import torch
import yaml

from rcm_core.config import ConfigError, ExperimentCfg, flatten, load_config, to_dict
from workflows.sweep import load_sweep

REPO = Path(__file__).resolve().parents[1]
# Where configs are read: every module outside the tests (config.py included: its checks read the values).
SOURCES = [p for d in ("rcm_core", "workflows", "kernels") for p in sorted((REPO / d).rglob("*.py"))]


def names_read(tree: ast.AST) -> set[str]:
    """Field names the syntax tree reads: `x.name` loaded (an assignment `x.name = …` is no read),
    `getattr(x, "name")`, and `getattr(x, k)` inside a loop or comprehension whose `k` runs over literal names
    (`for k in ("frames", "canvas")`). A name in a docstring, a comment or any other string is no read."""
    read = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            read.add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            read.add(node.args[1].value)
        loops = [node] if isinstance(node, ast.For) else getattr(node, "generators", [])
        for loop in loops:
            if isinstance(loop.target, ast.Name) and isinstance(loop.iter, (ast.Tuple, ast.List, ast.Set)) and any(
                    isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id == "getattr"
                    and len(c.args) >= 2 and isinstance(c.args[1], ast.Name) and c.args[1].id == loop.target.id
                    for c in ast.walk(node)):
                read |= {e.value for e in loop.iter.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return read


READ = set().union(*(names_read(ast.parse(p.read_text(), str(p))) for p in SOURCES))


def _shipped_keys() -> dict[str, str]:
    """Dotted config key -> where it is set: every experiment YAML, every sweep's search space, overrides and
    per-trial resources, and the overrides of the KubeRay jobs' command lines."""
    keys: dict[str, str] = {}
    for path in sorted((REPO / "experiments").glob("*.yaml")):
        keys.update(dict.fromkeys(flatten(yaml.safe_load(path.read_text())), path.name))
    for path in sorted((REPO / "experiments" / "sweeps").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        load_sweep(path)                                    # the sweep itself is valid
        keys.update(dict.fromkeys(raw["search_space"], path.name))
        keys.update({o.split("=", 1)[0]: path.name for o in raw.get("overrides") or []})
        keys.update({f"resources.{k}": path.name for k in raw.get("resources") or {}})
    for path in sorted((REPO / "cluster" / "kuberay").glob("rayjob-*.yaml")):
        entry = yaml.safe_load(path.read_text())["spec"]["entrypoint"]
        keys.update({w.split("=", 1)[0]: path.name for w in entry.split() if re.fullmatch(r"[a-z_]+\.[a-z_.]+=.*", w)
                     and not w.startswith("sweep.")})
    return keys


def _read_somewhere(key: str) -> bool:
    """The key's field is read somewhere in the code's syntax trees (`names_read`). A leaf name shared with another
    field can hide a dead key; a key no code reads at all cannot hide, not even behind a docstring."""
    return key.split(".")[-1] in READ


def test_a_name_in_a_docstring_or_an_assignment_is_no_read():
    """The collector itself: only loads and getattr count (a key whose only mention is prose is dead)."""
    tree = ast.parse('''
"""Set distill.reg_weight to sweep λ."""
def f(cfg, d):
    """uses cfg.eval.bootstrap"""
    cfg.train.ghost = 1               # written, never read
    x = "cfg.data.phantom"
    for k in ("frames", "canvas"):
        print(getattr(d, k))
    return cfg.distill.tangent_warmup, getattr(cfg, "run_dir"), [getattr(d, j) for j in ("patch",)]
''')
    read = names_read(tree)
    assert {"tangent_warmup", "run_dir", "frames", "canvas", "patch", "distill", "train"} <= read
    assert not {"reg_weight", "bootstrap", "ghost", "phantom"} & read


def test_every_shipped_key_is_a_config_key_that_code_reads():
    known = flatten(ExperimentCfg())
    keys = _shipped_keys()
    assert "distill.reg_weight" in keys and "resources.num_workers" in keys      # the collector sees the files
    unknown = {k: where for k, where in keys.items() if k not in known and k != "base"}
    unread = {k: where for k, where in keys.items() if k in known and not _read_somewhere(k)}
    assert not unknown, f"keys that are not config keys: {unknown}"
    assert not unread, f"keys set in shipped files that no code reads (a sweep over them sweeps nothing): {unread}"
    never = [k for k in known if not _read_somewhere(k)]
    assert not never, f"config keys no code reads: {never}"


def test_wan_configs_mesh_fits_their_workers():
    """The meshes the Wan configs resolve to on the workers they state: 1.3B shards over all 8 (and over 1 when
    resources.num_workers=1 is the only override), 14B is the official 32 = dp_shard 4 × cp 8."""
    from rcm_core.parallel.mesh import MeshShape, shape_from_config

    for name, shape in (("wan21_t2v_1p3b_rcm", MeshShape(1, 8, 1)), ("wan21_t2v_14b_rcm", MeshShape(1, 4, 8))):
        cfg = load_config(REPO / "experiments" / f"{name}.yaml")
        assert shape_from_config(cfg.parallel, cfg.resources.num_workers) == shape
        assert shape.dp_shard > 1                        # FSDP shards (rcm_core.parallel.mesh)
        assert cfg.resources.use_gpu and cfg.train.device == "cuda"
    one = load_config(REPO / "experiments" / "wan21_t2v_1p3b_rcm.yaml", ["resources.num_workers=1"])
    assert shape_from_config(one.parallel, 1) == MeshShape(1, 1, 1)


# ----------------------------------------------------------------------------------------------------------
# Item 2: a Wan2.1 folder as teacher.checkpoint

WAN_TINY = ["model.kind=dit", "model.in_channels=4", "model.dim=64", "model.ffn_dim=128", "model.num_heads=2",
            "model.num_layers=2", "model.text_dim=16"]


def test_wan_folder_is_loaded_where_it_lies_on_the_worker(tmp_path):
    from rcm_core.networks import build_network
    from rcm_core.networks.wan_io import export
    from workflows.driver import driver_teacher

    cfg = load_config(None, WAN_TINY)
    torch.manual_seed(0)
    net = build_network(cfg.model)
    export(net, tmp_path / "models" / "Wan2.1-tiny", layout="diffusers")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cfg.teacher.checkpoint = str(tmp_path / "models" / "Wan2.1-tiny")
    path = driver_teacher(cfg)
    assert path == Path(cfg.teacher.checkpoint)
    from workflows.trainer import worker_teacher
    teacher = worker_teacher(path, cfg, torch.device("cpu"))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before     # nothing written beside it
    x, ctx, t = torch.randn(2, 4, 1, 4, 4), torch.randn(2, 3, 16), torch.tensor([300.0, 700.0])
    assert torch.equal(teacher.net(x, t, ctx), net(x, t, ctx))


def test_missing_teacher_checkpoint_is_never_trained_into(tmp_path, monkeypatch):
    from workflows.driver import driver_teacher
    from workflows.trainer import worker_teacher

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [*WAN_TINY, f"teacher.checkpoint={tmp_path}/absent"])
    assert driver_teacher(cfg) == tmp_path / "absent"          # the driver may not see the workers' storage
    with pytest.raises(FileNotFoundError, match="teacher.checkpoint=.*absent: no such file or folder"):
        worker_teacher(cfg.teacher.checkpoint, cfg, torch.device("cpu"))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# Item 3: data.s3_endpoint reaches Ray Train's checkpoint storage

def test_checkpoint_storage_takes_the_configs_s3_endpoint(monkeypatch):
    from workflows.storage import run_storage, storage_filesystem

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    cfg = load_config(None, ["train.storage_path=s3://ckpts/run", "data.s3_endpoint=http://127.0.0.1:9"])
    path, fs = run_storage(cfg)
    assert path == "ckpts/run" and fs is not None and fs.type_name == "s3"
    assert "127.0.0.1:9" in repr(fs.__reduce__())               # the endpoint pyarrow was given
    assert storage_filesystem("s3://ckpts/run") is None         # no endpoint anywhere: AWS itself
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:7")
    assert "127.0.0.1:9" in repr(storage_filesystem("s3://ckpts/run", "http://127.0.0.1:9").__reduce__())


# ----------------------------------------------------------------------------------------------------------
# Item 4: data keys against the data set already at data.url; one key per fact

def _gmm_cfg(url: Path, *extra: str) -> ExperimentCfg:
    return load_config(None, ["model.kind=mlp", "model.in_channels=2", "data.source=gmm", f"data.url={url}",
                              "data.num_rows=256", "data.rows_per_shard=128", "data.batch_size=64", *extra])


def test_a_request_that_disagrees_with_the_data_there_names_both(tmp_path):
    from workflows.driver import prepare_data

    url = tmp_path / "gmm"
    prepare_data(_gmm_cfg(url))                                    # written once
    prepare_data(_gmm_cfg(url))                                    # the same request reads it
    with pytest.raises(ConfigError) as e:
        prepare_data(_gmm_cfg(url, "data.num_rows=512", "data.seed=3"))
    msg = str(e.value)
    assert "data.num_rows: 256 there, 512 requested" in msg and "data.seed: 0 there, 3 requested" in msg
    assert "data.rows_per_shard" not in msg and str(url) in msg


def test_a_data_set_that_cannot_be_read_is_never_rewritten(tmp_path):
    """Only "nothing there yet" (no folder, no manifest) writes the built-in data set; a manifest that is there but
    unreadable is an error naming it, and the files there are left as they were."""
    from rcm_core.data.latents import DatasetError
    from workflows.driver import prepare_data

    url = tmp_path / "gmm"
    prepare_data(_gmm_cfg(url))                                    # nothing there: written
    manifest = url / "manifest.json"
    manifest.write_text(manifest.read_text()[:-20])                # cut short, as by a full disk
    before = {p: p.read_bytes() for p in url.rglob("*") if p.is_file()}
    with pytest.raises(DatasetError, match=r"manifest.json: not valid JSON"):
        prepare_data(_gmm_cfg(url))
    assert {p: p.read_bytes() for p in url.rglob("*") if p.is_file()} == before


def test_toy_evaluator_reads_the_mixture_from_the_data_set(tmp_path):
    from rcm_core.data.latents import read_manifest
    from rcm_core.method.denoiser import TrigFlowDenoiser
    from rcm_core.networks import build_network
    from workflows.driver import check_model_fits_data, prepare_data
    from workflows.trainer import _evaluator

    cfg = prepare_data(_gmm_cfg(tmp_path / "gmm3", "data.gmm_dim=3", "model.in_channels=3", "data.normalize=false",
                                "eval.num_samples=8"))
    manifest = vars(read_manifest(cfg.data.url))
    teacher = TrigFlowDenoiser(build_network(cfg.model), "rf_velocity")
    assert _evaluator(cfg, teacher, manifest, torch.device("cpu")).gmm.means.shape[1] == 3
    check_model_fits_data(cfg, read_manifest(cfg.data.url))
    cfg.model.in_channels = 2
    with pytest.raises(ConfigError, match=r"model.in_channels=2 .* \[3, 1, 1, 1\]"):
        check_model_fits_data(cfg, read_manifest(cfg.data.url))


# ----------------------------------------------------------------------------------------------------------
# Item 5: one device

@pytest.mark.parametrize("overrides", [["train.device=cuda"], ["resources.use_gpu=true"]])
def test_train_device_and_use_gpu_must_agree(overrides):
    from workflows.driver import check_device

    with pytest.raises(ConfigError, match="train.device=.* but resources.use_gpu="):
        check_device(load_config(None, overrides))
    check_device(load_config(None, ["train.device=cuda", "resources.use_gpu=true"]))
    check_device(load_config(None))


# ----------------------------------------------------------------------------------------------------------
# Item 1, the comparison itself (the refusal through Ray: tests/test_workflow_distill.py)

def test_resume_changes_split_shaping_from_free_keys():
    from rcm_core.config import resume_changes

    old = load_config(None, ["train.steps=400"])
    new = load_config(None, ["train.steps=800", "distill.reg_weight=0.1", "eval.num_samples=64"])
    shaping, free = resume_changes(to_dict(old), new)
    assert shaping == {"distill.reg_weight": (0.01, 0.1)}
    assert free == {"train.steps": (400, 800), "eval.num_samples": (512, 64)}
    assert resume_changes(to_dict(old), old) == ({}, {})


def test_a_resumed_runs_checkpoints_record_their_own_step_and_config(tmp_path):
    """Each checkpoint carries its own step, config hash and config (which check_resume reads), also after a
    resume, where the loaded checkpoint's older entries used to overwrite them."""
    import json

    from rcm_core.run.checkpoint import load_checkpoint
    from rcm_core.config import config_hash
    from rcm_core.method.denoiser import TrigFlowDenoiser
    from rcm_core.run.loop import run_training
    from rcm_core.networks import build_network
    from rcm_core.data.toy import default_gmm, gmm_batches

    cfg = load_config(None, ["model.kind=mlp", "model.in_channels=2", "model.num_classes=4", "model.hidden=16",
                             "model.depth=1", "data.batch_size=8", "train.steps=2", "train.checkpoint_every=2",
                             f"train.run_dir={tmp_path}", "distill.tangent_warmup=0"])
    torch.manual_seed(0)
    teacher = TrigFlowDenoiser(build_network(cfg.model), "rf_velocity").requires_grad_(False)
    gmm = default_gmm()
    quiet = lambda *args: None      # noqa: E731
    run_training(cfg, lambda start: gmm_batches(gmm, 8, 0, start), quiet, teacher=teacher, device="cpu",
                 extra_state={})
    cfg.train.steps = 4
    run_training(cfg, lambda start: gmm_batches(gmm, 8, 0, start), quiet, "latest", teacher=teacher, device="cpu",
                 extra_state={})
    last = tmp_path / "checkpoints" / "step_4"
    data = load_checkpoint(last)
    assert data["data_position"] == 4 and data["config_hash"] == config_hash(cfg)
    from rcm_core.run.checkpoint import RUN_CONFIG_FILE
    from rcm_core.config import run_config_dict
    assert json.loads((last / RUN_CONFIG_FILE).read_text()) == run_config_dict(cfg)


def test_the_no_ray_resume_compares_configs_as_the_ray_path_does(tmp_path, capsys):
    """`python -m rcm_core.run --resume latest` with another λ is refused before any teacher is trained, naming the
    key (the same check as workflows/storage.py check_resume, rcm_core.config.check_resume_config); a free key
    (train.steps) resumes and is said; --resume-changed forces it."""
    from rcm_core.config import ConfigError
    from rcm_core.data.toy import default_gmm, gmm_batches
    from rcm_core.method.denoiser import TrigFlowDenoiser
    from rcm_core.networks import build_network
    from rcm_core.run.loop import run_training
    from rcm_core.run.pipeline import check_resume_dir, cli_main

    DEBUG = REPO / "experiments" / "debug_cpu.yaml"                 # cli_main's default config
    tiny = ["model.kind=mlp", "model.in_channels=2", "model.num_classes=4", "model.hidden=16", "model.depth=1",
            "data.batch_size=8", "train.checkpoint_every=2", f"train.run_dir={tmp_path}", "distill.tangent_warmup=0"]
    cfg = load_config(DEBUG, [*tiny, "train.steps=2"])
    torch.manual_seed(0)
    teacher = TrigFlowDenoiser(build_network(cfg.model), "rf_velocity").requires_grad_(False)
    run_training(cfg, lambda start: gmm_batches(default_gmm(), 8, 0, start), lambda *a: None, teacher=teacher,
                 device="cpu", extra_state={})
    with pytest.raises(ConfigError, match=r"distill.reg_weight: 0.01 -> 0.1\).*another train.run_dir.*"
                                          r"--resume-changed"):
        cli_main(["--resume", "latest", *tiny, "train.steps=4", "distill.reg_weight=0.1"])
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "checkpoints" / "step_4").exists()
    assert check_resume_dir(load_config(DEBUG, [*tiny, "train.steps=4"]), "latest") == {}
    assert "with: train.steps: 2 -> 4" in capsys.readouterr().out
    forced = check_resume_dir(load_config(DEBUG, [*tiny, "distill.reg_weight=0.1"]), str(tmp_path / "checkpoints" /
                                                                                         "step_2"), allow_changed=True)
    assert forced == {"distill.reg_weight": (0.01, 0.1)}
