"""Control commands against real agent processes, and `mqttfl ctl` as a real subprocess.

One small fleet (cloud, edge1, dev1 on the MLP/digits model, no autostart) plus a spare edge that the
shutdown test may stop serves the whole module, so agent start-up (torch import) is paid once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mqttfl.runtime.transport import Transport
from mqttfl.tools.broker import Broker, free_port
from mqttfl.tools.cli import main as cli_main
from mqttfl.tools.ctl import parse_params
from mqttfl.tools.testbed import FleetSpec, write_toml
from mqttfl.tools.testbed import Testbed as LocalFleet  # not "Test*": pytest would try to collect it
from tests.helpers import agent_config, ignore_sigint

pytestmark = pytest.mark.timeout(120)

NODES = ("cloud", "edge1", "dev1", "spare")


@pytest.fixture(scope="module")
def tb(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    root = tmp_path_factory.mktemp("control")
    spec = FleetSpec(devices={"dev1": "edge1"}, model="mlp", input_shape=(64,),
                     cloud={"rounds": 1000, "autostart": False}, fleet=f"ctl-{os.getpid()}")
    bed = LocalFleet(root, spec, broker=broker)
    bed.prepare()
    bed.configs["spare"] = write_toml(root / "spare.toml", {
        "node": "spare", "fleet": spec.fleet, "mqtt": {"host": broker.host, "port": broker.port},
        "state_dir": str(root / "state" / "spare"), "control": {"operators": ["operator"]}, "edge": {},
    })
    try:
        bed.start(["cloud", "edge1", "dev1", "spare"])
        bed.wait_online(NODES)
        yield bed
    finally:
        bed.stop()


def send_raw(tb: LocalFleet, node: str, payload: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
    """Publish a ctl payload as the operator and return the first reply from that node echoing its id."""
    op = tb.connect_operator()
    op.send_json("ctl", node, payload)
    msg = tb.wait(lambda m: m.kind == "reply" and m.src == node and m.data is not None
                  and m.data.get("id") == payload.get("id"), timeout, check_procs=False)
    assert msg.data is not None
    return msg.data


def ctl_cli(tb: LocalFleet, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mqttfl.tools.cli", "ctl", *argv, "--fleet", tb.spec.fleet,
           "--host", tb.broker.host, "--port", str(tb.broker.port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


# --- commands over MQTT ------------------------------------------------------------------------------------


@pytest.mark.parametrize("node", ["cloud", "edge1", "dev1"])
def test_ping_reply_echoes_the_command_id(tb: LocalFleet, node: str) -> None:
    cmd_id = f"ping-{uuid.uuid4().hex[:8]}"
    reply = send_raw(tb, node, {"id": cmd_id, "cmd": "ping", "args": {}})
    assert reply["id"] == cmd_id and reply["node"] == node and reply["cmd"] == "ping"
    assert reply["ok"] is True and reply["result"]["pong"] is True


def test_status_command_reports_role_run_settings_and_transport_counters(tb: LocalFleet) -> None:
    cloud = tb.ctl("cloud", "status")
    assert cloud["ok"], cloud
    r = cloud["result"]
    assert cloud["node"] == "cloud" and r["run"]
    assert r["state"] in ("idle", "running", "paused", "stopped") and isinstance(r["rounds"], int)
    assert r["transport"]["rx_ctl"] >= 1
    dev = tb.ctl("dev1", "status")
    assert dev["ok"] and dev["node"] == "dev1" and dev["result"]["edge"] == "edge1"
    assert dev["result"]["uptime_s"] >= 0 and "rounds_done" in dev["result"]


def test_unknown_command_gets_an_error_reply_with_code_unknown_command(tb: LocalFleet) -> None:
    reply = tb.ctl("cloud", "reboot_the_moon")
    assert reply["ok"] is False and reply["code"] == "unknown_command"
    assert "reboot_the_moon" in reply["error"] and "ping" in reply["error"]  # lists what is known


def test_args_that_are_not_an_object_are_a_bad_request(tb: LocalFleet) -> None:
    reply = send_raw(tb, "cloud", {"id": uuid.uuid4().hex, "cmd": "set", "args": ["rounds", 5]})
    assert reply["ok"] is False and reply["code"] == "bad_request" and "args" in reply["error"]


@pytest.mark.parametrize(("args", "words"), [
    ({"rounds": "x"}, ["rounds", "wrong type"]),
    ({"lr": -1}, ["lr", "out of range"]),
    ({"rounds": True}, ["rounds", "number"]),
    ({"warp_speed": 9}, ["unknown parameter", "warp_speed", "rounds"]),
])
def test_set_rejects_bad_arguments_with_a_clear_error_and_changes_nothing(
    tb: LocalFleet, args: dict[str, Any], words: list[str]
) -> None:
    before = tb.ctl("cloud", "status")["result"]
    reply = tb.ctl("cloud", "set", **args)
    assert reply["ok"] is False and reply["code"] == "bad_request", reply
    for w in words:
        assert w in reply["error"], reply["error"]
    after = tb.ctl("cloud", "status")["result"]
    assert after["rounds"] == before["rounds"]
    valid = tb.ctl("cloud", "set", lr=0.01)  # a valid set answers with exactly what it set
    assert valid["ok"] and valid["result"] == {"lr": 0.01}


def test_a_node_not_in_operators_is_refused_and_the_refusal_is_reported(tb: LocalFleet, tmp_path: Path) -> None:
    state_before = tb.ctl("cloud", "status")["result"]["state"]
    intruder = Transport(agent_config(tb.broker, tb.spec.fleet, "dev2", role="device")).start()
    try:
        ids = {node: uuid.uuid4().hex for node in ("cloud", "dev1")}
        intruder.send_json("ctl", "cloud", {"id": ids["cloud"], "cmd": "start", "args": {}})
        intruder.send_json("ctl", "dev1", {"id": ids["dev1"], "cmd": "set_edge", "args": {"edge": "edge9"}})
        replies: dict[str, dict[str, Any]] = {}
        events: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 15.0
        while len(replies) < 2 or len(events) < 2:
            msg = intruder.get(timeout=max(0.0, deadline - time.monotonic()))
            assert msg is not None, f"timed out: replies={replies} events={events}"
            if msg.kind == "reply" and msg.data is not None and msg.data.get("id") in ids.values():
                replies[msg.src] = msg.data
            elif (msg.kind == "event" and msg.data is not None and msg.data.get("event") == "dropped"
                  and msg.data.get("reason") == "unauthorised"):
                events[msg.src] = msg.data
        for node in ("cloud", "dev1"):
            assert replies[node]["ok"] is False and replies[node]["code"] == "unauthorised"
            assert "dev2" in replies[node]["error"]
            assert "dev2" in events[node]["detail"]
    finally:
        intruder.stop()
    assert tb.ctl("cloud", "status")["result"]["state"] == state_before
    assert tb.ctl("dev1", "status")["result"]["edge"] == "edge1"


def test_run_commands_change_the_cloud_state_as_status_reports(tb: LocalFleet) -> None:
    def state() -> str:
        reply = tb.ctl("cloud", "status")
        assert reply["ok"], reply
        published = [m.data for m in tb.inbox if m.kind == "status" and m.src == "cloud" and m.data]
        # The cloud publishes its status before it replies, and one subscriber receives one publisher's
        # messages in order: the presence monitors see (retained) already tells the new state.
        assert published and published[-1]["state"] == reply["result"]["state"], published[-1:]
        return str(reply["result"]["state"])

    if state() == "running":
        assert tb.ctl("cloud", "stop")["ok"]
    assert tb.ctl("cloud", "set", rounds=500)["result"] == {"rounds": 500}
    assert tb.ctl("cloud", "status")["result"]["rounds"] == 500
    try:
        started = tb.ctl("cloud", "start")
        assert started["ok"] and started["result"]["state"] == "running", started
        assert state() == "running"
        again = tb.ctl("cloud", "start")
        assert again["ok"] is False and again["code"] == "busy"
        assert tb.ctl("cloud", "pause")["result"]["state"] == "paused"
        assert state() == "paused"
        twice = tb.ctl("cloud", "pause")
        assert twice["ok"] is False and twice["code"] == "bad_state"
        assert tb.ctl("cloud", "resume")["result"]["state"] == "running"
        assert state() == "running"
    finally:
        stopped = tb.ctl("cloud", "stop")
    assert stopped["ok"] and stopped["result"]["state"] == "stopped"
    status = tb.ctl("cloud", "status")["result"]
    assert status["state"] == "stopped" and status["in_round"] is False
    not_paused = tb.ctl("cloud", "resume")
    assert not_paused["ok"] is False and not_paused["code"] == "bad_state"


def test_shutdown_stops_the_agent_process_gracefully(tb: LocalFleet) -> None:
    proc = tb.procs["spare"]
    r = ctl_cli(tb, "spare", "shutdown")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "spare shutdown: ok" in r.stdout
    assert proc.wait(timeout=20) == 0, tb.log_tail("spare")
    # The agent published its offline status itself (retained) before disconnecting: a fresh subscriber
    # gets it at once.
    watcher = Transport(agent_config(tb.broker, tb.spec.fleet, f"w{uuid.uuid4().hex[:8]}")).start()
    try:
        while True:
            msg = watcher.get(timeout=10.0)
            assert msg is not None, "no retained status for spare"
            if msg.kind == "status" and msg.src == "spare":
                assert msg.retained and msg.data is not None and msg.data["state"] == "offline"
                break
    finally:
        watcher.stop(publish_offline=False)
    assert '"stopping"' in tb.log_tail("spare")


# --- mqttfl ctl --------------------------------------------------------------------------------------------


def test_ctl_cli_exit_status_is_0_on_ok_1_on_error_reply_3_on_no_reply(tb: LocalFleet) -> None:
    ok = ctl_cli(tb, "cloud", "ping")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("cloud ping: ok") and "pong" in ok.stdout

    err = ctl_cli(tb, "cloud", "no_such_command")
    assert err.returncode == 1
    assert "unknown_command" in err.stderr and "no_such_command" in err.stderr

    silent = ctl_cli(tb, "ghost", "ping", "--timeout", "1.5")
    assert silent.returncode == 3
    assert "no reply from ghost" in silent.stderr

    # The tool connects with its own client id, so commanding as "operator" leaves the operator session
    # that already runs under that node id (here the testbed's) connected.
    assert all(change.up for change in tb.connect_operator().link_changes())


def ctl_in_process(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The same entry point as the console script, without paying for a new interpreter."""
    try:
        rc = cli_main(["ctl", *argv])
    except SystemExit as e:  # argparse's own usage errors
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def test_ctl_parses_values_as_json_and_prints_the_reply_as_json(
    tb: LocalFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = ["--fleet", tb.spec.fleet, "--port", str(tb.broker.port)]
    rc, out, err = ctl_in_process(capsys, "cloud", "set", "rounds=600", "lr=0.05", "--json", *conn)
    assert rc == 0, err
    reply = json.loads(out)
    assert reply["ok"] is True and reply["node"] == "cloud" and reply["cmd"] == "set" and reply["id"]
    assert reply["result"] == {"rounds": 600, "lr": 0.05}

    rc, out, err = ctl_in_process(capsys, "cloud", "set", "rounds=x", "--json", *conn)
    assert rc == 1
    bad_reply = json.loads(out)
    assert bad_reply["code"] == "bad_request" and "rounds" in bad_reply["error"]


@pytest.mark.parametrize(("argv", "words"), [
    (["cloud", "set", "rounds"], "not key=value"),
    (["cloud", "set", "=5"], "not key=value"),
    (["cloud", "set", "rounds=1", "rounds=2"], "given twice"),
    (["Cloud/x", "ping"], "invalid id"),
    (["cloud", "ping", "--as", "Not An Id"], "invalid id"),
    (["cloud", "ping", "--timeout", "0"], "--timeout"),
    (["cloud"], "required"),  # argparse: CMD missing
])
def test_ctl_usage_errors_exit_2_without_connecting(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    # Port 1: nothing listens there, so reaching the network would exit 3, not 2.
    rc, _, err = ctl_in_process(capsys, "--port", "1", "--timeout", "5", *argv)
    assert rc == 2 and words in err, err


def test_ctl_exits_3_when_no_broker_listens(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = ctl_in_process(capsys, "cloud", "ping", "--port", str(free_port()), "--timeout", "1")
    assert rc == 3 and "no connection" in err


def test_ctl_refuses_credentials_in_clear_to_a_remote_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    rc, _, err = ctl_in_process(capsys, "cloud", "ping", "--host", "broker.example.org", "--username", "operator",
                                "--password-file", str(pw))
    assert rc == 2 and "refusing to send credentials in clear" in err


def test_ctl_and_monitor_run_without_importing_torch(tb: LocalFleet) -> None:
    code = (
        "import sys\n"
        "from mqttfl.tools.cli import main\n"
        f"rc = main(['ctl', 'cloud', 'ping', '--fleet', {tb.spec.fleet!r}, '--port', '{tb.broker.port}'])\n"
        f"rc2 = main(['monitor', '--once', '--json', '--interval', '0.2', '--fleet', {tb.spec.fleet!r},"
        f" '--port', '{tb.broker.port}'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(rc or rc2)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ctl_cli_stops_on_ctrl_c_while_waiting(tb: LocalFleet) -> None:
    # A silent "ghost" node receives the command, so the test knows the tool is waiting for the reply.
    ghost = Transport(agent_config(tb.broker, tb.spec.fleet, "ghost")).start()
    p = subprocess.Popen([sys.executable, "-m", "mqttfl.tools.cli", "ctl", "ghost", "ping", "--timeout", "60",
                          "--fleet", tb.spec.fleet, "--port", str(tb.broker.port)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ignore_sigint)
    try:
        msg = ghost.get(timeout=20.0)
        while msg is not None and msg.kind != "ctl":
            msg = ghost.get(timeout=20.0)
        assert msg is not None and msg.src == "operator" and msg.data is not None
        assert msg.data["cmd"] == "ping" and msg.data["args"] == {}
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=10) == 130
    finally:
        ghost.stop(publish_offline=False)
        if p.poll() is None:
            p.kill()
            p.wait()


# --- key=value parsing -------------------------------------------------------------------------------------


def test_key_value_arguments_parse_as_json_when_they_can() -> None:
    assert parse_params(["rounds=5", "lr=0.05", "edge=edge2", 'name="edge2"', "flag=true", "ids=[1,2]",
                         "text=hello world", "n=NaN", "big=1e999", "empty="]) == {
        "rounds": 5, "lr": 0.05, "edge": "edge2", "name": "edge2", "flag": True, "ids": [1, 2],
        "text": "hello world", "n": "NaN", "big": "1e999", "empty": "",
    }
    assert parse_params(["expr=a=b"]) == {"expr": "a=b"}
