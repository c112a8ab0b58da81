"""Sample from a distilled student (or a teacher) into a .npy file of latents [K, C, T, H, W] float32.

    python workflows/sample.py --checkpoint runs/demo/ema_student.pt --steps 2 --num-samples 16 --out s.npy
    python workflows/sample.py --checkpoint runs:/<run_id>/student/ema_student.pt --steps 4 ...   # from MLflow
    python workflows/sample.py --checkpoint .cache/teachers/teacher-XXXX.pt --teacher --steps 50 --out t.npy
    python workflows/sample.py --checkpoint runs/wan/ema_student.pt --steps 4 --num-samples 2 \
        --prompt "a red kite over the sea" --decode --out kite.npy          # also kite.mp4 and kite.gif
    python workflows/sample.py --checkpoint runs/causal/ema_student.pt --causal --steps-per-chunk 4 2 \
        --num-samples 4 --out c.npy                                       # a block-causal student, streamed

Latents are written in the data set's own coordinates: a student trained on normalised latents (data.normalize,
the default) carries its data set's per-channel statistics and the normalisation is undone here. `--decode` turns
them into videos with the VAE the data set was encoded with (recorded in the checkpoint; `--encoders FOLDER` when
it moved): `<out>.mp4` (all samples in one grid) and `<out>.gif`. `--prompt` encodes the text with that data set's
umT5, padded as it was.

The checkpoint is a file written by `rcm_core.run.teacher.save_teacher` (the EMA student logged by every run, or a
cached teacher): it carries its model config, so no run config is needed. Students use the multistep
consistency sampler at `arctan σ_max` and the intermediate times `--mid-t`; `--teacher` solves the PF-ODE with
`--steps` Euler/Heun steps and `--guidance`. Class-conditional models sample labels 0, 1, 2, … in turn
(or `--label`); text-conditioned models take `--cond FILE.npy` ([L, D] or [K, L, D]).

`--causal` streams a block-causal student (Causal rCM, `model.causal`) chunk by chunk with a KV cache
(rcm_core.method.streaming): `--steps-per-chunk 4 2` (4 steps for the first chunk, 2 for every later one; default
`--steps` for all), `--mid-s "15/16,5/6,5/8;5/6"` (intermediate rectified-flow times s per chunk entry, `;` between
entries, the last repeating; default the official 4-step times), `--context clean|last_step` (re-encode each
finished chunk at t = 0, or keep its last step's keys/values: one forward fewer per chunk). It prints the time to
the first chunk and each chunk's latency. A longer `--latent-shape` T than the student was trained on extrapolates
(more chunks of the same pattern).
"""
from __future__ import annotations

import argparse
import sys
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rcm_core.config import ModelCfg, SamplerCfg, from_dict  # noqa: E402
from rcm_core.eval.video_samples import (  # noqa: E402
    decode,
    decoder_for,
    to_dataset_coordinates,
    write_videos,
)
from rcm_core.method.denoiser import TrigFlowDenoiser  # noqa: E402
from rcm_core.method.samplers import consistency_sample, teacher_sample  # noqa: E402
from rcm_core.method.streaming import RF_MID_S, stream_chunks  # noqa: E402
from rcm_core.method.trigflow import rf_to_trig  # noqa: E402
from rcm_core.networks import build_network, check_label_path  # noqa: E402
from rcm_core.run.teacher import checkpoint_model  # noqa: E402
from workflows.cli import UserError, add_debug_flag, run_cli  # noqa: E402


def local_path(uri: str) -> Path:
    """A local file, or an MLflow `runs:/` / `mlflow-artifacts:` URI downloaded through the tracking server."""
    if uri.startswith(("runs:/", "mlflow-artifacts:", "models:/")):
        import mlflow
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    path = Path(uri)
    if not path.is_file():
        raise UserError(f"--checkpoint {uri}: no such file (give the ema_student.pt of a run, a cached "
                                f"teacher, or a runs:/<id>/student/ema_student.pt URI)")
    return path


def load_model(path: Path, device: torch.device) -> TrigFlowDenoiser:
    return load_checkpoint(path, device)[0]


def load_checkpoint(path: Path, device: torch.device) -> tuple[TrigFlowDenoiser, dict | None]:
    """The model and its data set's card (None for checkpoints written before students carried one)."""
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:   # not a torch file at all, truncated, or holding pickled code (refused by weights_only)
        raise UserError(f"{path} is not a checkpoint (torch.load cannot read it: {type(e).__name__}); give the "
                        f"ema_student.pt of a run or a cached teacher .pt") from e
    if not isinstance(data, dict) or not {"net", "model", "parametrization"} <= set(data):
        keys = sorted(data)[:6] if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path} is not a model file from save_teacher ({keys}); run checkpoints "
                        f"(state.pt) hold the whole training state — use the run's ema_student.pt")
    try:
        check_label_path(data["net"], str(path))
    except ValueError as e:
        raise UserError(str(e)) from None
    cfg = from_dict({"model": checkpoint_model(data)}, str(path)).model
    net = build_network(cfg)
    net.load_state_dict(data["net"])
    return TrigFlowDenoiser(net, data["parametrization"]).to(device).eval(), data.get("data")


