"""The example fence hooks in contrib/fence keep their exit-code contract (README.md there)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

FENCE = Path(__file__).resolve().parent.parent / "contrib" / "fence"


def run(hook: str, *args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(FENCE / hook), *args],
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def conf(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    path.chmod(0o600)
    return path


# --- fence-test ----------------------------------------------------------------------------


def test_fence_test_records_and_succeeds(tmp_path):
    log = tmp_path / "fence.log"
    before = time.time()
    done = run("fence-test", "node3", env={"FENCE_TEST_LOG": str(log)})
    assert done.returncode == 0, done.stderr
    (line,) = log.read_text().splitlines()
    record = json.loads(line)
    assert record["argv"] == ["node3"]
    assert before <= record["time"] <= time.time()
    assert "node3 fenced" in done.stdout


def test_fence_test_fails_on_request_and_appends(tmp_path):
    log = tmp_path / "fence.log"
    run("fence-test", "n1", env={"FENCE_TEST_LOG": str(log)})
    done = run("fence-test", "n2", env={"FENCE_TEST_LOG": str(log), "FENCE_TEST_EXIT": "7"})
    assert done.returncode == 7
    assert [json.loads(x)["argv"] for x in log.read_text().splitlines()] == [["n1"], ["n2"]]


def test_fence_test_sleeps_after_recording(tmp_path):
    log = tmp_path / "fence.log"
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run("fence-test", "n1", env={"FENCE_TEST_LOG": str(log), "FENCE_TEST_SLEEP": "5"}, timeout=1.5)
    assert time.monotonic() - started < 4
    assert json.loads(log.read_text())["argv"] == ["n1"]  # seen although it then timed out


def test_fence_test_without_log_prints(tmp_path):
    done = run("fence-test", "n9", env={"FENCE_TEST_LOG": ""})
    assert done.returncode == 0
    assert json.loads(done.stdout.splitlines()[0])["argv"] == ["n9"]


# --- fence-http-pdu against a PDU played by http.server on 127.0.0.1 ----------------------------


class PDU:
    """Outlets by URL path. behaviour: 'ok', 'error' (POST answers 500) or 'stuck' (stays on)."""

    def __init__(self, behaviour: str = "ok"):
        self.behaviour = behaviour
        self.state: dict[str, str] = {}
        self.requests: list[tuple[str, str, str | None, bytes]] = []
        pdu = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                pdu.requests.append(("POST", self.path, self.headers.get("Authorization"), body))
                if pdu.behaviour == "error":
                    return self._answer(500, {"error": "relay fault"})
                if pdu.behaviour == "ok":
                    pdu.state[self.path] = json.loads(body)["state"]
                return self._answer(200, {"accepted": True})

            def do_GET(self):
                pdu.requests.append(("GET", self.path, self.headers.get("Authorization"), b""))
                self._answer(200, {"outlet": self.path, "state": pdu.state.get(self.path, "on")})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def pdu_env(tmp_path: Path) -> dict:
    return {"RECONCILER_FENCE_DIR": str(tmp_path)}


def test_http_pdu_switches_every_outlet_off(tmp_path):
    with PDU("ok") as pdu:
        conf(
            tmp_path,
            "pdu-node3.conf",
            f"# node3 has two power supplies\nurl = {pdu.url}/outlets/7\nurl = {pdu.url}/outlets/8  # second PSU\n"
            "user = fence\npassword = s3cret\ntimeout = 5\n",
        )
        done = run("fence-http-pdu", "node3", env=pdu_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert pdu.state == {"/outlets/7": "off", "/outlets/8": "off"}
    assert "node3 is off (2 outlet(s))" in done.stdout
    posts = [r for r in pdu.requests if r[0] == "POST"]
    assert [p[1] for p in posts] == ["/outlets/7", "/outlets/8"]
    assert posts[0][2] == "Basic " + base64.b64encode(b"fence:s3cret").decode()
    assert json.loads(posts[0][3]) == {"state": "off"}
    # it read each outlet back after switching it
    assert [r[:2] for r in pdu.requests] == [
        ("POST", "/outlets/7"), ("GET", "/outlets/7"), ("POST", "/outlets/8"), ("GET", "/outlets/8"),
    ]


def test_http_pdu_error_answer_fails(tmp_path):
    with PDU("error") as pdu:
        conf(tmp_path, "pdu-node3.conf", f"url = {pdu.url}/outlets/7\ntimeout = 5\n")
        done = run("fence-http-pdu", "node3", env=pdu_env(tmp_path))
    assert done.returncode == 1
    assert "HTTP 500" in done.stderr


def test_http_pdu_outlet_that_stays_on_fails_within_its_timeout(tmp_path):
    with PDU("stuck") as pdu:
        conf(tmp_path, "pdu-node3.conf", f"url = {pdu.url}/outlets/7\ntimeout = 1\n")
        started = time.monotonic()
        done = run("fence-http-pdu", "node3", env=pdu_env(tmp_path))
        took = time.monotonic() - started
    assert done.returncode == 1
    assert "not confirmed off in time (last state 'on')" in done.stderr
    assert took < 4


def test_http_pdu_unreachable_fails(tmp_path):
    with PDU() as pdu:
        url = pdu.url  # a port nobody listens on once the server is gone
    conf(tmp_path, "pdu-node3.conf", f"url = {url}/outlets/7\ntimeout = 2\n")
    done = run("fence-http-pdu", "node3", env=pdu_env(tmp_path))
    assert done.returncode == 1


def test_http_pdu_missing_or_unsafe_config_fails(tmp_path):
    done = run("fence-http-pdu", "node3", env=pdu_env(tmp_path))
    assert done.returncode == 1
    assert "pdu-node3.conf is missing or unreadable" in done.stderr
    conf(tmp_path, "pdu-node3.conf", "url = http://127.0.0.1:9/x\n").chmod(0o666)
    done = run("fence-http-pdu", "node3", env=pdu_env(tmp_path))
    assert done.returncode == 1
    assert "writable by group or others" in done.stderr


def test_http_pdu_refuses_bad_node_names(tmp_path):
    for bad in ("../etc/passwd", "", "-x"):
        assert run("fence-http-pdu", bad, env=pdu_env(tmp_path)).returncode == 2


# --- fence-ipmi ------------------------------------------------------------------------------


def test_fence_ipmi_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(FENCE / "fence-ipmi")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_fence_ipmi_without_config_fails_clearly(tmp_path):
    done = run("fence-ipmi", "node3", env={"RECONCILER_FENCE_DIR": str(tmp_path)})
    assert done.returncode != 0
    assert f"{tmp_path}/ipmi-node3.conf is missing or unreadable: cannot fence node3" in done.stderr


def test_fence_ipmi_refuses_bad_names_and_unsafe_config(tmp_path):
    assert run("fence-ipmi", "../x", env={"RECONCILER_FENCE_DIR": str(tmp_path)}).returncode == 2
    assert run("fence-ipmi").returncode == 2
    conf(tmp_path, "ipmi-node3.conf", "host = bmc3\nuser = u\npassword = p\n").chmod(0o646)
    done = run("fence-ipmi", "node3", env={"RECONCILER_FENCE_DIR": str(tmp_path)})
    assert done.returncode != 0
    assert "writable by group or others" in done.stderr


FAKE_IPMITOOL = """#!/bin/bash
# plays a BMC: records its argv and password; "power off" switches a state file off
echo "$* pw=$IPMI_PASSWORD" >> "$FAKE_BMC/calls"
case "$*" in
  *"chassis power off") [ "$FAKE_BMC_MODE" = stuck ] || echo off > "$FAKE_BMC/state"; echo "Chassis Power Control: Down/Off" ;;
  *"chassis power status") echo "Chassis Power is $(cat "$FAKE_BMC/state" 2>/dev/null || echo on)" ;;
  *) exit 1 ;;
esac
"""


@pytest.mark.parametrize("mode", ["ok", "stuck"])
def test_fence_ipmi_against_a_fake_ipmitool(tmp_path, mode):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "ipmitool"
    fake.write_text(FAKE_IPMITOOL)
    fake.chmod(0o755)
    conf(tmp_path, "ipmi-node3.conf", "# node3's BMC\nhost = 10.0.0.13\nuser = fence\npassword = s3cret # secret\ntimeout = 2\n")
    env = {
        "RECONCILER_FENCE_DIR": str(tmp_path),
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "FAKE_BMC": str(tmp_path),
        "FAKE_BMC_MODE": mode,
    }
    done = run("fence-ipmi", "node3", env=env)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "-I lanplus -H 10.0.0.13 -U fence -E -N 1 -R 1 chassis power off pw=s3cret"
    assert "s3cret" not in " ".join(c.split(" pw=")[0] for c in calls)  # never on a command line
    if mode == "ok":
        assert done.returncode == 0, done.stderr
        assert "node3 is off" in done.stdout
    else:
        assert done.returncode == 1
        assert "not confirmed off within 2s" in done.stderr
