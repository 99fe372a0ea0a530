"""The systemd integration: units that verify and are hardened, sd_notify over real sockets, install.sh.

Security threshold: every unit must score at most 2.0 on ``systemd-analyze security --offline=true``
("OK"; they score 1.3 with systemd 252). The remaining exposure is deliberate and commented in the units:
network access (agents talk to a broker at a site-specific address), no MemoryDenyWriteExecute (torch's
JIT) and full /proc (torch reads /proc/cpuinfo).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqttfl.runtime import sdnotify
from mqttfl.runtime.sdnotify import Watchdog

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
# unit file -> the name systemd-analyze loads (a template needs an instance)
UNITS = {
    "mqttfl-cloud.service": "mqttfl-cloud.service",
    "mqttfl-edge@.service": "mqttfl-edge@edge1.service",
    "mqttfl-device@.service": "mqttfl-device@dev1.service",
}
MAX_EXPOSURE = 2.0
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at stub executables, since verify checks the binary exists."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for exe in ("mqttfl-cloud", "mqttfl-edge", "mqttfl-device"):
        stub = bindir / exe
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        assert "ExecStart=/opt/mqttfl/venv/bin/" in text
        (tmp_path / name).write_text(text.replace("/opt/mqttfl/venv/bin/", f"{bindir}/"))
    return tmp_path


def _analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


# --- units ------------------------------------------------------------------------------------------------


@needs_analyze
@pytest.mark.parametrize("unit", UNITS.values())
def test_unit_passes_systemd_analyze_verify(unit_dir: Path, unit: str) -> None:
    r = _analyze("verify", "--recursive-errors=no", unit, cwd=unit_dir)
    # verify prints unknown keys and parse errors as warnings yet may still exit 0: demand silence.
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


@needs_analyze
@pytest.mark.parametrize("unit", UNITS.values())
def test_unit_exposure_score_is_at_most_threshold(unit_dir: Path, unit: str) -> None:
    r = _analyze("security", "--offline=true", "--no-pager", unit, cwd=unit_dir)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout


@pytest.mark.parametrize("name", UNITS)
def test_unit_declares_the_operational_contract(name: str) -> None:
    text = (SYSTEMD / name).read_text()
    keys = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert keys["Type"] == "notify"
    assert keys["NotifyAccess"] == "main"
    assert keys["WatchdogSec"] == "60"
    assert keys["Restart"] == "on-failure"
    assert keys["User"] == keys["Group"] == "mqttfl"
    assert keys["StateDirectory"] == "mqttfl"
    assert keys["CapabilityBoundingSet"] == ""
    node = "cloud" if name == "mqttfl-cloud.service" else "%i"
    assert keys["LoadCredential"] == f"mqtt-password:/etc/mqttfl/credentials/{node}.password"
    config = "/etc/mqttfl/cloud.toml" if node == "cloud" else "/etc/mqttfl/%i.toml"
    assert keys["ExecStart"].endswith(f" --config {config}")


@pytest.mark.parametrize("role", ["cloud", "edge", "device"])
def test_example_config_is_valid_toml_with_the_role_section(role: str) -> None:
    data = tomllib.loads((SYSTEMD / "examples" / f"{role}.toml").read_text())
    assert role in data
    assert data["mqtt"]["session_expiry"] > 0
    assert data["mqtt"]["password_file"] == ""  # so LoadCredential's file is picked up
    assert {"device", "edge", "cloud"} & data.keys() == {role}


# --- sd_notify --------------------------------------------------------------------------------------------

_CHILD = """
import sys
from mqttfl.runtime import sdnotify
ok = sdnotify.ready("connected") and sdnotify.notify("WATCHDOG=1")
sys.exit(0 if ok else 1)
"""


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        addr = str(tmp_path / "notify")
        sock.bind(addr)
        env_value = addr
    else:
        name = f"mqttfl-test-{os.getpid()}-{tmp_path.name}"
        sock.bind(b"\0" + name.encode())
        env_value = "@" + name
    sock.settimeout(10)
    try:
        yield sock, env_value
    finally:
        sock.close()


def test_child_process_sends_ready_and_watchdog_datagrams(notify_socket: tuple[socket.socket, str]) -> None:
    sock, env_value = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": env_value, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert sock.recv(4096) == b"READY=1\nSTATUS=connected"
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_is_a_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    assert sdnotify.status("x") is False


def test_notify_reports_failure_when_the_socket_is_gone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False


def test_status_text_stays_one_line(
    monkeypatch: pytest.MonkeyPatch, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, env_value = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", env_value)
    assert sdnotify.status("round 3\nREADY=1")
    assert sock.recv(4096) == b"STATUS=round 3 READY=1"


def test_watchdog_interval_comes_from_systemd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 60.0
    monkeypatch.delenv("WATCHDOG_PID")
    assert sdnotify.watchdog_interval() == 60.0


def test_watchdog_meant_for_another_process_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    monkeypatch.delenv("WATCHDOG_PID")
    assert sdnotify.watchdog_interval() is None


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def __call__(self, state: str) -> bool:
        self.sent.append(state)
        return True


def test_watchdog_pings_at_half_interval_while_the_loop_progresses() -> None:
    rec = _Recorder()
    wd = Watchdog(60.0, send=rec)
    pings = []
    for t in range(0, 121):  # the loop makes progress every second for two minutes
        wd.progress(float(t))
        if wd.tick(float(t)):
            pings.append(t)
    assert pings == [0, 30, 60, 90, 120]
    assert rec.sent == ["WATCHDOG=1"] * 5


def test_watchdog_stops_pinging_when_the_loop_makes_no_progress() -> None:
    rec = _Recorder()
    wd = Watchdog(60.0, send=rec)
    wd.progress(0.0)
    assert wd.tick(0.0)
    # The loop still spins (tick every second) but is stuck: systemd must see no ping and restart us.
    assert not any(wd.tick(float(t)) for t in range(1, 300))
    assert rec.sent == ["WATCHDOG=1"]
    wd.progress(300.0)
    assert wd.tick(300.0)


def test_watchdog_without_interval_never_pings() -> None:
    rec = _Recorder()
    wd = Watchdog(None, send=rec)
    wd.progress(0.0)
    assert not wd.tick(1000.0)
    assert rec.sent == []


def test_watchdog_feeds_a_real_notify_socket(
    monkeypatch: pytest.MonkeyPatch, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, env_value = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    wd = Watchdog.from_env()
    assert wd.interval == 2.0
    wd.progress(10.0)
    assert wd.tick(10.0)
    assert sock.recv(64) == b"WATCHDOG=1"


# --- install.sh -------------------------------------------------------------------------------------------


def _install(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DESTDIR": str(tmp_path / "root")}
    return subprocess.run(
        ["sh", str(SYSTEMD / "install.sh"), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_install_into_destdir_produces_the_expected_tree(tmp_path: Path) -> None:
    r = _install(tmp_path, "--no-venv")
    assert r.returncode == 0, r.stderr
    root = tmp_path / "root"
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert files == {
        "etc/mqttfl/cloud.toml",
        "etc/mqttfl/examples/cloud.toml",
        "etc/mqttfl/examples/edge.toml",
        "etc/mqttfl/examples/device.toml",
        "etc/systemd/system/mqttfl-cloud.service",
        "etc/systemd/system/mqttfl-edge@.service",
        "etc/systemd/system/mqttfl-device@.service",
    }

    def mode(rel: str) -> int:
        return stat.S_IMODE((root / rel).stat().st_mode)

    assert mode("etc/mqttfl/credentials") == 0o700
    assert mode("etc/mqttfl") == 0o750
    assert mode("etc/mqttfl/cloud.toml") == 0o640
    for unit in UNITS:
        assert (root / "etc/systemd/system" / unit).read_text() == (SYSTEMD / unit).read_text()


def test_install_keeps_an_existing_config(tmp_path: Path) -> None:
    cfg = tmp_path / "root/etc/mqttfl/cloud.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('node = "cloud"  # edited by the operator\n')
    r = _install(tmp_path, "--no-venv")
    assert r.returncode == 0, r.stderr
    assert "edited by the operator" in cfg.read_text()


def test_install_dry_run_changes_nothing_and_shows_every_step(tmp_path: Path) -> None:
    r = _install(tmp_path, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "root").exists()
    out = r.stdout
    venv = f"{tmp_path}/root/opt/mqttfl/venv"
    assert f"+ python3 -m venv {venv}" in out
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in out
    # torch from the CPU index before the package, or pip resolves torch>=2.1 to a CUDA build.
    assert out.index("torch==2.13.0") < out.index(f"{venv}/bin/pip install --quiet {ROOT}")
    assert "install -d -m 0700" in out and "/etc/mqttfl/credentials" in out
    assert "mqttfl-edge@.service" in out


def test_install_dry_run_on_a_real_root_would_create_the_user_and_reload_systemd(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DESTDIR"}
    r = subprocess.run(
        ["sh", str(SYSTEMD / "install.sh"), "--dry-run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    has_user = subprocess.run(["getent", "passwd", "mqttfl"], capture_output=True).returncode == 0
    assert has_user or "+ useradd --system" in r.stdout
    assert "+ chown root:mqttfl /etc/mqttfl" in r.stdout
    if os.path.isdir("/run/systemd/system"):
        assert "+ systemctl daemon-reload" in r.stdout