def conditions(model: ModelCfg, k: int, label: int | None, cond_file: str | None, prompt: list[str] | None = None,
               card: dict | None = None, encoders: str = "", endpoint: str = "") -> torch.Tensor:
    if model.num_classes > 0:
        return torch.full((k,), label, dtype=torch.long) if label is not None else torch.arange(k) % model.num_classes
    if prompt:
        return encode_prompts(prompt, k, card, encoders, endpoint)
    if cond_file is None:
        raise UserError("this model is text-conditioned: pass --prompt TEXT (data sets encoded with umT5) or "
                         "--cond FILE.npy with an embedding [L, D] or [K, L, D]")
    c = torch.from_numpy(np.load(cond_file)).float()
    return c.expand(k, *c.shape) if c.dim() == 2 else c


def encode_prompts(prompts: list[str], k: int, card: dict | None, encoders: str, endpoint: str) -> torch.Tensor:
    """Prompts → [K, L, D] with the data set's umT5 (prompt i for sample i, cycled), padded to its length."""
    from rcm_core.data.encoders import UMT5Text

    enc = (card or {}).get("encoder") or {}
    if not (encoders or enc.get("name") == "wan2.1"):
        raise UserError("--prompt needs a checkpoint whose data set was encoded by workflows/encode_videos.py, or "
                        "--encoders FOLDER (the Wan2.1 *-Diffusers folder)")
    length = enc.get("text_encoder", {}).get("max_length", 512)
    text = UMT5Text.load(encoders or enc["path"], device=torch.device("cpu"), max_length=length, endpoint=endpoint)
    return text.encode([prompts[i % len(prompts)] for i in range(k)])


def parse_mid_s(text: str) -> list[list[float]]:
    """"15/16,5/6,5/8;5/6" → TrigFlow intermediate times per chunk entry (RF s = σ/(1+σ), fractions allowed)."""
    try:
        return [[float(rf_to_trig(float(Fraction(v)))) for v in entry.split(",") if v.strip()]
                for entry in text.split(";")]
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--mid-s {text!r}: give RF times in (0, 1) as numbers or fractions, ',' within a chunk "
                        f"entry and ';' between entries, e.g. \"15/16,5/6,5/8;5/6\"") from None


def stream(model, z, cond, args, device, generator) -> torch.Tensor:
    """Chunk by chunk with the KV cache, printing the time to the first chunk and each chunk's latency."""
    if not getattr(model.net, "causal", False):
        raise UserError("--causal needs a block-causal student (a checkpoint trained with model.causal=true)")
    steps = args.steps_per_chunk or [args.steps]
    mid = parse_mid_s(args.mid_s)
    for n, m in zip(steps, mid + [mid[-1]] * len(steps)):
        if n - 1 > len(m):
            raise UserError(f"a {n}-step chunk needs {n - 1} intermediate times; --mid-s gives {len(m)} ({args.mid_s})")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    chunks, latency = [], []
    sync()
    start = time.perf_counter()
    for chunk in stream_chunks(model, z, cond, steps_per_chunk=steps, mid_t_per_chunk=mid,
                               sigma_max=args.sigma_max, context=args.context, last_step_from=args.last_step_from,
                               generator=generator):
        sync()
        latency.append(time.perf_counter() - start - sum(latency))
        chunks.append(chunk)
    print(f"time to first chunk: {latency[0] * 1e3:.1f} ms; per-chunk latency (ms): "
          + " ".join(f"{t * 1e3:.1f}" for t in latency) + f" ({len(chunks)} chunks, context={args.context})")
    return torch.cat(chunks, dim=2)


