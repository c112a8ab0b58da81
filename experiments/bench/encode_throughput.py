"""Encoding throughput per GPU for the clips → latents pipeline (workflows/encode_videos.py), split by stage:
decode + fit (PyAV, one CPU process), Wan2.1 VAE encode, umT5-XXL encode. Random-initialised real-size models
(diffusers AutoencoderKLWan defaults = the Wan2.1 VAE; umT5-XXL's encoder config), nothing downloaded.

    python experiments/bench/encode_throughput.py                              # 480×832×81, bf16, cuda, 8 clips
    python experiments/bench/encode_throughput.py --memory-clips 100 --memory-every 10   # VAE memory over time
    python experiments/bench/encode_throughput.py --tiny --device cpu --clips 2     # the CPU proof (seconds)

Prints one table: per stage the milliseconds per clip, clips/s, mean GPU utilisation while it ran (nvidia-smi,
sampled every 0.1 s) and peak GPU memory; then what bounds one encoding GPU and how many training GPUs it keeps fed
at a given training time per sample (`--train-seconds-per-sample`, 7 s for a 1.3B rCM iteration per sample).
With `--memory-clips N` it then runs the VAE on N more clips, printing allocated GPU memory and the process's
RSS every `--memory-every` clips (the VAE stage alone; the whole Ray pipeline's memory is not measured here).

Text is timed on token ids of `--tokens` real tokens padded to 512 (tokenising is microseconds, and the umT5
tokenizer cannot be downloaded here); the clip is a synthetic H.264 file written once (`--source-size`, 2 s longer
than needed), decoded from disk each time as the pipeline decodes from a file object.

On the GPU machine (Python 3.12, torch, numpy, pyyaml, fsspec; no av, diffusers or transformers; no network), carry
the `video` extra as one 48.5 MiB bundle, built here (shared/reference/gpu_ray.md's recipe, other packages):

    mkdir -p .gpu && cd "$(mktemp -d)"
    python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d . \
      av==18.1.0 diffusers==0.42.1 transformers==5.23.0          # 41 wheels with their dependencies
    rm numpy-*.whl pyyaml-*.whl fsspec-*.whl                      # the GPU image has these
    mkdir site && for w in *.whl; do unzip -q -o "$w" -d site; done
    tar -C site -cf - . | xz -T2 -6 > "$OLDPWD/.gpu/video-site.tar.xz"   # 263 MB unpacked, 48.5 MiB packed

and run, with `carry: [".gpu"]`:

    mkdir -p /tmp/vsite && tar -C /tmp/vsite -xJf .gpu/video-site.tar.xz && export PYTHONPATH=/tmp/vsite && \
    python experiments/bench/encode_throughput.py --clips 8 && \
    python experiments/bench/encode_throughput.py --clips 2 --memory-clips 60 --memory-every 10
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
UMT5_TINY = dict(UMT5_XXL, vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
VAE_TINY = dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1)


class GpuSampler:
    """Mean GPU utilisation (%) between start() and stop(), from nvidia-smi every 0.1 s; None without a GPU."""

    def __init__(self, device: torch.device):
        self.on = device.type == "cuda"
        self.index = device.index or 0

    def start(self) -> None:
        self.samples: list[float] = []
        self.running = self.on
        if self.on:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", str(self.index)], capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            time.sleep(0.1)

    def stop(self) -> float | None:
        if not self.on:
            return None
        self.running = False
        self.thread.join()
        return float(np.mean(self.samples)) if self.samples else None


def rss_gib() -> float:
    """The process's resident memory now (not the peak), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n: int, device: torch.device, sampler: GpuSampler, warmup: int) -> tuple[float, float | None, float]:
    """(seconds per call, mean GPU %, peak GPU GiB) over n calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampler.start()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    sec = (time.perf_counter() - t0) / n
    util = sampler.stop()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return sec, util, peak


VAE_VARIANTS = ("default", "cudnn_benchmark", "channels_last", "compile")


def _vae_variant(vae, variant: str, device: torch.device):
    """The encode call of one variant of the same VAE: cuDNN's benchmark mode (it times the conv3d algorithms
    once per shape; the Wan VAE is ~all conv3d), channels-last-3d weights and inputs, or the encoder compiled
    (diffusers' encode loops over frame chunks with a feature cache, so expect graph breaks)."""
    torch.backends.cudnn.benchmark = variant == "cudnn_benchmark"      # one lever per row
    fmt = torch.channels_last_3d if variant == "channels_last" else torch.contiguous_format
    _conv3d_format(vae, fmt)
    encoder = torch.compile(vae.encode) if variant == "compile" else vae.encode
    return lambda x: encoder(x.contiguous(memory_format=fmt)).latent_dist.mode()


def _conv3d_format(vae, fmt: torch.memory_format) -> None:
    """The 5-D (conv3d) weights in `fmt`; Module.to(memory_format=channels_last_3d) also converts the VAE's 4-D conv2d
    weights, which refuse the 3-D format."""
    for p in vae.parameters():
        if p.dim() == 5:
            p.data = p.data.contiguous(memory_format=fmt)


def bench_vae(args: argparse.Namespace, pixels: np.ndarray, device: torch.device, dtype: torch.dtype,
              sampler: GpuSampler) -> list[tuple]:
    """The Wan2.1 VAE (diffusers defaults = the released config) encoding one fitted clip per call, one row per
    `--vae-variants` entry; each variant's latent is checked against the default's before it is timed."""
    from diffusers import AutoencoderKLWan

    from rcm_core.data.clips import to_unit_range

    with device:
        vae = AutoencoderKLWan(**(VAE_TINY if args.tiny else {})).to(dtype).eval().requires_grad_(False)
    x = to_unit_range(torch.from_numpy(pixels)[None].to(device, torch.float32)).to(dtype)
    rows = []
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        for variant in args.vae_variants.split(","):
            try:
                enc = _vae_variant(vae, variant, device)
                err = ((enc(x).float() - z.float()).abs().max() / z.float().abs().max()).item()
                name = "Wan2.1 VAE encode" + ("" if variant == "default" else f" ({variant}, max rel diff {err:.1e})")
                rows.append((name, *timed(lambda: enc(x), args.clips, device, sampler, args.warmup)))
            except Exception as e:          # a variant that cannot run here is a finding, printed, not a stop
                print(f"VAE variant {variant}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            finally:
                torch.backends.cudnn.benchmark = False
                _conv3d_format(vae, torch.contiguous_format)
        if args.memory_clips:
            rss0 = rss_gib()
            for i in range(1, args.memory_clips + 1):
                vae.encode(x).latent_dist.mode()
                if i % args.memory_every == 0:
                    sync(device)
                    gpu = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
                    print(f"  memory after {i} clips: GPU allocated {gpu:.2f} GiB, RSS {rss_gib():.2f} GiB "
                          f"(start {rss0:.2f})", flush=True)
    print(f"latent {tuple(z.shape[1:])}, VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M parameters",
          flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--source-size", type=int, nargs=2, default=[720, 1280], metavar=("H", "W"),
                    help="the synthetic clip's own size (fitted to --height × --width like a real clip)")
    ap.add_argument("--clips", type=int, default=8, help="timed clips per stage")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--vae-variants", default="default",
                    help=f"comma-separated VAE encode variants to time, from {', '.join(VAE_VARIANTS)}")
    ap.add_argument("--text-batch", type=int, default=8, help="captions per umT5 call")
    ap.add_argument("--tokens", type=int, default=120, help="real tokens per caption (the rest is padding to 512)")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--train-seconds-per-sample", type=float, default=7.0)
    ap.add_argument("--memory-clips", type=int, default=0, help="after timing, run the VAE on this many more clips…")
    ap.add_argument("--memory-every", type=int, default=10, help="…printing GPU memory and RSS every K of them")
    ap.add_argument("--tiny", action="store_true", help="tiny models and 9×32×32 clips: proves the script on CPU")
    args = ap.parse_args(argv)
    if args.tiny:
        args.frames, args.height, args.width, args.source_size, args.text_len = 9, 32, 32, [48, 64], 16
        args.tokens = min(args.tokens, 8)

    from transformers import UMT5Config, UMT5EncoderModel

    from rcm_core.data.clips import decode_frames, fit_clip, write_mp4

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sampler = GpuSampler(device)
    torch.manual_seed(0)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {dtype}, "
          f"clips {args.frames}×{args.height}×{args.width} from {args.source_size[0]}×{args.source_size[1]}, "
          f"torch {torch.__version__}", flush=True)

    # 1. decode + fit, from a file on disk
    with tempfile.TemporaryDirectory() as tmp:
        h, w = args.source_size
        t = args.frames + 32
        rng = np.random.default_rng(0)
        base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        video = np.stack([np.roll(base, 4 * i, axis=1) for i in range(t)])       # textured, moving: real work
        clip = write_mp4(video, Path(tmp) / "clip.mp4", fps=16)
        del video
        decode = lambda: fit_clip(decode_frames(str(clip), args.frames), frames_out=args.frames,  # noqa: E731
                                  height=args.height, width=args.width)
        pixels = decode()
        rows = [("decode + fit (1 CPU process)", *timed(decode, args.clips, torch.device("cpu"), GpuSampler(
            torch.device("cpu")), args.warmup))]

    # 2. VAE (in a function: its activations and weights are freed before umT5 is built)
    vae_rows = bench_vae(args, pixels, device, dtype, sampler)
    rows += vae_rows
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 3. umT5 (XXL encoder: 24 layers, d_model 4096), a batch of captions per call
    cfg = UMT5Config(**(UMT5_TINY if args.tiny else UMT5_XXL))
    with device:
        text = UMT5EncoderModel(cfg).to(dtype).eval().requires_grad_(False)
    b, n_tok = args.text_batch, args.tokens
    ids = torch.zeros(b, args.text_len, dtype=torch.long, device=device)
    ids[:, :n_tok] = torch.randint(2, cfg.vocab_size, (b, n_tok), device=device)
    mask = (torch.arange(args.text_len, device=device)[None] < n_tok).long().expand(b, -1)
    with torch.no_grad():
        sec, util, peak = timed(lambda: text(ids, mask).last_hidden_state, args.clips, device, sampler, args.warmup)
    rows.append((f"umT5 encode (batch {b}, {n_tok}/{args.text_len} tokens)", sec / b, util, peak))
    print(f"umT5 {sum(p.numel() for p in text.parameters()) / 1e9:.2f} B parameters", flush=True)

    print("\n| stage | ms / clip | clips / s | GPU util % | peak GPU GiB |\n|---|---:|---:|---:|---:|")
    for name, sec, util, peak in rows:
        print(f"| {name} | {sec * 1e3:.1f} | {1 / sec:.2f} | {'-' if util is None else f'{util:.0f}'} | "
              f"{'-' if peak != peak else f'{peak:.1f}'} |")
    if not vae_rows:
        raise SystemExit(f"no VAE variant of --vae-variants={args.vae_variants} ran (their errors are above)")
    vae_best = min(vae_rows, key=lambda r: r[1])          # the fastest variant that ran
    gpu_sec = vae_best[1] + rows[-1][1]
    per_gpu = 1 / gpu_sec
    cores = rows[0][1] * per_gpu
    bound = "VAE" if vae_best[1] > rows[-1][1] else "umT5"
    print(f"\none encoding GPU: {per_gpu:.2f} clips/s ({vae_best[0]} + umT5 on the same GPU; {bound} dominates), "
          f"needs {cores:.1f} CPU cores of decoding to stay fed; keeps {per_gpu * args.train_seconds_per_sample:.1f} "
          f"training GPUs fed at {args.train_seconds_per_sample:g} s per sample (target ≥ 8)")
    print(f"command: python experiments/bench/encode_throughput.py {' '.join(argv or sys.argv[1:])}  "
          f"(pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
