"""Service outages during a run, against real servers on loopback that the test stops and starts again:
the MLflow tracking server (metrics queue up, training does not wait, everything arrives once) and the S3
server under Ray Data streaming (reads are retried; every row of the epoch arrives exactly once).

Each test runs its own server on a fixed port, since a restarted server must come back at the same URL
(the session stack's servers would come back on new ports). Numbers measured here are in docs/RELIABILITY.md.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from cluster.local_stack import free_port, http_ok, spawn, stop_session, wait_until

pytestmark = [pytest.mark.services, pytest.mark.slow]
BIN = Path(sys.executable).parent


class Server:
    """One service process on a fixed port that can be stopped and started again at the same URL."""

    def __init__(self, cmd: list[str], health: str, log: Path, env: dict[str, str] | None = None):
        self.cmd, self.health, self.log = cmd, health, log
        self.env = {**os.environ, **(env or {})}
        self.rec: dict | None = None

    def start(self, timeout: float = 120) -> float:
        t0 = time.monotonic()
        self.rec = spawn(self.cmd, self.log, self.env)
        wait_until(lambda: http_ok(self.health), " ".join(self.cmd[:2]), timeout, self.rec)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.rec is not None:
            stop_session(self.rec)
            self.rec = None


# ----------------------------------------------------------------------------------------------------------
# MLflow server down for a while

@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    srv = Server([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
                  "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                  "--port", str(port), "--workers", "1"],
                 f"http://127.0.0.1:{port}/health", tmp_path / "mlflow.log",
                 {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    srv.start()
    srv.url = f"http://127.0.0.1:{port}"
    yield srv
    srv.stop()


def test_mlflow_outage_queues_metrics_and_never_blocks_training(mlflow_server, tmp_path, caplog):
    """Stop the tracking server at step 10, start it again later: log_metrics never waits, the run's history
    holds every step exactly once with the values logged, and the outage was reported."""
    import torch
    from mlflow.tracking import MlflowClient

    from rcm_core.config import load_config
    from workflows.tracking import UNSENT_FILE, Tracker

    cfg = load_config(None, [f"tracking.tracking_uri={mlflow_server.url}", "tracking.experiment=outage",
                             f"train.run_dir={tmp_path}/run"])
    tracker = Tracker(cfg, retry_s=0.5, warn_after_s=5.0)   # a loaded box answers slowly, not never
    net, opt = torch.nn.Linear(8, 1), None
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    logged, call_s, restarter = {}, [], None
    step, back_at = 0, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while back_at is None or step < back_at + 10:
            step += 1
            x = torch.randn(64, 8, generator=gen)                 # a real (tiny) training step
            loss = ((net(x) - x.sum(1, keepdim=True)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            logged[step] = loss.item()
            t0 = time.perf_counter()
            tracker.log_metrics(step, {"train/loss": loss.item()})
            call_s.append(time.perf_counter() - t0)
            if step == 10:
                mlflow_server.stop()
                down_at = time.monotonic()
            if step == 30:                                   # the server comes back while training goes on
                restarter = threading.Thread(target=mlflow_server.start)
                restarter.start()
            if restarter is not None and back_at is None and not restarter.is_alive():
                back_at = step
            time.sleep(0.05)
        outage_s = time.monotonic() - down_at
        tracker.finish(timeout=240)
    assert tracker.outages == 1
    assert any("unreachable" in str(w.message) for w in caught), "the outage was not reported"
    assert max(call_s) < 0.5, f"log_metrics waited {max(call_s):.2f} s"
    assert not (tmp_path / "run" / UNSENT_FILE).exists()
    hist = MlflowClient(mlflow_server.url).get_metric_history(tracker.run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(1, step + 1))      # none lost, none doubled
    assert {m.step: m.value for m in hist} == logged
    print(f"\nMLflow outage: {outage_s:.1f} s, {back_at - 10} steps logged while down, "
          f"{step} values all delivered once; slowest log_metrics call {max(call_s) * 1e3:.1f} ms")

    # Still down at the end of the run: the values that could not be sent are written next to the run, loudly.
    late = Tracker(cfg, run_id=tracker.run_id, retry_s=0.5)
    mlflow_server.stop()
    late.log_metrics(step + 1, {"train/loss": 1.5, "train/other": 2.0})
    with pytest.warns(RuntimeWarning, match="NOT sent"):
        assert late.close(timeout=1.0) == 2
    lines = (tmp_path / "run" / UNSENT_FILE).read_text().splitlines()
    assert len(lines) == 2 and '"train/loss"' in lines[0] and tracker.run_id in lines[0]


# ----------------------------------------------------------------------------------------------------------
# S3 server restarted while Ray Data streams an epoch

class Gate:
    """A TCP forwarder from a fixed port to the current S3 server. `close()` refuses new connections and cuts the
    open ones, as a server going down does; `open(backend)` listens again at the same port. It lets the test
    restart moto (in-memory: a restarted moto is empty) and re-upload the shards before clients can see it
    again, so what clients observe is an outage of a server whose storage survives, like a real S3 endpoint."""

    def __init__(self):
        import socket
        self._socket = socket
        self.port, self.accepted, self.conns, self.sock = free_port(), 0, [], None

    def open(self, backend: int) -> None:
        self.backend = backend
        self.sock = self._socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.sock,), daemon=True).start()

    def _accept(self, sock) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                server = self._socket.create_connection(("127.0.0.1", self.backend))
            except OSError:
                client.close()
                continue
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        self.conns = []


def _moto(tmp_path: Path, name: str) -> tuple[Server, int]:
    port = free_port()
    srv = Server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], f"http://127.0.0.1:{port}/",
                 tmp_path / f"{name}.log")
    srv.start()
    return srv, port


def _upload(folder: Path, port: int, bucket: str, prefix: str) -> None:
    import boto3
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=bucket)
    for f in sorted(folder.iterdir()):
        s3.upload_file(str(f), bucket, f"{prefix}/{f.name}")


def test_s3_restart_while_streaming_loses_and_doubles_no_row(ray_connected, tmp_path):
    import numpy as np

    from rcm_core.config import load_config
    from rcm_core.data.latents import write_shards
    from workflows.data import make_ray_dataset

    n_rows, folder = 1024, tmp_path / "ds"
    rng = np.random.default_rng(0)
    write_shards(({"id": i, "latent": rng.normal(size=(2, 1, 1, 1)), "label": i % 4} for i in range(n_rows)),
                 str(folder), rows_per_shard=64, latent_shape=[2, 1, 1, 1], num_classes=4)
    first, port = _moto(tmp_path, "moto-1")
    _upload(folder, port, "faults", "ds")
    gate = Gate()
    gate.open(port)
    servers = [first]
    try:
        cfg = load_config(None, ["data.url=s3://faults/ds", f"data.s3_endpoint=http://127.0.0.1:{gate.port}",
                                 "data.normalize=false"])
        ds = make_ray_dataset(cfg)
        ids, done = [], threading.Event()

        def consume():
            try:
                for b in ds.iter_batches(batch_size=32, batch_format="numpy"):
                    ids.extend(b["id"].tolist())
            finally:
                done.set()
        before = gate.accepted
        t0 = time.monotonic()
        reader = threading.Thread(target=consume)
        reader.start()
        while gate.accepted == before and not done.is_set():     # the epoch's first shard reads have begun
            time.sleep(0.01)
        gate.close()                                              # server down, open connections cut
        down, at_close = time.monotonic(), gate.accepted
        first.stop()
        second, port2 = _moto(tmp_path, "moto-2")                 # restarted: empty, so the shards go back in
        servers.append(second)
        _upload(folder, port2, "faults", "ds")
        time.sleep(max(0.0, 5.0 - (time.monotonic() - down)))    # at least 5 s of outage
        gate.open(port2)
        outage = time.monotonic() - down
        reader.join(300)
        assert done.is_set() and not reader.is_alive()
        epoch_s = time.monotonic() - t0
    finally:
        for s in servers:
            s.stop()
    assert gate.accepted > at_close, "every read finished before the outage: nothing was tested"
    assert len(ids) == n_rows and sorted(ids) == list(range(n_rows))   # none lost, none doubled
    print(f"\nS3 outage of {outage:.1f} s during the epoch: {len(ids)} of {n_rows} rows, each once; epoch {epoch_s:.1f} s")


def test_ray_data_stream_resumes_at_the_saved_step(ray_connected, tmp_path):
    """What a restarted worker needs for an exact resume: a fresh execution of the dataset, asked for the stream
    from step k, yields the batches the uninterrupted stream yielded from step k on (across an epoch boundary)."""
    import numpy as np

    from rcm_core.config import load_config
    from rcm_core.data.latents import write_shards
    from workflows.data import make_ray_dataset, resumable_batches

    rng = np.random.default_rng(1)
    write_shards(({"id": i, "latent": rng.normal(size=(2, 1, 1, 1)), "label": i % 4} for i in range(512)),
                 str(tmp_path / "ds"), rows_per_shard=64, latent_shape=[2, 1, 1, 1], num_classes=4)
    cfg = load_config(None, [f"data.url={tmp_path}/ds", "data.normalize=false"])

    def ids(start: int, n: int) -> list[list[int]]:
        shard = make_ray_dataset(cfg).streaming_split(1, equal=True)[0]     # what a (re)started worker gets
        stream = resumable_batches(shard, 64)(start)
        return [next(stream).ids.tolist() for _ in range(n)]
    full = ids(0, 12)                         # 8 batches an epoch: steps 0–7, then epoch 1 reshuffled
    assert sorted(sum(full[:8], [])) == list(range(512)) and full[8] != full[0]
    assert ids(6, 6) == full[6:12]
