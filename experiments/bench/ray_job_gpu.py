"""The front door at real scale on one GPU host: clips → latents → `ray job submit` of the shipped Wan2.1-1.3B
config → stop → resubmit (resumes) → MP4s of the student, every stage timed, one table at the end.

    python3 experiments/bench/ray_job_gpu.py --stage encode --out $OUT     # clips → latents on Ray Data GPU actors
    python3 experiments/bench/ray_job_gpu.py --stage train --out $OUT      # the job, stopped and resubmitted
    python3 experiments/bench/ray_job_gpu.py --tiny                         # the CPU proof (tiny sizes, ~5 min)

Where one call's limit cannot hold both jobs (H200, 2026-12-03: job 1 took 213 s to its first checkpoint; job 2
had evaluated by 226 s and was still writing its final checkpoint, samples and EMA student at 254 s, when a 600-s
call ran out), `--stage train --jobs first` and then `--stage train --jobs second` (same `--work` and `--home`)
run them in two invocations; `--stage train --jobs one` submits once and waits for the end without a stop (the
MP4s in one call: 421 s on an H200, 2026-12-03).

Under a time limit (a lent GPU's call) give `--deadline-s` a little under it: the job waits are cut so the table,
with whatever was measured, still prints (and `front_door.json` is written) before the limit.

What it does, as README "Your own videos" tells a user (nothing can be downloaded on the GPU host, so the
released models are random-initialised in their released folder layout):
- encode: writes `--clips` synthetic clips (moving shapes, 81 frames, 480×832) with captions.jsonl; writes a
  Wan2.1-T2V-Diffusers folder (vae/: the Wan2.1 VAE, diffusers defaults; text_encoder/: umT5-XXL; tokenizer/: a
  30-piece Unigram stand-in, the real one cannot be downloaded); runs `workflows/prepare_latents.py
  data.source=videos` (Ray Data GPU actors), sampling GPU utilisation and host memory; then
  `encode_throughput.py` for the per-stage clips/s (decode, VAE, umT5).
- train: a random-init Wan2.1-1.3B teacher exported in the diffusers layout (`transformer/`); latents from the
  encode stage when it ran in this `--work`, else random 480p latents; `ray start --head`; `ray job submit` of
  `workflows/distill.py --config experiments/wan21_t2v_1p3b_rcm.yaml` with overrides for paths,
  `resources.num_workers=1`, steps and intervals; `ray job stop` once Ray registered the first checkpoint; the same
  command again, which resumes it into the same MLflow run; the MLflow run read back (metrics, MP4s).
Overrides beyond paths, worker count, steps and intervals, each because the shipped value cannot fit a short
run on one GPU: `train.keep_checkpoints=1` (a 1.3B checkpoint is 26.4 GiB: the shipped 2 kept + 1 being
written do not fit the 64 GiB disk of the lent one-GPU host; the script checks the disk first), `data.batch_size`
(the paper's 256 is 256 micro-batches per update on one GPU, ~40 min each), `distill.tangent_warmup=0` (the
shipped 1,000 warm-up iterations have no critic iteration to time), `eval.num_samples` and `sampler.teacher_steps`
(the teacher's reference set is 1,600 forwards at the shipped values).

The GPU host needs Ray (with the job server), MLflow, diffusers and PyAV: `bash ../shared/tools/gpu_bundle.sh`
with `EXTRA_PKGS=av==16.1.0` (docs/BENCHMARKS.md has the command and the preamble).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIG = "experiments/wan21_t2v_1p3b_rcm.yaml"
TINY_MODEL = ["model.dim=32", "model.ffn_dim=64", "model.num_heads=2", "model.num_layers=1", "model.freq_dim=16",
              "model.text_dim=32"]      # the tiny umT5 of encode_throughput.py has d_model 32
GIB = 2 ** 30
ADDRESS = "http://127.0.0.1:8265"          # the head's job API; `start_head` picks free ports and sets it


# ----------------------------------------------------------------------------------------------------------
# Helpers: commands, samplers

def ray_exe() -> str:
    here = Path(sys.executable).with_name("ray")
    return str(here) if here.is_file() else (shutil.which("ray") or "ray")


def run(cmd: list[str], env: dict | None = None, timeout: float = 900, log: Path | None = None,
        echo: bool = True) -> tuple[str, float]:
    """Run a command in the checkout; its output (returned, and written to `log`); raises on failure."""
    if echo:
        print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    if log is not None:
        log.write_text(out)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{out[-4000:]}")
    return out, time.perf_counter() - t0


class Sampler:
    """GPU utilisation (nvidia-smi) and the host's used memory (/proc/meminfo) every `every` seconds."""

    def __init__(self, every: float = 0.5):
        self.every, self.gpu, self.host, self.running = every, [], [], False

    def __enter__(self):
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    def _loop(self) -> None:
        while self.running:
            self.host.append(used_host_memory())
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.gpu.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            time.sleep(self.every)

    def summary(self) -> dict:
        host = np.array(self.host or [0.0]) / GIB
        n = len(host)
        return {"gpu_util_mean": float(np.mean(self.gpu)) if self.gpu else None,
                "host_gib_first_quarter": float(host[: max(n // 4, 1)].mean()),
                "host_gib_last_quarter": float(host[-max(n // 4, 1):].mean()), "host_gib_max": float(host.max())}


def used_host_memory() -> float:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = lambda k: float(info[k].split()[0]) * 1024     # noqa: E731
    return kib("MemTotal") - kib("MemAvailable")


# ----------------------------------------------------------------------------------------------------------
# Encode stage

def unigram_tokenizer(folder: Path) -> None:
    """A 30-piece Unigram tokenizer in T5's layout (umT5's real vocabulary cannot be downloaded here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                    extra_ids=0).save_pretrained(folder)


def make_encoders(folder: Path, tiny: bool, device: torch.device) -> None:
    """The Wan2.1-T2V-Diffusers folder layout with random weights: vae/, text_encoder/ (umT5-XXL), tokenizer/."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    sys.path.insert(0, str(ROOT / "experiments" / "bench"))
    from encode_throughput import UMT5_TINY, UMT5_XXL, VAE_TINY

    torch.manual_seed(0)
    with device:
        AutoencoderKLWan(**(VAE_TINY if tiny else {})).save_pretrained(folder / "vae")
        text = UMT5EncoderModel(UMT5Config(**(UMT5_TINY if tiny else UMT5_XXL))).to(torch.bfloat16)
    text.save_pretrained(folder / "text_encoder")
    del text
    unigram_tokenizer(folder / "tokenizer")


def moving_shapes(frames: int, h: int, w: int, seed: int) -> np.ndarray:
    """uint8 [T, H, W, 3]: a square and a disc crossing a gradient background at their own speeds."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w]
    bg = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 70)], -1).astype(np.uint8)
    size, (vy, vx), (uy, ux) = max(h // 8, 2), rng.uniform(-3, 3, 2) * h / 480, rng.uniform(-4, 4, 2) * w / 832
    colour = rng.integers(60, 255, 3)
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        out[t] = bg
        top, left = int(h / 3 + vy * t) % (h - size), int(w / 4 + vx * t) % (w - size)
        out[t, top:top + size, left:left + size] = colour
        cy, cx = (h / 2 + uy * t) % h, (w / 2 + ux * t) % w
        out[t][(y - cy) ** 2 + (x - cx) ** 2 < size ** 2] = (230, 60, 60)
    return out


def write_clips(folder: Path, n: int, frames: int, h: int, w: int) -> None:
    from rcm_core.data.clips import write_mp4

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        write_mp4(moving_shapes(frames, h, w, i), folder / f"clip{i:03d}.mp4", fps=16)
        rows.append({"file": f"clip{i:03d}.mp4", "caption": f"a red disc and a square drift across a gradient {i}"})
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def stage_encode(args, work: Path, out: Path) -> dict:
    res: dict = {}
    device = torch.device("cpu" if args.tiny else "cuda")
    frames, h, w = (9, 32, 32) if args.tiny else (81, 480, 832)
    enc = work / "Wan2.1-T2V-random-Diffusers"
    t0 = time.perf_counter()
    if not (enc / "text_encoder").is_dir():
        make_encoders(enc, args.tiny, device)
    res["encoders made (s)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not (work / "clips" / "captions.jsonl").is_file():
        write_clips(work / "clips", args.clips, frames, h, w)
    res["clips written (s)"] = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cmd = [sys.executable, "workflows/prepare_latents.py", "data.source=videos", f"data.url={work / 'latents'}",
           f"data.video.clips={work / 'clips'}", f"data.video.encoders={enc}", "data.rows_per_shard=4",
           f"data.video.frames={frames}", f"data.video.height={h}", f"data.video.width={w}"]
    if args.tiny:
        cmd.append("data.video.text_len=16")
    with Sampler() as s:
        log, wall = run(cmd, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, log=out / "encode.log")
    res["encode pipeline (s)"] = wall
    res["encode clips/s (whole pipeline, Ray start included)"] = args.clips / wall
    res.update({f"encode {k}": v for k, v in s.summary().items()})
    print(log[-1500:], flush=True)
    if not args.stage_bench:
        return res
    bench = [sys.executable, "experiments/bench/encode_throughput.py", "--clips", "2" if args.tiny else "4"]
    if args.tiny:
        bench += ["--tiny", "--device", "cpu"]
    table, _ = run(bench, log=out / "encode_stages.log")
    res["encode stages"] = "\n".join(line for line in table.splitlines() if line.startswith(("|", "one encoding")))
    return res


# ----------------------------------------------------------------------------------------------------------
# Train stage

def make_teacher(folder: Path, tiny: bool, device: torch.device) -> None:
    """A random-init Wan2.1-T2V-1.3B transformer in the diffusers layout (what a user's teacher.checkpoint holds)."""
    from rcm_core.config import load_config
    from rcm_core.networks import build_network
    from rcm_core.networks.wan_io import export

    cfg = load_config(ROOT / CONFIG, TINY_MODEL if tiny else [])
    torch.manual_seed(0)
    with device:
        net = build_network(cfg.model)
        with torch.no_grad():
            for p in net.parameters():
                if p.dim() > 1:
                    p.normal_(std=0.02)
    export(net, folder / "transformer", layout="diffusers", cfg=cfg.model, dtype=torch.bfloat16)


def random_latents(work: Path, rows: int, tiny: bool) -> Path:
    shape, cond = ((16, 3, 4, 4), (16, 32)) if tiny else ((16, 21, 60, 104), (512, 4096))
    rng = np.random.default_rng(0)
    npz = work / "latents.npz"
    np.savez(npz, latents=rng.standard_normal((rows, *shape), dtype=np.float32).astype(np.float16),
             cond=(0.1 * rng.standard_normal((rows, *cond), dtype=np.float32)).astype(np.float16))
    url = work / "latents_random"
    run([sys.executable, "workflows/prepare_latents.py", "--from-npz", str(npz), f"data.url={url}",
         "data.rows_per_shard=4"])
    return url


def check_disk(home: Path, args) -> None:
    """Refuse before the job starts when the disk of the job's home cannot hold two checkpoints (the kept one and the
    one being written, train.keep_checkpoints=1): a full disk mid-write kills the job far from its cause."""
    from rcm_core.config import load_config
    from rcm_core.run.plan import checkpoint_bytes, count_params

    cfg = load_config(ROOT / CONFIG, TINY_MODEL if args.tiny else [])
    ckpt = checkpoint_bytes(cfg, count_params(cfg.model), sharded=False)
    free = shutil.disk_usage(home).free
    print(f"disk: {free / GIB:.1f} GiB free under {home}; a checkpoint is {ckpt / GIB:.1f} GiB, two must fit",
          flush=True)
    if free < 2 * ckpt + GIB:
        raise SystemExit(f"{home}: {free / GIB:.1f} GiB free, the run needs {(2 * ckpt + GIB) / GIB:.1f} GiB (two "
                         f"{ckpt / GIB:.1f} GiB checkpoints + 1 GiB); give --home on a larger disk")


def job_command(args, work: Path, teacher: Path, data: Path) -> list[str]:
    over = [f"teacher.checkpoint={teacher}", f"data.url={data}", "resources.num_workers=1",
            f"train.steps={args.steps}", f"train.eval_every={args.steps}",
            f"train.checkpoint_every={args.steps if args.jobs == 'one' else args.stop_at}",
            "train.log_every=1", "train.keep_checkpoints=1", f"data.batch_size={args.batch}",
            "distill.tangent_warmup=0",
            "eval.num_samples=2", "sampler.teacher_steps=2", "name=front_door"]
    if args.tiny:
        over += TINY_MODEL + ["resources.use_gpu=false", "train.device=cpu", "resources.cpus_per_worker=1",
                              "eval.bootstrap=5", "model.activation_checkpointing=false"]
    return ["--", sys.executable, "workflows/distill.py", "--config", CONFIG, *over]


def submit(env: dict, cmd: list[str], out: Path, name: str, patience_s: float = 60) -> str:
    """`ray job submit --no-wait`; the head's job API can answer before its node's job agent is up ("No available
    agent to submit job, please try again later": seen here on a loaded 2-core box, 2026-12-03), so that one
    answer is retried for `patience_s`; any other failure raises at once."""
    t0 = time.perf_counter()
    while True:
        try:
            text, _ = run([ray_exe(), "job", "submit", "--no-wait", "--address", ADDRESS, "--working-dir",
                           ".", *cmd], env=env, log=out / f"{name}_submit.log")
            return next(w.strip("'") for w in text.split() if w.strip("'").startswith("raysubmit_"))
        except SystemExit as e:
            if "No available agent" not in str(e) or time.perf_counter() - t0 > patience_s:
                raise
            print(f"[{name}] the head has no job agent yet; submitting again in 3 s", flush=True)
            time.sleep(3)


def job_status(env: dict, job: str) -> str:
    text, _ = run([ray_exe(), "job", "status", "--address", ADDRESS, job], env=env, echo=False)
    return parse_job_status(text, job)


def parse_job_status(text: str, job: str) -> str:
    """The job's state from `ray job status` output. Ray 2.60 prints "Status for job '<id>': RUNNING" (or PENDING)
    while a job is alive, but a sentence once it ended: "Job '<id>' succeeded", "… failed" (then a free-text
    status message), "… was stopped". Matching only upper-case words read every ended job as unknown and the wait
    ran to its timeout (the CPU proof of 2026-12-02 waited 5 minutes after job 2 had succeeded)."""
    quoted = re.escape(f"'{job}'")
    live = re.search(rf"Status for job {quoted}: (\w+)", text)
    if live:
        return live.group(1)
    for sentence, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED")):
        if re.search(rf"Job {quoted} {sentence}", text):
            return status
    return "UNKNOWN"


def save_logs(env: dict, job: str, path: Path) -> str:
    r = subprocess.run([ray_exe(), "job", "logs", "--address", ADDRESS, job], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    path.write_text(r.stdout + r.stderr)
    return r.stdout


_SHOWN: dict[str, int] = {}          # job id → characters of its log already printed
DEADLINE: float | None = None        # perf_counter time by which the script must have printed its table
JOB2_SUBMITTED_MS: int | None = None  # wall clock (ms) when job 2 was submitted: its metrics are the ones after it
RESERVE_S = 90.0                     # kept back from the waits: stopping the head (≤ 60 s), reading MLflow, the table


def wait_budget(timeout: float, now: float, deadline: float | None, reserve: float = RESERVE_S) -> float:
    """How long a wait may last: its own timeout, cut so that `reserve` seconds are left before the deadline.
    (2026-12-03: a device call's limit killed the script mid-wait and its clean-up; nothing came back.)"""
    if deadline is None:
        return timeout
    return max(0.0, min(timeout, deadline - reserve - now))


def wait_for(env: dict, job: str, out: Path, name: str, until, timeout: float) -> str:
    """Poll the job until it ends, `until()` holds or `timeout` passes. Each poll saves the whole log (a run cut
    short still leaves it) and prints the lines that are new since the last poll, with the seconds waited, so
    the console of a run killed from outside still shows how far the job got (on 2026-12-02 a cut device call
    returned nothing else)."""
    t0 = time.perf_counter()
    timeout = wait_budget(timeout, t0, DEADLINE)
    while time.perf_counter() - t0 < timeout:
        status = job_status(env, job)
        text = save_logs(env, job, out / f"{name}.log")
        new = [line for line in text[_SHOWN.get(job, 0):].splitlines() if line.strip()]
        _SHOWN[job] = len(text)
        for line in new[-20:]:
            print(f"[{name} {time.perf_counter() - t0:5.0f} s] {line[:300]}", flush=True)
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or until():
            return status
        time.sleep(3)
    return "TIMEOUT"


def checkpoints(home: Path) -> list[str]:
    """The checkpoints Ray Train has registered for the run (its manager's snapshot names them once the report
    went through); a folder that merely exists may still be mid-write or not yet reported."""
    found = []
    for snap in (home / "runs").glob("**/front_door-ray/checkpoint_manager_snapshot.json"):
        try:
            found.append(snap.read_text())
        except OSError:
            continue
    return re.findall(r"step_\d+", " ".join(found))


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(env: dict, tiny: bool) -> subprocess.Popen:
    """`ray start --head --block` as a child process on free ports: stopping it stops this head only (`ray stop`
    would end every Ray instance on the machine, other users' too)."""
    global ADDRESS
    dash = free_port()
    ADDRESS = f"http://127.0.0.1:{dash}"
    cmd = [ray_exe(), "start", "--head", "--block", "--disable-usage-stats", f"--port={free_port()}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
    cmd += ["--num-cpus=4"] if tiny else ["--num-gpus=1"]
    print("$", " ".join(cmd), flush=True)
    head = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 300:          # the job API answers once the dashboard is up
        r = subprocess.run([ray_exe(), "job", "list", "--address", ADDRESS], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return head
        if head.poll() is not None:
            raise SystemExit(f"ray start exited {head.returncode}")
        time.sleep(2)
    stop_head(head)
    raise SystemExit("the Ray head's job API did not answer within 300 s")


def stop_head(head: subprocess.Popen) -> None:
    head.send_signal(signal.SIGTERM)          # `ray start --block` stops its own processes on SIGTERM
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def stage_train(args, work: Path, out: Path, res: dict) -> None:
    """Fills `res` as it goes, so a job cut short (a deadline, a failure) still leaves what was measured before it."""
    device = torch.device("cpu" if args.tiny else "cuda")
    teacher = work / "Wan2.1-T2V-1.3B-random"
    t0 = time.perf_counter()
    if not (teacher / "transformer").is_dir():
        make_teacher(teacher, args.tiny, device)
    res["teacher made (s)"] = time.perf_counter() - t0
    data = work / "latents" if (work / "latents" / "manifest.json").is_file() else random_latents(work, 4, args.tiny)
    res["latents"] = "encoded clips (encode stage)" if data.name == "latents" else "random (no encode stage here)"
    res["plan: predicted peak per GPU (GiB)"] = planned_peak_gib(args, data, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    home = Path(args.home) if args.home else work / "home"   # RCM_HOME of the job: run folder, Ray storage, MLflow
    home.mkdir(parents=True, exist_ok=True)
    check_disk(home, args)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "NCCL_NVLS_ENABLE": "0", "RCM_HOME": str(home),
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
    head = start_head(env, args.tiny)
    try:
        stop_and_resubmit(args, out, env, home, job_command(args, work, teacher, data), res)
    finally:
        stop_head(head)
        if (home / "runs" / "mlflow.db").is_file():
            res.update(read_run(home, out, args))       # what MLflow holds, also when a job was cut short


def stop_and_resubmit(args, out: Path, env: dict, home: Path, cmd: list[str], res: dict) -> None:
    """Job 1 until Ray registered its first checkpoint, `ray job stop`, the same command again (job 2) to its end.
    `--jobs first` / `--jobs second` run the halves in two invocations (two device calls), each with its own head:
    job 2 then resumes across a restarted Ray head, from what the run's storage holds (as after a cluster restart).
    `--jobs one`: the command once, to its end, no stop."""
    (out / "job_command.txt").write_text("ray job submit --working-dir . " + " ".join(cmd) + "\n")
    if args.jobs == "one":        # submitted once, to its end: the samples in one call once stop/resume were seen
        res["job: submit → end (s)"], res["job status"] = job_to_end(args, out, env, cmd, "job")
        return
    if args.jobs in ("both", "first"):
        t0 = time.perf_counter()
        first = submit(env, cmd, out, "job1")
        status = wait_for(env, first, out, "job1", lambda: bool(checkpoints(home)), timeout=args.timeout)
        res["job 1: submit → first checkpoint (s)"] = time.perf_counter() - t0
        if status != "RUNNING":
            raise SystemExit(f"job 1 ended {status} before its first checkpoint; see job1.log")
        run([ray_exe(), "job", "stop", "--address", ADDRESS, first], env=env)
        status = wait_for(env, first, out, "job1", lambda: False, timeout=120)
        res["job 1 status after `ray job stop`"] = status
    if args.jobs == "first":
        return
    if args.jobs == "second" and not checkpoints(home):
        raise SystemExit(f"--jobs second: no checkpoint registered under {home}; run `--jobs first` with the same "
                         "--home and --work before it")
    global JOB2_SUBMITTED_MS
    JOB2_SUBMITTED_MS = int(time.time() * 1000)       # MLflow's clock for metrics (the worker's, on this host)
    res["job 2: resubmit → end (s)"], res["job 2 status"] = job_to_end(args, out, env, cmd, "job2")


def job_to_end(args, out: Path, env: dict, cmd: list[str], name: str) -> tuple[float, str]:
    """Submit `cmd` and wait for its end (final checkpoint, evaluation, MP4s); seconds and the status it ended in."""
    t0 = time.perf_counter()
    status = wait_for(env, submit(env, cmd, out, name), out, name, lambda: False, timeout=args.timeout)
    print((out / f"{name}.log").read_text()[-3000:], flush=True)
    return time.perf_counter() - t0, status


def planned_peak_gib(args, data: Path, device: torch.device) -> float:
    """The planner's peak memory per GPU for the job's own mesh and micro-batch, printed beside the measured one."""
    from rcm_core.config import load_config
    from rcm_core.data.latents import read_manifest
    from rcm_core.parallel.mesh import shape_from_config
    from rcm_core.run.plan import GiB as PLAN_GIB, Workload, count_params, plan_mesh

    cfg = load_config(ROOT / CONFIG, ["resources.num_workers=1", f"data.batch_size={args.batch}"])
    memory = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else 141 * PLAN_GIB
    m = read_manifest(str(data))
    work_ = Workload.from_config(cfg, tuple(m.latent_shape), (m.cond_shape or [512])[0])
    plan = plan_mesh(cfg, shape_from_config(cfg.parallel, 1), gpus=1, gpu_memory=memory, work=work_,
                     counts=count_params(cfg.model), checkpointing=cfg.model.activation_checkpointing, table=None)
    return plan.total / PLAN_GIB


def job2_steps(logged: list[tuple[int, int]], submitted_ms: int | None) -> list[int]:
    """The steps job 2 logged: those logged (step, ms) after its submission, in time order. Job 2 starts after the
    last checkpoint job 1 wrote, so it may re-run steps job 1 logged past it, or none when the stop landed right at
    a checkpoint (the CPU proof of 2026-12-03: steps 1..12 once each, which the old check, looking for a step that
    goes back, called not resumed)."""
    if submitted_ms is None:
        return []
    return [step for step, ms in sorted(logged, key=lambda st: st[1]) if ms >= submitted_ms]


def read_run(home: Path, out: Path, args) -> dict:
    """The MLflow run both jobs logged to: how many runs, the logged steps, iteration times, peak memory, MP4s."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'runs' / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    res = {"MLflow runs (want 1: the resumed job continues it)": len(runs)}
    if not runs:
        return res
    run_ = runs[0]
    hist = lambda key: client.get_metric_history(run_.info.run_id, key)     # noqa: E731
    logged = sorted(((m.step, m.timestamp) for m in hist("train/loss")), key=lambda st: st[1])
    res["train/loss logged at steps (in time order)"] = [step for step, _ in logged]
    if args.jobs in ("both", "second"):  # job 1 alone, or one job, has nothing resumed
        job2 = job2_steps(logged, JOB2_SUBMITTED_MS)
        res["job 2 began at step (want: a checkpoint step + 1, > 1)"] = job2[0] if job2 else None
        res["resumed, not restarted"] = bool(job2) and job2[0] > 1 and job2 == list(range(job2[0], args.steps + 1))
    # the first student and critic iterations include Triton autotuning: leave each kind's first report out
    for kind in ("student", "critic"):
        values = [m.value for m in sorted(hist(f"train/seconds_{kind}"), key=lambda m: m.step)]
        res[f"s / {kind} update"] = float(np.mean(values[1:] or values)) if values else None
    s, c = res["s / student update"], res["s / critic update"]
    res["s / update, 1 student : 4 critic"] = (s + 4 * c) / 5 if s and c else None
    peak = [m.value for m in hist("train/peak_memory_gib")]
    res["peak GPU memory (GiB)"] = max(peak) if peak else None
    res["eval seconds"] = [round(m.value, 1) for m in hist("timing/eval_seconds")]
    # where a submission's fixed costs go (the worker's set-up, checkpoints, the run's end): seconds, newest last
    for key in ("teacher_load", "teacher_check", "checkpoint", "final_samples", "final_comparison_figure",
                "final_EMA_student"):
        res[f"{key.replace('_', ' ')} seconds"] = [round(m.value, 1) for m in hist(f"timing/{key}_seconds")]
    res["loss finite"] = bool(np.all(np.isfinite([m.value for m in hist("train/loss")])))
    files = [a.path for a in client.list_artifacts(run_.info.run_id, "samples")]
    res["samples in MLflow"] = files
    res["MP4s written to --out"] = [Path(client.download_artifacts(run_.info.run_id, f, str(out))).name
                                     for f in files if f.endswith(".mp4")]
    return res


# ----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["encode", "train", "all"], default="all")
    ap.add_argument("--work", default="/tmp/rcm_front_door")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="optimiser updates of the run")
    ap.add_argument("--stop-at", type=int, default=2, help="`ray job stop` after this update's checkpoint")
    ap.add_argument("--batch", type=int, default=2, help="data.batch_size (micro-batches of 1 on the one GPU)")
    ap.add_argument("--timeout", type=float, default=660,
                    help="seconds to wait for each job (H200, 2026-12-03: one job 421 s from submit to its end, "
                         "215 s of it the run's end before its previews were shrunk)")
    ap.add_argument("--home", default="", help="the job's RCM_HOME (checkpoints, MLflow; default <work>/home): a "
                    "disk with room for two checkpoints (26.4 GiB each at 1.3B), e.g. /dev/shm on the lent H200")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="print the table within this many seconds of the start, cutting the job waits short (a "
                         "device call: its limit minus ~30 s); 0: no deadline")
    ap.add_argument("--jobs", choices=["both", "first", "second", "one"], default="both",
                    help="train stage: both jobs in this invocation, or only job 1 (submit, first checkpoint, stop) "
                         "or only job 2 (resubmit on a fresh head, to the end): for time limits that cannot hold "
                         "both (one device call ran out 28 s after job 2's evaluation, 2026-12-03); or one job "
                         "to its end without a stop (the samples in one call)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and clips on the CPU: proves the script here")
    ap.add_argument("--stage-bench", action=argparse.BooleanOptionalAction, default=True,
                    help="after the encode pipeline, time decode / VAE / umT5 apart (encode_throughput.py, ~1 min "
                         "at full size: it builds the encoders again)")
    args = ap.parse_args(argv)
    if args.tiny:       # tiny iterations take a second: more of them, so `ray job stop` lands mid-run
        args.clips, args.steps = min(args.clips, 4), max(args.steps, 12)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or work / "out")
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    t0 = time.perf_counter()
    global DEADLINE
    DEADLINE = t0 + args.deadline_s if args.deadline_s else None
    code = 0
    try:
        if args.stage in ("encode", "all"):
            res.update(stage_encode(args, work, out))
        if args.stage in ("train", "all"):
            stage_train(args, work, out, res)
    except SystemExit as e:          # a stage refused or a job ended badly: still print what was measured
        res["stopped"], code = str(e)[:500], 1
    res["whole script (s)"] = time.perf_counter() - t0
    stages = res.pop("encode stages", None)
    print("\n| what | value |\n| --- | --- |")
    for k, v in res.items():
        print(f"| {k} | {f'{v:.2f}' if isinstance(v, float) else v} |")
    if stages:
        print("\nencode stages (experiments/bench/encode_throughput.py):\n" + stages)
    (out / "front_door.json").write_text(json.dumps({**res, "encode stages": stages}, indent=1, default=str))
    return code


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    sys.exit(main())
