"""Run one gcloud command line against a loopback stand-in of Cloud Run's Admin API, in a network
namespace of its own (``unshare -rnm``: only a loopback interface exists there, so nothing can
leave this machine whatever gcloud tries), and print the request bodies it sent as JSON lines.

    unshare -rnm python tests/gcloud_sandbox.py 'gcloud run jobs execute ...'

gcloud sends Cloud Run calls to ``REGION-run.googleapis.com``, or with an endpoint override to
``REGION-HOST``; here that name resolves to 127.0.0.1 through an /etc/hosts bound over the real
one inside the namespace. The stand-in answers what ``gcloud run jobs execute`` asks (the job, then
the run call), records each body, and the command is stopped once the run call has arrived. A fake
of the Admin API: nothing real can run here; the point is gcloud's own parsing of the command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

REGION = "europe-west1"
PROJECT = "melodia-sandbox"
JOB = {
    "apiVersion": "run.googleapis.com/v1",
    "kind": "Job",
    "metadata": {"name": "cover-job", "namespace": PROJECT, "generation": 1},
    "spec": {
        "template": {
            "metadata": {"annotations": {"run.googleapis.com/client-name": "terraform"}},
            "spec": {"template": {"spec": {"containers": [{"image": "cover-job:cpu"}]}}},
        }
    },
    "status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]},
}
EXECUTION = {
    "apiVersion": "run.googleapis.com/v1",
    "kind": "Execution",
    "metadata": {"name": "cover-job-sandbox", "namespace": PROJECT},
    "spec": {},
    "status": {},
}

bodies: list[dict] = []
ran = threading.Event()


class AdminApi(BaseHTTPRequestHandler):
    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(EXECUTION if "/executions/" in self.path else JOB)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        bodies.append({"path": self.path.split("?")[0], "body": body})
        self._answer(EXECUTION)
        if self.path.split("?")[0].endswith(":run"):
            ran.set()

    def log_message(self, *args: object) -> None:
        pass


def _loopback_up() -> None:
    """Bring the namespace's loopback interface up (SIOCGIFFLAGS / SIOCSIFFLAGS with IFF_UP)."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        flags = struct.unpack("16sh", fcntl.ioctl(sock, 0x8913, struct.pack("16sh", b"lo", 0)))[1]
        fcntl.ioctl(sock, 0x8914, struct.pack("16sh", b"lo", flags | 0x1))


def main(command: str) -> int:
    _loopback_up()
    work = Path(tempfile.mkdtemp())
    hosts = work / "hosts"
    hosts.write_text(f"127.0.0.1 localhost {REGION}-127.0.0.1\n")
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
    server = HTTPServer(("127.0.0.1", 0), AdminApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (work / "token").write_text("sandbox-token\n")
    env = {
        **os.environ,
        "CLOUDSDK_CONFIG": str(work / "gcloud"),
        "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(work / "token"),
        "CLOUDSDK_CORE_PROJECT": PROJECT,
        "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
        "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN": f"http://127.0.0.1:{server.server_port}/",
    }
    gcloud = subprocess.Popen(["bash", "-c", command], env=env, stderr=subprocess.PIPE, text=True)
    for _ in range(600):  # until the run call arrives or gcloud gives up, at most a minute
        if ran.wait(0.1) or gcloud.poll() is not None:
            break
    gcloud.kill()
    _, stderr = gcloud.communicate()
    for body in bodies:
        print(json.dumps(body))
    if not ran.is_set():
        print(stderr[-3000:], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
