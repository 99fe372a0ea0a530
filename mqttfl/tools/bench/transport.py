"""``mqttfl bench transport``: what one MQTT hop costs, measured through real managed brokers in one run.

- small round trip: a ~100-byte QoS 1 envelope from a requester Transport to a responder Transport that echoes
  it from its own thread loop (``get()`` then ``send()``), the way an edge answers a device's micro-batch;
  p50/p99 over many round trips after a warm-up.
- the same round trip without ``TCP_NODELAY`` (a second broker without ``set_tcp_nodelay``, clients that leave
  Nagle on), for context: it is why the broker config and the Transport both set it (docs/design.md, "Transport").
- codec: encode + decode of a 1.6 MB float32 tensor shaped like VGG-5 smashed data for a batch of 100.
- chunked: a 4.5 MB envelope sent with ``Transport.send`` (chunked at the configured size, 1 MiB by default)
  to another Transport, which reassembles, decodes and answers with a small reply before the next one is sent;
  for context also with 256 KiB chunks.

Throughputs use the median time per operation, so that other work on a small shared machine skews them less
(a preempted iteration costs a whole scheduler slice); ``*_mean`` keys give the plain averages next to them.
Writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from mqttfl.runtime.config import MqttConfig, load_config
from mqttfl.runtime.transport import Transport
from mqttfl.tools.bench.common import add_out_argument, emit, fmt, out_dir, percentile, save_results
from mqttfl.tools.broker import Broker, BrokerOptions, free_port, render_config
from mqttfl.wire.codec import Envelope, decode, encode

SMASHED_SHAPE = (100, 64, 8, 8)  # VGG-5 device-side output for a batch of 100 (1.6 MB as float32)
CHUNKED_BYTES = 4_500_000
SMALL_CHUNK = 256 * 1024  # for context: the default chunk size is a measured trade-off (docs/design.md, "Wire format")


def _transport(broker: Broker, fleet: str, node: str, nodelay: bool = True, **mqtt: Any) -> Transport:
    cfg = load_config(None, "bench", environ={}, node=node, fleet=fleet,
                      mqtt={"host": broker.host, "port": broker.port, **mqtt})
    return Transport(cfg, tcp_nodelay=nodelay).start()


class _Echo:
    """Responder: its own thread owns its Transport's get() and answers every binary message with ``reply``."""

    def __init__(self, t: Transport, reply_kind: str = "grad", echo_body: bool = True) -> None:
        self.t, self.reply_kind, self.echo_body = t, reply_kind, echo_body
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"echo-{t.node}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            m = self.t.get(timeout=0.05)
            if m is not None and m.env is not None:
                body = m.env.body if self.echo_body else {"i": m.env.body.get("i")}
                self.t.send(self.reply_kind, m.src, body=body)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _await_reply(t: Transport, kind: str, i: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        m = t.get(timeout=max(deadline - time.monotonic(), 0.0))
        if m is None:
            raise TimeoutError(f"{t.node}: no {kind} reply {i} within {timeout:.0f}s")
        if m.kind == kind and m.env is not None and m.env.body.get("i") == i:
            return


def _round_trips(broker: Broker, fleet: str, n: int, warmup: int, nodelay: bool) -> tuple[list[float], int]:
    req = _transport(broker, fleet, "req", nodelay)
    resp = _transport(broker, fleet, "resp", nodelay)
    echo = _Echo(resp)
    pad = "x" * 4
    size = len(encode(Envelope(kind="act", src="req", dst="resp", body={"i": n + warmup, "pad": pad})))
    rtts: list[float] = []
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            req.send("act", "resp", body={"i": i, "pad": pad})
            _await_reply(req, "grad", i)
            if i >= warmup:
                rtts.append((time.perf_counter() - t0) * 1000.0)
    finally:
        echo.stop()
        req.stop()
        resp.stop()
    return rtts, size


def _codec(iterations: int) -> tuple[float, float]:
    x = np.random.default_rng(0).standard_normal(SMASHED_SHAPE).astype(np.float32)
    env = Envelope(kind="act", src="dev1", dst="edge1", body={"step": 0}, tensors={"x": x})
    decode(encode(env))  # warm-up
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        out = decode(encode(env))
        times.append(time.perf_counter() - t0)
    assert out.tensors["x"].shape == SMASHED_SHAPE
    return x.nbytes / percentile(times, 50) / 1e6, x.nbytes * len(times) / sum(times) / 1e6


def _chunked(broker: Broker, fleet: str, messages: int, chunk_bytes: int) -> tuple[float, float, float, int]:
    src = _transport(broker, fleet, "sender", chunk_bytes=chunk_bytes)
    dst = _transport(broker, fleet, "receiver", chunk_bytes=chunk_bytes)
    echo = _Echo(dst, echo_body=False)
    w = np.random.default_rng(1).standard_normal(CHUNKED_BYTES // 4).astype(np.float32)
    times: list[float] = []
    try:
        for i in range(messages + 1):  # the first transfer warms up paho's and the broker's buffers
            t0 = time.perf_counter()
            src.send("delta", "receiver", body={"i": i}, tensors={"w": w})
            _await_reply(src, "grad", i, timeout=30.0)
            if i > 0:
                times.append(time.perf_counter() - t0)
        rx = dst.stats_snapshot()
    finally:
        echo.stop()
        src.stop()
        dst.stop()
    typical = percentile(times, 50)
    mean = w.nbytes * len(times) / sum(times) / 1e6
    return w.nbytes / typical / 1e6, mean, typical * 1000.0, int(rx.get("rx_delta", 0))


def _nagle_broker(workdir: Path) -> Broker:
    opts = BrokerOptions(port=free_port())
    text = render_config(opts, opts.port, workdir).replace("set_tcp_nodelay true\n", "")
    return Broker(opts, workdir=workdir, config_text=text)


def measure(*, round_trips: int = 500, warmup: int = 50, nagle_round_trips: int = 30, codec_iterations: int = 50,
            chunked_messages: int = 20) -> dict[str, Any]:
    """All figures of the bench, through brokers started (and stopped) here."""
    fleet = f"bench-{os.getpid()}"
    root = Path(tempfile.mkdtemp(prefix="mqttfl-bench-transport-"))
    results: dict[str, Any] = {}
    try:
        with Broker(BrokerOptions(), workdir=root / "broker") as broker:
            rtts, size = _round_trips(broker, fleet, round_trips, warmup, True)
            mb_s, mb_s_mean, ms_per_msg, received = _chunked(broker, fleet, chunked_messages, MqttConfig.chunk_bytes)
            mb_s_small, _, _, _ = _chunked(broker, fleet, chunked_messages, SMALL_CHUNK)
        with _nagle_broker(root / "broker-nagle") as nagle:
            slow, _ = _round_trips(nagle, fleet, nagle_round_trips, min(warmup, 3), False)
        codec, codec_mean = _codec(codec_iterations)
        results.update(
            small_rtt_p50_ms=percentile(rtts, 50),
            small_rtt_p99_ms=percentile(rtts, 99),
            small_rtt_round_trips=len(rtts),
            small_message_bytes=size,
            small_rtt_p50_ms_no_nodelay=percentile(slow, 50),
            small_rtt_round_trips_no_nodelay=len(slow),
            codec_mb_per_s=codec,
            codec_mb_per_s_mean=codec_mean,
            codec_tensor_bytes=int(np.prod(SMASHED_SHAPE)) * 4,
            chunked_mb_per_s=mb_s,
            chunked_mb_per_s_mean=mb_s_mean,
            chunked_ms_per_message=ms_per_msg,
            chunked_message_bytes=CHUNKED_BYTES,
            chunked_messages=received - 1,
            chunked_chunk_bytes=MqttConfig.chunk_bytes,
            chunked_mb_per_s_256k_chunks=mb_s_small,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--round-trips", type=int, default=500, help="small round trips measured (default 500)")
    p.add_argument("--warmup", type=int, default=50, help="round trips before measuring (default 50)")
    p.add_argument("--no-nodelay-round-trips", type=int, default=30,
                   help="round trips with Nagle on (each costs ~40-90 ms; default 30)")
    p.add_argument("--codec-iterations", type=int, default=50, help="encode+decode repetitions (default 50)")
    p.add_argument("--chunked-messages", type=int, default=20, help="4.5 MB transfers measured (default 20)")
    add_out_argument(p, "transport")


def run(args: argparse.Namespace) -> int:
    out = out_dir(args)
    r = measure(round_trips=args.round_trips, warmup=args.warmup, nagle_round_trips=args.no_nodelay_round_trips,
                codec_iterations=args.codec_iterations, chunked_messages=args.chunked_messages)
    rows = [
        (f"small QoS 1 round trip p50 ({r['small_message_bytes']} B, n={r['small_rtt_round_trips']})",
         fmt(r["small_rtt_p50_ms"], "ms", 3)),
        ("small QoS 1 round trip p99", fmt(r["small_rtt_p99_ms"], "ms", 3)),
        (f"  same, without TCP_NODELAY (n={r['small_rtt_round_trips_no_nodelay']})",
         fmt(r["small_rtt_p50_ms_no_nodelay"], "ms", 1)),
        (f"codec encode+decode {r['codec_tensor_bytes'] / 1e6:.1f} MB float32", fmt(r["codec_mb_per_s"], "MB/s", 0)),
        ("  mean", fmt(r["codec_mb_per_s_mean"], "MB/s", 0)),
        (f"chunked send {r['chunked_message_bytes'] / 1e6:.1f} MB, {r['chunked_chunk_bytes'] // 1024} KiB chunks"
         f" (n={r['chunked_messages']})",
         fmt(r["chunked_mb_per_s"], "MB/s", 0)),
        ("  per message (median)", fmt(r["chunked_ms_per_message"], "ms", 1)),
        ("  mean", fmt(r["chunked_mb_per_s_mean"], "MB/s", 0)),
        ("  same, 256 KiB chunks", fmt(r["chunked_mb_per_s_256k_chunks"], "MB/s", 0)),
        ("results", str(save_results(out, r))),
    ]
    emit(r, rows, args.json)
    return 0
