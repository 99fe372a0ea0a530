"""A fleet on one machine: a managed broker, data shards, configs, and every agent as its own process.

The demo, the benchmarks and the integration tests all use this, so what they exercise is the product:
the same programs, configs and broker settings users deploy, with an ``operator`` connection to watch
metrics/events and send control commands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mqttfl.ml.data import (
    Dataset,
    holdout,
    load_digits,
    partition_dirichlet,
    partition_iid,
    partition_imbalanced,
)
from mqttfl.ml.shard import save_shard
from mqttfl.runtime.config import load_config
from mqttfl.runtime.transport import Inbound, Transport
from mqttfl.tools.broker import Broker, BrokerOptions

ROLE_MODULE = {"cloud": "cloud_agent", "edge": "edge_agent", "device": "device_agent"}


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table inside a section ([cloud] devices, [device] edge_brokers)
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class FleetSpec:
    devices: dict[str, str] = field(default_factory=lambda: {"dev1": "edge1", "dev2": "edge1",
                                                             "dev3": "edge2", "dev4": "edge2"})
    model: str = "vgg5"
    input_shape: tuple[int, ...] = (3, 32, 32)
    partition: str = "iid"  # iid | dirichlet:<alpha> | imbalanced:<fraction>
    data_seed: int = 0
    eval_fraction: float = 0.0  # each device's held-out split for federated evaluation (eval_data)
    cloud: dict[str, Any] = field(default_factory=dict)  # [cloud] section overrides
    device_extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-device [device] extras
    edge_extra: dict[str, Any] = field(default_factory=dict)
    fleet: str = "default"
    extra_edges: tuple[str, ...] = ()  # edges with no device at the start (migration targets)
    # Pipelines (docs/design.md, "Pipeline"): helper -> the devices it serves ([device] serve; no data of its own)
    # and its extra [device] keys; the devices' chains go in cloud["chains"].
    helpers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    helper_extra: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def edges(self) -> list[str]:
        return sorted(set(self.devices.values()) | set(self.extra_edges))


def make_shards(spec: FleetSpec, train: Dataset) -> dict[str, Dataset]:
    """Each device's training shard (without its held-out split)."""
    return {n: ds.subset(holdout(len(ds), spec.eval_fraction, seed=spec.data_seed)[0])
            for n, ds in _partition(spec, train).items()}


def make_eval_shards(spec: FleetSpec, train: Dataset) -> dict[str, Dataset]:
    """Each device's held-out split (``spec.eval_fraction`` of its data), for federated evaluation."""
    if spec.eval_fraction <= 0:
        return {}
    return {n: ds.subset(holdout(len(ds), spec.eval_fraction, seed=spec.data_seed)[1])
            for n, ds in _partition(spec, train).items()}


def _partition(spec: FleetSpec, train: Dataset) -> dict[str, Dataset]:
    names = sorted(spec.devices)
    kind, _, param = spec.partition.partition(":")
    if kind == "iid":
        parts = partition_iid(train.y, len(names), seed=spec.data_seed)
    elif kind == "dirichlet":
        parts = partition_dirichlet(train.y, len(names), float(param or 0.5), seed=spec.data_seed)
    elif kind == "imbalanced":
        parts = partition_imbalanced(train.y, len(names), float(param or 0.5), seed=spec.data_seed)
    else:
        raise ValueError(f"unknown partition {spec.partition!r}")
    return {n: train.subset(p) for n, p in zip(names, parts, strict=True)}


class RunFailed(RuntimeError):
    """The cloud gave the run up (its ``run_failed`` event): what a waiter waits for will not come, so it stops
    at once instead of running into its timeout."""

    def __init__(self, event: dict[str, Any]) -> None:
        self.event = event
        super().__init__(f"run {event.get('run')} failed at round {event.get('round')}: {event.get('reason')}")


def is_run_failed(m: Inbound) -> bool:
    return m.kind == "event" and m.data is not None and m.data.get("event") == "run_failed"


