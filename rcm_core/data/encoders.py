"""The Wan2.1 encoders: the video VAE (diffusers `AutoencoderKLWan`) and the umT5 text encoder (transformers
`UMT5EncoderModel` + its tokenizer), loaded from a released folder on local disk or `s3://`.

    from rcm_core.data.encoders import WanVAE, UMT5Text
    vae = WanVAE.load("Wan2.1-T2V-1.3B-Diffusers", device=torch.device("cuda"), dtype=torch.bfloat16)
    z = vae.encode(video_uint8)          # [B, 3, T, H, W] uint8 → float32 [B, 16, 1 + (T−1)/4, H/8, W/8]
    x = vae.decode(z)                    # → float32 [B, 3, T, H, W] in [-1, 1]
    text = UMT5Text.load("Wan2.1-T2V-1.3B-Diffusers", device=..., dtype=..., max_length=512)
    cond = text.encode(["a cat on a sofa"])   # float32 [B, 512, 4096], zero after each caption's tokens

The folder is the layout Wan2.1-T2V-*-Diffusers is released in: `vae/` (config.json + safetensors),
`text_encoder/` and `tokenizer/`; `WanVAE.load` and `UMT5Text.load` also take a component's own folder.
`s3://…` components are copied once into `.cache/encoders/<hash of the URL>/` (the VAE actor copies vae/ only)
and loaded from there. Nothing is downloaded from a model hub: `from_pretrained` is only given local folders.

Latents are the VAE posterior's mean (`latent_dist.mode()`), unscaled: the data set's manifest holds the
per-channel statistics readers normalise with (workflows/encode_videos.py), and `WanVAE.decode` takes latents in
these raw coordinates. Text follows Wan's
pipeline (`WanPipeline._get_t5_prompt_embeds`): tokens padded to `max_length`, the encoder run with the attention
mask, and the outputs after each caption's last token set to zero. Pure PyTorch; nothing here imports ray.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CACHE = Path(".cache", "encoders")
# The released Wan2.1-T2V-*-Diffusers folder: component sub-folder and the file that marks it.
COMPONENTS = (("vae", "config.json"), ("text_encoder", "config.json"), ("tokenizer", "tokenizer_config.json"))


def local_folder(url: str, *, endpoint: str = "", cache: str | Path | None = None) -> Path:
    """A local folder holding `url`'s files: the folder itself, or an `s3://` (any fsspec URL) folder copied once
    into `cache` (default `.cache/encoders`). The copy is made aside and renamed, so a half-copied folder is never
    loaded, and two processes copying at once both end up with the one copy."""
    if "://" not in url or url.startswith("file://"):
        path = Path(url.removeprefix("file://"))
        if not path.is_dir():
            raise FileNotFoundError(f"encoder folder {url} does not exist (give the released Wan2.1 *-Diffusers "
                                    f"folder with vae/, text_encoder/, tokenizer/)")
        return path
    from rcm_core.data.latents import filesystem

    target = Path(cache or CACHE).resolve() / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    if target.is_dir():
        return target
    fs, root = filesystem(url, endpoint)
    if not fs.exists(root):
        raise FileNotFoundError(f"encoder folder {url} does not exist")
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    for remote in fs.find(root):
        dest = tmp / remote[len(root):].lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get(remote, str(dest))
    try:
        tmp.replace(target)
    except OSError:                       # another process renamed its copy first
        if not target.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def component(url: str, sub: str, marker: str, *, endpoint: str = "") -> str:
    """`url/sub` in the released layout, or `url` itself when it is that component (holds `marker`)."""
    from rcm_core.data.latents import filesystem

    fs, root = filesystem(url, endpoint)
    if fs.exists(f"{root}/{sub}/{marker}"):
        return f"{url.rstrip('/')}/{sub}"
    if fs.exists(f"{root}/{marker}"):
        return url
    raise FileNotFoundError(f"{url}: no {sub}/{marker} (expected the Wan2.1 *-Diffusers layout: vae/, "
                            f"text_encoder/, tokenizer/)")


def fingerprint(url: str, *, endpoint: str = "") -> str:
    """Which weights these are, cheaply and without copying them: every file's relative name and size, and the
    bytes of its small JSON files (hashing 11 GB of umT5-XXL weights per run would take minutes). The same value
    for a folder and its copy in a bucket."""
    from rcm_core.data.latents import filesystem

    fs, root = filesystem(url, endpoint)
    h = hashlib.sha256()
    for path, info in sorted(fs.find(root, detail=True).items()):
        rel = path[len(root):].lstrip("/")
        h.update(f"{rel}:{info['size']}\n".encode())
        if rel.endswith(".json") and info["size"] < 2**20:
            h.update(fs.cat_file(path))
    return h.hexdigest()[:16]


def read_configs(url: str, *, endpoint: str = "") -> dict:
    """The released folder's component configs and fingerprints, read in place (a few small files, no weights):
    what the driver needs to plan the data set before any actor loads a model."""
    from rcm_core.data.latents import filesystem

    fs, root = filesystem(url, endpoint)
    out = {}
    for sub, marker in COMPONENTS:
        where = f"{root}/{sub}"
        if not fs.exists(f"{where}/{marker}"):
            raise FileNotFoundError(f"{url}: no {sub}/{marker} (expected the Wan2.1 *-Diffusers layout: vae/, "
                                    f"text_encoder/, tokenizer/)")
        out[sub] = {"config": json.loads(fs.cat_file(f"{where}/{marker}")),
                    "version": fingerprint(f"{url.rstrip('/')}/{sub}", endpoint=endpoint)}
    return out


def vae_latent_shape(vae_config: dict, frames: int, height: int, width: int) -> list[int]:
    """[C, t, h, w] of a clip through AutoencoderKLWan with this config: causal in time (the first frame alone,
    then groups of 2^(temporal downsamplings)), 2^(levels − 1) in space."""
    st = 2 ** sum(bool(d) for d in vae_config.get("temperal_downsample", [False, True, True]))
    ss = 2 ** (len(vae_config.get("dim_mult", [1, 2, 4, 4])) - 1)
    if (frames - 1) % st or height % ss or width % ss:
        raise ValueError(f"the Wan VAE needs frames = 1 + {st}k and height, width multiples of {ss}; got {frames} "
                         f"frames of {height}×{width}")
    return [int(vae_config.get("z_dim", 16)), 1 + (frames - 1) // st, height // ss, width // ss]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" = bfloat16 on CUDA (as Wan runs), float32 elsewhere (CPU bf16 convolutions are slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class WanVAE:
    """AutoencoderKLWan with uint8-in / float32-out helpers."""

    def __init__(self, model: Any, *, device: torch.device, dtype: torch.dtype, url: str = "", compile: bool = False):
        self.model, self.device, self.dtype, self.url = model, device, dtype, url
        # The encoder compiled (data.video.vae_compile): the VAE is the whole cost of encoding a clip, and compiled
        # it took 753 instead of 1,122 ms per 81×480×832 clip on an H200 (docs/BENCHMARKS.md, issue 26).
        self._encode = torch.compile(model.encode) if compile else model.encode

    @classmethod
    def load(cls, url: str, *, device: torch.device, dtype: torch.dtype | None = None, endpoint: str = "",
             cache: str | Path | None = None, compile: bool = False) -> WanVAE:
        from diffusers import AutoencoderKLWan

        folder = local_folder(component(url, "vae", "config.json", endpoint=endpoint), endpoint=endpoint, cache=cache)
        dtype = dtype or resolve_dtype("auto", device)
        model = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype).to(device).eval()
        return cls(model.requires_grad_(False), device=device, dtype=dtype, url=url, compile=compile)

    @torch.no_grad()
    def encode(self, video: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, T, H, W] → posterior mean float32 [B, C, t, h, w] (on the CPU)."""
        from rcm_core.data.clips import to_unit_range

        x = to_unit_range(torch.as_tensor(video).to(self.device, torch.float32)).to(self.dtype)
        return self._encode(x).latent_dist.mode().float().cpu()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """float [B, C, t, h, w] in the VAE's raw coordinates → pixels float32 [B, 3, T, H, W] in [-1, 1]."""
        x = self.model.decode(latent.to(self.device, self.dtype)).sample
        return x.float().clamp(-1, 1).cpu()


