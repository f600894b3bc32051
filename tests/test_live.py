"""The loopback helpers of grader.live that graded tests and lessons rely on."""

from __future__ import annotations

import http.server
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from grader.live import free_port, http_only, wait_until_up


class NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answering() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_any_http_answer_means_up(answering):
    wait_until_up(f"{answering}/health?deep=1", timeout=5)  # a 404 is an answer: the server is up


def test_nothing_listening_fails_after_the_timeout():
    url = f"http://127.0.0.1:{free_port()}/health"
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="nothing answered at .* within"):
        wait_until_up(url, timeout=0.2)
    assert time.monotonic() - started < 3


def test_a_server_process_that_exits_is_reported_at_once():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    with pytest.raises(RuntimeError, match="exited with code 3"):
        wait_until_up(f"http://127.0.0.1:{free_port()}/", timeout=30, process=process)


def test_http_only_speaks_plain_http_and_trusts_no_certificate(answering):
    context = http_only()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname  # fails closed
    assert context.get_ca_certs() == []  # no CA bundle loaded: nothing would verify
    with httpx.Client(base_url=answering, verify=context) as client:
        assert client.get("/").status_code == 404