class Testbed:
    __test__ = False  # not a pytest test class, despite the name
    def __init__(self, root: Path, spec: FleetSpec, *, broker: Broker | None = None,
                 data: tuple[Dataset, Dataset] | None = None, cloud_broker: Broker | None = None,
                 site_brokers: dict[str, Broker] | None = None, auth: dict[str, dict[str, Any]] | None = None,
                 mqtt: dict[str, Any] | None = None, credentials: Path | None = None) -> None:
        """``site_brokers``: the broker of each edge or device not on ``broker`` (several sites); ``auth``: [mqtt]
        credentials per node; ``mqtt``: [mqtt] keys for every node (``tls``, ``ca_file`` for a production broker);
        ``credentials``: a folder of ``<node>.password`` files (broker_config/add-node.sh), one per node and the
        operator."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self._own_broker = broker is None
        self.broker = broker or Broker(BrokerOptions(persistence=True), workdir=self.root / "broker")
        self.data = data
        # Scale-out (docs/operations.md, "Several sites"): edges and devices on a site broker,
        # the cloud on its own broker, bridged.
        self.cloud_broker = cloud_broker
        self.site_brokers = dict(site_brokers or {})
        self.auth = dict(auth or {})
        self.mqtt = dict(mqtt or {})
        self.credentials = credentials
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.configs: dict[str, Path] = {}
        self.operator: Transport | None = None
        self.inbox: list[Inbound] = []

    # ------------------------------------------------------------------ preparation
    def prepare(self) -> None:
        if self._own_broker:
            self.broker.start()
        train, test = self.data or load_digits(self.spec.input_shape)
        self._train = train
        shards = make_shards(self.spec, train) if self.spec.devices else {}
        held_out = make_eval_shards(self.spec, train) if self.spec.devices else {}
        (self.root / "data").mkdir(exist_ok=True)
        for n, ds in shards.items():
            save_shard(self.root / "data" / f"{n}.npz", ds)
        for n, ds in held_out.items():
            save_shard(self.root / "data" / f"{n}.eval.npz", ds)
        save_shard(self.root / "data" / "test.npz", test)
        common = {"fleet": self.spec.fleet, "log_level": "info", "control": {"operators": ["operator"]}}
        self._common = common
        cloud = {"model": self.spec.model, "input_shape": list(self.spec.input_shape),
                 "test_data": str(self.root / "data" / "test.npz"), "min_devices": len(self.spec.devices),
                 "edges": self.spec.edges, **self.spec.cloud}
        self._config("cloud", "cloud", common, cloud)
        for e in self.spec.edges:
            self._config(e, "edge", common, dict(self.spec.edge_extra))
        for d, e in self.spec.devices.items():
            extra = self.spec.device_extra.get(d, {})
            section = {"edge": e, "data": str(self.root / "data" / f"{d}.npz"), **extra}
            if d in held_out:
                section["eval_data"] = str(self.root / "data" / f"{d}.eval.npz")
            self._config(d, "device", common, section)
        for h, clients in self.spec.helpers.items():
            self._config(h, "device", common, {"serve": list(clients), **self.spec.helper_extra.get(h, {})})

    def broker_of(self, node: str) -> Broker:
        if node in ("cloud", "operator"):
            return self.cloud_broker or self.broker
        return self.site_brokers.get(node, self.broker)

    def mqtt_of(self, node: str) -> dict[str, Any]:
        """The [mqtt] section of a node (or the operator): its site's broker, shared keys, its credentials."""
        b = self.broker_of(node)
        mqtt = {"host": b.host, "port": b.port, **self.mqtt, **self.auth.get(node, {})}
        if self.credentials is not None:
            mqtt["password_file"] = str(self.credentials / f"{node}.password")
        return mqtt

    def _config(self, node: str, role: str, common: dict[str, Any], section: dict[str, Any]) -> None:
        data = {"node": node, **common, "mqtt": self.mqtt_of(node), "state_dir": str(self.root / "state"),
                role: section}
        self.configs[node] = write_toml(self.root / f"{node}.toml", data)

    def role_of(self, node: str) -> str:
        if node == "cloud":
            return "cloud"
        return "device" if node in self.spec.devices or node in self.spec.helpers else "edge"

    # ------------------------------------------------------------------ processes
    def start_node(self, node: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{node}.log", "ab")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        p = subprocess.Popen([sys.executable, "-m", ROLE_MODULE[self.role_of(node)], "--config",
                              str(self.configs[node])], stdout=log, stderr=subprocess.STDOUT, env=full_env)
        log.close()
        self.procs[node] = p
        return p

    def start_virtual(self, count: int, *, prefix: str = "vdev", samples: int = 10, mode: str = "train",
                      edges: list[str] | None = None, section: dict[str, Any] | None = None,
                      log_level: str = "info", per_process: int | None = None) -> subprocess.Popen[bytes]:
        """``count`` virtual devices in one process (``mqttfl virtual``), attached round-robin to ``edges`` (default
        every edge), sharing one shard of the first ``samples`` training samples; the process is ``procs[prefix]``
        (with ``per_process``, it starts workers of that many)."""
        edges = edges or self.spec.edges
        shard = self.root / "data" / f"{prefix}.npz"
        save_shard(shard, self._train.subset(np.arange(min(samples, len(self._train)))))
        self._config(prefix, "device", {**self._common, "log_level": log_level},
                     {"edge": edges[0], "data": str(shard), **(section or {})})
        log = open(self.root / f"{prefix}.log", "ab")
        p = subprocess.Popen([sys.executable, "-m", "mqttfl.tools.cli", "virtual", "--config",
                              str(self.configs[prefix]), "--count", str(count), "--prefix", prefix,
                              "--edges", ",".join(edges), "--mode", mode,
                              *(["--per-process", str(per_process)] if per_process else [])],
                             stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        self.procs[prefix] = p
        return p

    def start(self, nodes: list[str] | None = None) -> None:
        self.connect_operator()
        for n in nodes or ["cloud", *self.spec.edges, *sorted(self.spec.helpers), *sorted(self.spec.devices)]:
            self.start_node(n)

    def connect_operator(self) -> Transport:
        if self.operator is None:
            cfg = load_config(None, "operator", environ={}, node="operator", fleet=self.spec.fleet,
                              mqtt=self.mqtt_of("operator"))
            self.operator = Transport(cfg).start()
        return self.operator

    def kill(self, node: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs.get(node)
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            p.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.operator is not None:
            self.operator.stop()
            self.operator = None
        if self._own_broker:
            self.broker.stop()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ observing and steering
    def poll(self, timeout: float = 0.1) -> Inbound | None:
        op = self.connect_operator()
        msg = op.get(timeout)
        if msg is not None:
            self.inbox.append(msg)
            if len(self.inbox) > 10_000:
                del self.inbox[:5_000]
        return msg

    def wait(self, pred: Callable[[Inbound], bool], timeout: float, *, check_procs: bool = True,
             on_message: Callable[[Inbound], None] | None = None, stop_on_run_failed: bool = False) -> Inbound:
        """The first message ``pred`` accepts. With ``stop_on_run_failed``, a ``run_failed`` event it does not
        accept raises :class:`RunFailed`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.poll(0.1)
            if msg is not None:
                if on_message is not None:
                    on_message(msg)
                if pred(msg):
                    return msg
                if stop_on_run_failed and is_run_failed(msg):
                    assert msg.data is not None
                    raise RunFailed(msg.data)
            if check_procs:
                for n, p in self.procs.items():
                    if p.poll() not in (None, 0, -signal.SIGKILL, -signal.SIGTERM):
                        raise RuntimeError(f"{n} exited with {p.returncode}: {self.log_tail(n)}")
        raise TimeoutError(f"timed out after {timeout:.0f}s")

    def wait_online(self, nodes: list[str] | tuple[str, ...] | None = None, timeout: float = 60.0
                    ) -> dict[str, dict[str, Any]]:
        """Until every node published a live status (connected and subscribed: an agent subscribes before
        it announces itself, so a command sent after this is not lost). Returns the statuses."""
        wanted = set(nodes or self.procs)
        status: dict[str, dict[str, Any]] = {}

        def note(m: Inbound) -> bool:
            if m.kind == "status" and m.data is not None and m.src in wanted:
                status[m.src] = m.data
            return all(status.get(n, {}).get("state") not in (None, "starting", "offline") for n in wanted)

        for m in list(self.inbox):
            note(m)
        if not all(status.get(n, {}).get("state") not in (None, "starting", "offline") for n in wanted):
            self.wait(note, timeout)
        return status

    def wait_event(self, name: str, timeout: float, *, on_message: Callable[[Inbound], None] | None = None,
                   **match: Any) -> dict[str, Any]:
        """The first event ``name`` whose fields equal ``match``; :class:`RunFailed` if the run fails first."""
        msg = self.wait(lambda m: m.kind == "event" and m.data is not None and m.data.get("event") == name
                        and all(m.data.get(k) == v for k, v in match.items()), timeout, on_message=on_message,
                        stop_on_run_failed=name != "run_failed")
        assert msg.data is not None
        return msg.data

    def send_ctl(self, node: str, cmd: str, **args: Any) -> str:
        """Publish a command without waiting (usable inside a wait callback); returns its id."""
        cmd_id = uuid.uuid4().hex[:12]
        self.connect_operator().send_json("ctl", node, {"id": cmd_id, "cmd": cmd, "args": args})
        return cmd_id

    def ctl(self, node: str, cmd: str, timeout: float = 15.0, **args: Any) -> dict[str, Any]:
        cmd_id = self.send_ctl(node, cmd, **args)
        msg = self.wait(lambda m: m.kind == "reply" and m.data is not None and m.data.get("id") == cmd_id,
                        timeout, check_procs=False)
        assert msg.data is not None
        return msg.data

    def round_metrics(self) -> list[dict[str, Any]]:
        return [m.data for m in self.inbox if m.kind == "metrics" and m.data and m.data.get("kind") == "round"]

    def log_tail(self, node: str, n: int = 3000) -> str:
        try:
            return (self.root / f"{node}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""
