"""Video clips in and out: decode a clip's first frames, fit them to the training size, write MP4.

    from rcm_core.data.clips import decode_frames, fit_clip, write_mp4
    frames = decode_frames(open("clip.mp4", "rb"), 81)        # uint8 [T, H, W, 3], T ≤ 81, stops decoding at 81
    video = fit_clip(frames, frames=81, height=480, width=832)   # uint8 [3, 81, 480, 832] (ClipError if too short)
    write_mp4(video_uint8_THWC, "out.mp4", fps=16)

The decoder is PyAV (`pip install av`, the `video` extra): its wheels bundle FFmpeg's libraries for Linux, macOS and
Windows, so nothing else must be installed on a cluster node, it reads from any file-like object (an fsspec file on
S3 is passed straight in), it stops after the frames we need (a 10-minute clip costs no more than its first 81
frames) and the same package writes H.264 (libx264) and MPEG-4 part 2 for the way back. torchcodec needs an FFmpeg
installed on the system, and Ray Data's `read_videos` decodes every frame of every clip (no early stop) and keeps
whole clips as rows.

Fitting follows Wan2.1's data preparation: scale so the frame covers `height × width` (the shorter relative side
fits), centre-crop, keep the first `frames` frames. A clip with fewer frames is never padded: `ClipError`.
Pixels stay uint8 until the encoder (4× less memory in flight than float32); `to_unit_range` maps them to [-1, 1].
Nothing here imports ray.
"""
from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import numpy as np

CLIP_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi")


class ClipError(ValueError):
    """A clip that cannot be used: unreadable, no video stream, or too short. The message says which."""


def decode_frames(source: str | Path | IO[bytes], max_frames: int) -> np.ndarray:
    """The first `max_frames` frames of the first video stream as uint8 [T, H, W, 3] RGB (T may be smaller).
    Raises ClipError when the file is not a readable video."""
    import av

    frames: list[np.ndarray] = []
    try:
        with av.open(source, mode="r") as container:
            if not container.streams.video:
                raise ClipError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"           # frame-threaded decoding inside FFmpeg
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) >= max_frames:
                    break
    except ClipError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as e:   # corrupt, truncated, not a video
        if not frames:
            raise ClipError(f"unreadable: {type(e).__name__}: {e}") from None
        # a clip cut short after some frames: keep what decoded; fit_clip decides whether it is long enough
    if not frames:
        raise ClipError("no decodable frame")
    return np.stack(frames)


def fit_clip(frames: np.ndarray, *, frames_out: int, height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, 3] → uint8 [3, frames_out, height, width]: the first frames, scaled to cover the target
    (bilinear, antialiased on downscale) and centre-cropped. ClipError if T < frames_out."""
    import torch
    import torch.nn.functional as F

    t, h, w, _ = frames.shape
    if t < frames_out:
        raise ClipError(f"too short: {t} frames, need {frames_out}")
    x = torch.from_numpy(np.ascontiguousarray(frames[:frames_out])).permute(0, 3, 1, 2).float()   # [T, 3, H, W]
    scale = max(height / h, width / w)
    sh, sw = max(height, round(h * scale)), max(width, round(w * scale))
    if (sh, sw) != (h, w):
        x = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (sh - height) // 2, (sw - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3).numpy()      # [3, T, H, W]


def to_unit_range(video: Any) -> Any:
    """uint8 pixels → float in [-1, 1] (what the Wan VAE reads); works on numpy arrays and torch tensors."""
    return video / 127.5 - 1.0


def to_uint8(video: Any) -> np.ndarray:
    """Decoder output in [-1, 1] (torch or numpy, any layout) → uint8, clipped."""
    x = video.detach().float().cpu().numpy() if hasattr(video, "detach") else np.asarray(video, np.float32)
    return ((np.clip(x, -1.0, 1.0) + 1.0) * 127.5 + 0.5).astype(np.uint8)


def write_mp4(frames: np.ndarray, path: str | Path, *, fps: int = 16, codec: str = "libx264") -> Path:
    """uint8 [T, H, W, 3] → an MP4 file (H.264, yuv420p, so any player opens it; odd sizes are padded by one
    pixel because 4:2:0 needs even sizes). `codec="mpeg4"` where FFmpeg was built without libx264."""
    import av

    frames = np.asarray(frames, np.uint8)
    t, h, w, _ = frames.shape
    ph, pw = h + h % 2, w + w % 2
    if (ph, pw) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "medium"}
        for i in range(t):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frames[i], format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_grid(videos: np.ndarray, *, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, T, H, W, 3] → uint8 [T, H', W', 3]: frame t is the grid of every video's frame t (one MP4 per
    step count, like the GIFs). One video is returned as it is."""
    import math

    n, t, h, w, c = videos.shape
    if n == 1:
        return videos[0]
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    out = np.zeros((t, nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        out[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = videos[i]
    return out
