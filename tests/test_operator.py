"""What an operator does: `pulse run`, paste the printed `buf curl`, Ctrl-C."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _wait_for_banner(proc: subprocess.Popen[str], deadline: float) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            return lines
    raise AssertionError("no banner:\n" + "".join(lines))


def _pulse_run(dsn: str, data_dir: Path, grpc_port: int) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "PULSE_DATA_DIR": str(data_dir),
        "PULSE_GRPC_PORT": str(grpc_port),
        "PULSE_HTTP_PORT": "0",
        "PULSE_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen(
        [str(BIN / "pulse"), "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.timeout(90)
def test_pulse_run_prints_a_working_buf_curl_and_stops_on_ctrl_c(dsn: str, tmp_path: Path) -> None:
    proc = _pulse_run(dsn, tmp_path, 0)
    try:
        lines = _wait_for_banner(proc, time.monotonic() + 60)
        curl = next(line.strip() for line in lines if "buf curl" in line)
        # The printed command names .venv/bin/buf relative to the repository.
        argv = shlex.split(curl)
        argv[0] = str(BIN / "buf")
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert out.returncode == 0, out.stderr
        assert '"deviceId": "DEVICE-01"' in out.stdout
        assert '"lifecycleStatus": "ACTIVE"' in out.stdout
        _check_printed_mosquitto_pub(lines)

        # Reflection lists the service, as `buf curl --list-methods` shows operators.
        address = re.search(r"http://([\d.:]+)/", curl)
        assert address
        listed = subprocess.run(
            [
                str(BIN / "buf"),
                "curl",
                "--protocol",
                "grpc",
                "--http2-prior-knowledge",
                "--list-methods",
                f"http://{address.group(1)}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert "pulse.device.v1.DeviceRegistryService/ListDevices" in listed.stdout, listed.stderr
        # Both reflection protocols: grpcurl and buf curl try v1 first.
        for protocol in ("grpc-v1", "grpc-v1alpha"):
            listed = subprocess.run(
                [
                    str(BIN / "buf"),
                    "curl",
                    "--protocol",
                    "grpc",
                    "--http2-prior-knowledge",
                    "--reflect-protocol",
                    protocol,
                    "--list-methods",
                    f"http://{address.group(1)}",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert "pulse.device.v1.TwinService/WatchTwin" in listed.stdout, (
                protocol,
                listed.stderr,
            )
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    assert code == 0


def _check_printed_mosquitto_pub(banner: list[str]) -> None:
    """The printed command speaks as DEVICE-06, and only with its secret."""
    command = next(line.strip() for line in banner if line.strip().startswith("mosquitto_pub"))
    if shutil.which("mosquitto_pub") is None:
        return  # Debian's mosquitto-clients is on this machine and in CI
    argv = shlex.split(command)
    sent = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert sent.returncode == 0, sent.stderr
    if os.environ.get("MQTT_URL"):
        return  # a shared broker of its own, whose access rules are not ours
    wrong = argv.copy()
    wrong[wrong.index("-P") + 1] += "x"
    refused = subprocess.run(wrong, capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode != 0
    assert "not authori" in refused.stderr.lower() or "bad user" in refused.stderr.lower()


@pytest.mark.parametrize("command", ["run", "serve", "evaluator", "rollouts", "migrate"])
def test_an_unreachable_database_is_said_plainly_at_start(command: str, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on once released
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "PULSE_DATA_DIR": str(tmp_path),
        "DATABASE_URL": f"postgresql://pulse:hunter2@127.0.0.1:{port}/pulse",
        "MQTT_URL": "mqtt://127.0.0.1:1",
    }
    out = subprocess.run(
        [str(BIN / "pulse"), command], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert f"cannot reach the database at postgresql://pulse:***@127.0.0.1:{port}/pulse" in (
        out.stderr
    )
    assert "Traceback" not in out.stderr and "hunter2" not in out.stderr


def test_pulse_token_mints_a_verifiable_token(tmp_path: Path) -> None:
    env = {**os.environ, "PULSE_DATA_DIR": str(tmp_path)}
    out = subprocess.run(
        [str(BIN / "pulse"), "token", "--role", "viewer"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    token = out.stdout.strip()
    assert token.count(".") == 2
    assert (tmp_path / "secret").stat().st_mode & 0o077 == 0


@pytest.mark.timeout(90)
def test_ctrl_c_with_a_browser_open_stops_quickly_and_quietly(dsn: str, tmp_path: Path) -> None:
    """A taken gRPC port is an ordinary fallback, not an error; an open event
    stream (a console tab) does not hold the shutdown up, and the API stops
    answering as soon as the signal arrives."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        proc = _pulse_run(dsn, tmp_path, taken_port)
        try:
            lines = _wait_for_banner(proc, time.monotonic() + 60)
        except BaseException:
            proc.kill()
            raise
    banner = "".join(lines)
    token = re.search(r"admin token\s+(\S+)", banner)
    http = re.search(r"console\s+(http://[\d.:]+)/", banner)
    grpc_address = re.search(r"gRPC\s+([\d.:]+)", banner)
    assert token and http and grpc_address, banner
    assert not grpc_address.group(1).endswith(f":{taken_port}"), banner
    headers = {"Authorization": f"Bearer {token.group(1)}"}
    with httpx.Client(base_url=http.group(1), headers=headers, timeout=30) as browser:
        with browser.stream("GET", "/customer/twins:watch?device_ids=DEVICE-01") as events:
            assert events.status_code == 200
            stream = events.iter_lines()
            assert next(line for line in stream if line.startswith("data:"))
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            rest = list(stream)  # the stream ends, with a last event saying why
        assert any("shutting down" in line for line in rest), rest
        code = proc.wait(timeout=30)
        took = time.monotonic() - started
    assert code == 0
    assert took < 10, f"stopping took {took:.1f}s"
    output = banner + (proc.stdout.read() if proc.stdout else "")
    for noise in ("Task was destroyed", "add_port", "Traceback"):
        assert noise not in output, output
