import socket

from mqttfl.tools.broker import Broker, BrokerOptions


def test_managed_broker_accepts_connections_and_stops(tmp_path):
    b = Broker(BrokerOptions(), workdir=tmp_path)
    b.start()
    try:
        conf = b.conf_path.read_text()
        assert "set_tcp_nodelay true" in conf
        assert "message_size_limit" not in conf
        assert f"listener {b.port} 127.0.0.1" in conf
        with socket.create_connection(("127.0.0.1", b.port), timeout=1):
            pass
    finally:
        b.stop()
    assert b.proc is None
    try:
        with socket.create_connection(("127.0.0.1", b.port), timeout=0.5):
            raise AssertionError("broker still listening after stop")
    except OSError:
        pass
