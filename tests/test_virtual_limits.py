"""``mqttfl virtual``'s open-file budget, without a broker: the soft limit is raised up to the hard one by itself,
and a fleet that cannot fit under the hard limit is refused at start, naming the limit, before anything opens."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

from mqttfl.runtime.netloop import raise_fd_limit


def test_soft_fd_limit_is_raised_up_to_the_hard_limit_only() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_fd_limit(min(512, hard)) == min(512, hard)
        if hard != resource.RLIM_INFINITY:
            assert raise_fd_limit(hard + 1000) == hard  # never past the hard limit, and no error
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _low_hard_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))


def test_a_fleet_over_the_hard_fd_limit_is_refused_naming_it(tmp_path: Path) -> None:
    cfg = tmp_path / "vdev.toml"
    cfg.write_text(f'node = "vdev"\nstate_dir = "{tmp_path / "state" / "vdev"}"\n\n[device]\nedge = "edge1"\n'
                   f'data = "{tmp_path / "missing.npz"}"\n')
    p = subprocess.run([sys.executable, "-m", "mqttfl.tools.cli", "virtual", "--config", str(cfg), "--count", "100",
                        "--mode", "replay"], capture_output=True, text=True, timeout=120, preexec_fn=_low_hard_limit)
    assert p.returncode == 2, p.stderr
    assert "100 devices need about 364 open files" in p.stderr and "ulimit -Hn" in p.stderr, p.stderr
    assert not (tmp_path / "state").exists(), "nothing is created for a fleet that cannot run"
