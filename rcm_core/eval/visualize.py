"""Pictures of samples: a PNG grid of images or video frames, and one GIF of a grid of videos (Pillow only).

    python -c "import numpy as np; from rcm_core.eval.visualize import save_grid_png, save_gif; \
v = np.random.rand(4, 8, 32, 32); save_grid_png(v, '/tmp/grid.png'); save_gif(v, '/tmp/grid.gif')"

Accepted layouts (values in `value_range`, default [0, 1]; numpy arrays or torch tensors):
    [N, H, W]            N grey images                 → a grid of N tiles
    [N, C, H, W], C∈1,3  N images                      → a grid of N tiles
    [N, T, H, W]         N grey videos (T not 1 or 3)  → PNG: one row per video, one column per frame
    [N, C, T, H, W]      N videos (C = 1 or 3)         → same; C ≠ 1, 3 shows channel 0 (latents)
Pass `layout="videos"` or `layout="images"` where a 4-D shape is ambiguous.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np

Layout = Literal["auto", "images", "videos"]


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _to_videos(x: Any, layout: Layout) -> tuple[np.ndarray, bool]:
    """→ (array [N, T, H, W, 3] float in input units, is_video)."""
    x = _as_numpy(x)
    if x.ndim == 3:
        return np.repeat(x[:, None, :, :, None], 3, -1), False
    if x.ndim == 4:
        is_video = layout == "videos" or (layout == "auto" and x.shape[1] not in (1, 3))
        if is_video:
            return np.repeat(x[..., None], 3, -1), True
        return _channels_last(x[:, :, None]), False                     # [N, C, 1, H, W]
    if x.ndim == 5:
        return _channels_last(x), True
    raise ValueError(f"cannot draw an array of shape {x.shape}; see rcm_core/eval/visualize.py for layouts")


def _channels_last(x: np.ndarray) -> np.ndarray:          # [N, C, T, H, W] → [N, T, H, W, 3]
    c = x.shape[1]
    rgb = x if c == 3 else np.repeat(x[:, :1], 3, 1)      # grey or latent channels → show channel 0
    return rgb.transpose(0, 2, 3, 4, 1)


def _to_uint8(x: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    lo, hi = value_range
    return (np.clip((x - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)


def _tile(tiles: np.ndarray, ncol: int, pad: int) -> np.ndarray:
    """[K, H, W, 3] → one image with `ncol` columns and `pad` white pixels between tiles."""
    k, h, w, _ = tiles.shape
    nrow = math.ceil(k / ncol)
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(k):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = tiles[i]
    return out


def _upscale(img: np.ndarray, scale: int) -> np.ndarray:
    return img.repeat(scale, 0).repeat(scale, 1) if scale > 1 else img


def save_grid_png(frames_or_images: Any, path: str | Path, *, ncol: int | None = None, scale: int = 2,
                  pad: int = 1, value_range: tuple[float, float] = (0.0, 1.0), layout: Layout = "auto") -> Path:
    """Images → a near-square grid; videos → one row per video with its frames left to right."""
    from PIL import Image

    x, is_video = _to_videos(frames_or_images, layout)
    x = _to_uint8(x, value_range)
    n, t = x.shape[:2]
    if is_video:
        grid = _tile(x.reshape(n * t, *x.shape[2:]), ncol or t, pad)
    else:
        grid = _tile(x[:, 0], ncol or math.ceil(math.sqrt(n)), pad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_upscale(grid, scale)).save(path)
    return path


def save_gif(videos: Any, path: str | Path, *, ncol: int | None = None, scale: int = 2, pad: int = 1, fps: int = 4,
             value_range: tuple[float, float] = (0.0, 1.0)) -> Path:
    """Videos [N, T, H, W] or [N, C, T, H, W] → one looping GIF whose frame t is the grid of every video's frame t."""
    from PIL import Image

    x, _ = _to_videos(videos, "videos")
    x = _to_uint8(x, value_range)
    n, t = x.shape[:2]
    ncol = ncol or math.ceil(math.sqrt(n))
    frames = [Image.fromarray(_upscale(_tile(x[:, i], ncol, pad), scale)) for i in range(t)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path


# ----------------------------------------------------------------------------------------------------------
# Labelled comparison: one column per sampler (teacher, 1/2/4-step students), one row per sample


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)          # Pillow ≥ 10.1 with FreeType: scalable
    except TypeError:
        return ImageFont.load_default()


def labelled_grid(cells: list[list[np.ndarray]], *, row_names: list[str], col_names: list[str], title: str,
                  pad: int = 6, font_size: int = 14):
    """A PIL image: `title` on top, `col_names` above the columns, `row_names` left of the rows; cells[r][c] is a
    uint8 [H, W, 3] picture (all of one size)."""
    from PIL import Image, ImageDraw

    h, w = cells[0][0].shape[:2]
    font, head = _font(font_size), _font(font_size + 2)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda s, f=font: int(probe.textlength(s, font=f))   # noqa: E731
    left = max(text_w(n) for n in row_names) + 2 * pad if any(row_names) else pad
    line = font_size + pad
    width = max(left + len(col_names) * (w + pad) + pad, text_w(title, head) + 2 * pad)
    top = 2 * line + pad
    img = Image.new("RGB", (width, top + len(cells) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad // 2), title, fill="black", font=head)
    for c, name in enumerate(col_names):
        x = left + c * (w + pad)
        draw.text((x + max(0, (w - text_w(name)) // 2), line + pad // 2), name, fill="black", font=font)
    for r, row in enumerate(cells):
        y = top + r * (h + pad)
        draw.text((pad, y + max(0, (h - font_size) // 2)), row_names[r], fill="black", font=font)
        for c, cell in enumerate(row):
            img.paste(Image.fromarray(cell), (left + c * (w + pad), y))
    return img


def save_comparison(columns: dict[str, Any], path: str | Path, *, row_names: list[str], title: str,
                    scale: int = 2, fps: int = 4, value_range: tuple[float, float] = (0.0, 1.0)) -> list[Path]:
    """Samplers side by side on the same rows (same noise, same label): `columns` maps a column name to videos
    [N, T, H, W] (or [N, C, T, H, W]) or images [N, H, W]. PNG: each cell is the row's frames left to right; for
    videos also a GIF (same path, .gif) whose frame t shows every cell's frame t."""
    arrays = {name: _to_uint8(_to_videos(x, "videos" if _as_numpy(x).ndim >= 4 else "images")[0], value_range)
              for name, x in columns.items()}
    n, t = next(iter(arrays.values())).shape[:2]
    strip = lambda v: _upscale(_tile(v, v.shape[0], 1), scale)        # noqa: E731  [T, H, W, 3] → one row
    grid = lambda pick: labelled_grid([[pick(v[i]) for v in arrays.values()] for i in range(n)],  # noqa: E731
                                      row_names=row_names, col_names=list(arrays), title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(strip).save(path)
    out = [path]
    if t > 1:
        frames = [grid(lambda v, i=i: _upscale(_tile(v[i:i + 1], 1, 1), scale)) for i in range(t)]
        gif = path.with_suffix(".gif")
        frames[0].save(gif, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
        out.append(gif)
    return out
