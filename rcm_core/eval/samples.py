"""Pictures of samples per step count: scatter plots for vector toys, frame grids and GIFs for video latents.

Written beside every evaluation and logged to MLflow as `samples/nfe_<N>.png` (and `.gif` for video, `.mp4` for
data sets encoded by the Wan2.1 VAE); the run's comparison figure (teacher and students side by side,
`comparison/samples.png` / `.gif`) is `save_comparison_figure`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rcm_core.data.latents import Manifest
from rcm_core.eval.visualize import save_gif, save_grid_png

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def scatter_image(points: torch.Tensor, *, labels: torch.Tensor | None = None, size: int = 320,
                  extent: float = 2.0) -> np.ndarray:
    """First two coordinates of [N, D, ...] samples as coloured dots on a white square of ±extent: uint8 [H, W, 3]."""
    from PIL import Image, ImageDraw

    xy = points.reshape(points.shape[0], -1)[:, :2].double().numpy()
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    draw.line([(size // 2, 0), (size // 2, size)], fill=(230, 230, 230))
    draw.line([(0, size // 2), (size, size // 2)], fill=(230, 230, 230))
    draw.rectangle([0, 0, size - 1, size - 1], outline=(200, 200, 200))
    pix = (xy / (2 * extent) + 0.5) * size
    for i, (u, v) in enumerate(pix):
        color = PALETTE[int(labels[i]) % len(PALETTE)] if labels is not None else (0, 0, 0)
        draw.ellipse([u - 1.5, size - v - 1.5, u + 1.5, size - v + 1.5], fill=color)
    return np.asarray(img)


def scatter_png(points: torch.Tensor, path: Path, *, labels: torch.Tensor | None = None, size: int = 320,
                extent: float = 2.0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scatter_image(points, labels=labels, size=size, extent=extent)).save(path)
    return path


def save_sample_pictures(samples: dict[str, torch.Tensor], manifest: dict | Manifest | None, out_dir: Path,
                         *, labels: torch.Tensor | None = None, max_items: int = 16, normalized: bool = True,
                         endpoint: str = "") -> list[Path]:
    """One picture per sample set (name → [N, C, T, H, W]); decoded to pixels when the data set's codec allows.
    Data sets encoded by the Wan2.1 VAE are decoded by it into PNG, GIF and MP4 (rcm_core/eval/video_samples.py)."""
    m = Manifest(**manifest) if isinstance(manifest, dict) else manifest
    if m is not None and (m.encoder or {}).get("name") == "wan2.1":
        from rcm_core.eval.video_samples import data_card, save_decoded_samples
        return save_decoded_samples(samples, data_card(m, normalized=normalized), out_dir, endpoint=endpoint)
    paths = []
    for name, x in samples.items():
        if x[0].numel() <= 16 and x.shape[2:] == (1, 1, 1):          # a vector toy: scatter plot
            paths.append(scatter_png(x, out_dir / f"{name}.png", labels=labels))
            continue
        frames = _pixels(x[:max_items], m)
        paths.append(save_grid_png(frames, out_dir / f"{name}.png", layout="videos"))
        if frames.shape[1] > 1:
            paths.append(save_gif(frames, out_dir / f"{name}.gif"))
    return paths


def _pixels(x: torch.Tensor, m: Manifest | None) -> np.ndarray:
    """[N, C, T, H, W] → [N, T, H', W'] in [0, 1]: through the data set's decoder, else channel 0 rescaled."""
    if m is not None and (m.encoder or {}).get("name") == "patch_dct":
        from rcm_core.data.codec import decode_latents
        return np.asarray(decode_latents(x.float(), m))
    c0 = x[:, 0].float()
    lo, hi = c0.min(), c0.max()
    return ((c0 - lo) / (hi - lo + 1e-8)).numpy()


# ----------------------------------------------------------------------------------------------------------
# The run's comparison figure: the teacher and every student step count side by side


def _is_vector_toy(x: torch.Tensor) -> bool:
    return x[0].numel() <= 16 and tuple(x.shape[2:]) == (1, 1, 1)


def _column_name(name: str, value: float | None) -> str:
    if name.startswith("teacher"):
        head = "teacher" + (f" ({name.rsplit('_', 1)[-1]} NFE)" if name[-1].isdigit() else "")
    else:
        n = int(name.rsplit("_", 1)[-1])
        head = f"{n} step{'s' if n > 1 else ''}"
    return head + (f": {value:.3g}" if value is not None else "")


def comparison_rows(labels: torch.Tensor | None, n: int, max_rows: int = 8) -> tuple[list[int], list[str]]:
    """Which bank rows to show: the first sample of each class (up to max_rows classes), else the first few."""
    if labels is None or labels.dim() != 1:
        idx = list(range(min(n, max_rows // 2)))
        return idx, [f"sample {i}" for i in idx]
    idx, names = [], []
    for k in sorted(set(labels.tolist()))[:max_rows]:
        idx.append(int((labels == k).nonzero()[0]))
        names.append(f"class {k}")
    return idx, names


def save_comparison_figure(samples: dict[str, torch.Tensor], manifest: dict | Manifest | None, path: Path, *,
                           labels: torch.Tensor | None = None, report=None, title: str = "") -> list[Path]:
    """One figure per run: the teacher (`teacher*` key) and each student step count (`nfe_<N>`) in columns, all
    drawn from the same evaluation-bank noise and labels; the column heads carry the headline metric (from
    `report`, a StepCountReport). Vector toys: one scatter panel per column, coloured by class. Images and videos:
    one row per class; a video's frames run left to right, and a GIF beside the PNG plays them."""
    from rcm_core.eval.report import headline_metric
    from rcm_core.eval.visualize import labelled_grid, save_comparison

    order = sorted(samples, key=lambda k: (not k.startswith("teacher"), int(k.rsplit("_", 1)[-1])
                                           if k.rsplit("_", 1)[-1].isdigit() else 0))
    metric, values = None, {}
    if report is not None:
        rows = report.all_rows()
        metric = headline_metric({m for r in rows.values() for m in r if m not in report.cost_metrics})
        values = {name: est.value for name, r in rows.items() if (est := r.get(metric)) is not None}
        values.setdefault("teacher_reference", values.get(report.floor_name))
    names = [_column_name(report.floor_name if k == "teacher_reference" and report is not None else k,
                          values.get(k)) for k in order]
    heading = title + (f" · {metric} per sampler" if metric else "") + " · same noise and labels in every column"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first = samples[order[0]]
    if _is_vector_toy(first):
        cells = [[scatter_image(samples[k], labels=labels, size=240) for k in order]]
        labelled_grid(cells, row_names=[""], col_names=names, title=heading + " · colour = class").save(path)
        return [path]
    m = Manifest(**manifest) if isinstance(manifest, dict) else manifest
    idx, row_names = comparison_rows(labels, first.shape[0])
    picked = torch.cat([samples[k][idx] for k in order])
    pixels = _pixels(picked, m)                 # one call: a common value range for every column
    columns = {name: pixels[i * len(idx):(i + 1) * len(idx)] for i, name in enumerate(names)}
    return save_comparison(columns, path, row_names=row_names, title=heading)