def main(argv: list[str] | None = None) -> int:
    d = SamplerCfg()
    ap = argparse.ArgumentParser(description="Sample latents from a distilled student or a teacher.")
    ap.add_argument("--checkpoint", required=True, help="ema_student.pt / teacher .pt, or an MLflow runs:/ URI")
    ap.add_argument("--steps", type=int, required=True, help="student steps (1-4) or teacher ODE steps")
    ap.add_argument("--num-samples", type=int, required=True)
    ap.add_argument("--out", required=True, help="output .npy, [K, C, T, H, W] float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", action="store_true", help="sample with the teacher's ODE solver")
    ap.add_argument("--latent-shape", type=int, nargs=4, metavar=("C", "T", "H", "W"), default=None,
                    help="latent shape (default: [in_channels, 1, 1, 1] for vector models, required for the DiT)")
    ap.add_argument("--sigma-max", type=float, default=d.sigma_max)
    ap.add_argument("--mid-t", type=float, nargs="*", default=d.mid_t)
    ap.add_argument("--guidance", type=float, default=1.0, help="teacher CFG scale (students have it baked in)")
    ap.add_argument("--solver", choices=["euler", "heun"], default="heun")
    ap.add_argument("--label", type=int, default=None)
    ap.add_argument("--cond", default=None, help=".npy text embedding for text-conditioned models")
    ap.add_argument("--prompt", nargs="+", default=None, help="text prompt(s), encoded with the data set's umT5")
    ap.add_argument("--decode", action="store_true", help="also write <out>.mp4 and <out>.gif through the data "
                    "set's VAE decoder")
    ap.add_argument("--encoders", default="", help="Wan2.1 *-Diffusers folder (local or s3://) when it is not where "
                    "the data set was encoded from")
    ap.add_argument("--s3-endpoint", default="", help="S3 endpoint for s3:// encoder folders "
                    "(default: AWS_ENDPOINT_URL)")
    ap.add_argument("--causal", action="store_true", help="stream a block-causal student chunk by chunk with a KV "
                    "cache, printing the time to the first chunk and each chunk's latency")
    ap.add_argument("--steps-per-chunk", type=int, nargs="+", default=None,
                    help="--causal: steps per chunk, the last repeating (e.g. 4 2); default --steps for every chunk")
    ap.add_argument("--mid-s", default=",".join(str(Fraction(s).limit_denominator(64)) for s in RF_MID_S),
                    help="--causal: intermediate RF times per chunk entry, ',' within and ';' between entries, the "
                    "last repeating (default: the official 4-step times 15/16,5/6,5/8)")
    ap.add_argument("--context", choices=["clean", "last_step"], default="clean",
                    help="--causal: context cached after each chunk (clean = re-encoded at t = 0, one more forward)")
    ap.add_argument("--last-step-from", type=int, default=0, help="--causal --context last_step: from this chunk on "
                    "(earlier chunks clean; the official 2-step noisy-context preset uses 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.num_samples < 1:
        ap.error(f"--steps={args.steps} and --num-samples={args.num_samples} must be ≥ 1")
    if not args.teacher and not args.causal and args.steps - 1 > len(args.mid_t):
        ap.error(f"a {args.steps}-step student needs {args.steps - 1} intermediate times; --mid-t has {args.mid_t}")
    device = torch.device(args.device)
    model, card = load_checkpoint(local_path(args.checkpoint), device)
    mcfg = model.net.cfg
    shape = args.latent_shape or ([mcfg.in_channels, 1, 1, 1] if mcfg.kind == "mlp" else None) or (
        card and card["latent_shape"])
    if shape is None:
        ap.error("--latent-shape C T H W is required for video models whose checkpoint carries no data set card")
    if args.decode and not (card and (args.encoders or (card.get("encoder") or {}).get("name") == "wan2.1")):
        ap.error("--decode needs a checkpoint whose data set was encoded by the Wan2.1 VAE "
                 "(workflows/encode_videos.py), or --encoders FOLDER")
    g = torch.Generator(device=device).manual_seed(args.seed)
    z = torch.randn(args.num_samples, *shape, generator=g, device=device)
    cond = conditions(mcfg, args.num_samples, args.label, args.cond, args.prompt, card, args.encoders,
                      args.s3_endpoint).to(device)
    if args.causal and args.teacher:
        ap.error("--causal streams a distilled student; drop --teacher")
    if args.causal:
        x = stream(model, z, cond, args, device, g)
    elif args.teacher:
        x = teacher_sample(model, z, cond, steps=args.steps, guidance=args.guidance, solver=args.solver)
    else:
        x = consistency_sample(model, z, cond, steps=args.steps, sigma_max=args.sigma_max, mid_t=args.mid_t,
                               generator=g)
    x = to_dataset_coordinates(x.float().cpu(), card)          # the data set's own coordinates
    np.save(args.out, x.numpy())
    print(f"wrote {args.out}: {tuple(x.shape)} float32 ({'teacher' if args.teacher else 'student'}, "
          f"{args.steps} steps)")
    if args.decode:
        vae = decoder_for(card, path=args.encoders, endpoint=args.s3_endpoint, device=device)
        videos = decode(x, vae)
        for path in write_videos(videos, Path(args.out).with_suffix(""), fps=int(card["encoder"].get("fps", 16))):
            print(f"wrote {path}: {videos.shape[0]} video(s) of {videos.shape[1]} frames {videos.shape[2]}×"
                  f"{videos.shape[3]}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