class UMT5Text:
    """umT5 encoder + tokenizer, padded and masked as Wan2.1 encodes prompts."""

    def __init__(self, model: Any, tokenizer: Any, *, device: torch.device, dtype: torch.dtype, max_length: int,
                 url: str = ""):
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        self.max_length, self.url = max_length, url

    @classmethod
    def load(cls, url: str, *, device: torch.device, dtype: torch.dtype | None = None, max_length: int = 512,
             endpoint: str = "", cache: str | Path | None = None) -> UMT5Text:
        from transformers import AutoTokenizer, UMT5EncoderModel

        enc_dir, tok_dir = (local_folder(component(url, sub, marker, endpoint=endpoint), endpoint=endpoint, cache=cache)
                            for sub, marker in COMPONENTS[1:])
        dtype = dtype or resolve_dtype("auto", device)
        model = UMT5EncoderModel.from_pretrained(str(enc_dir), dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        return cls(model.requires_grad_(False), tokenizer, device=device, dtype=dtype, max_length=max_length,
                   url=url)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """Captions → float32 [B, max_length, D] (on the CPU), zero after each caption's last token (its EOS)."""
        tok = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        out = self.model(ids, mask).last_hidden_state.float()
        return (out * mask[..., None].to(out.dtype)).cpu()


def describe_encoders(url: str, configs: dict, *, dtype: str, frames: int, height: int, width: int, text_len: int,
                      fps: int) -> dict:
    """The manifest's `encoder` entry: which weights turned clips into these rows (path and fingerprint per
    component), in which dtype, at which size; enough for `sample.py` and the evaluation to decode them again."""
    vae, text = configs["vae"]["config"], configs["text_encoder"]["config"]
    return {"name": "wan2.1", "path": url, "dtype": dtype, "frames": frames, "height": height, "width": width,
            "fps": fps, "pixel_range": [-1.0, 1.0],
            "vae": {"class": "diffusers.AutoencoderKLWan", "version": configs["vae"]["version"],
                    "z_dim": vae.get("z_dim", 16), "latent": "posterior mean, unscaled"},
            "text_encoder": {"class": "transformers.UMT5EncoderModel", "version": configs["text_encoder"]["version"],
                             "tokenizer_version": configs["tokenizer"]["version"], "d_model": text.get("d_model"),
                             "max_length": text_len, "padding": "max_length, zero after the last token"}}
