"""
A local stand-in for the parts of the Shadeform REST API that scripts/launch_shadeform.sh uses
(instances/types, instances/create, instances/{id}/info, instances/{id}/delete, instances,
sshkeys, sshkeys/add), plus fake `ssh` and `rsync` executables, for tests/test_launch_shadeform.py.

The API (FakeShadeform) runs in a thread of the test process on 127.0.0.1 and records every
request. Instances go pending -> active after `active_after` info polls (never, with
never_active=True); deleting one marks it deleted and touches <remote_home>/STOP, which the fake
machine's jobs watch, as the real machine would disappear.

The fake machine is a local directory (remote_home): `python fake_shadeform.py ssh ARGS` runs the
remote command with bash in that directory (HOME set to it); `python fake_shadeform.py rsync ARGS`
copies between local paths and "host:path" (relative to remote_home). Both append their argv to
$FAKE_LOG as JSON lines.
"""

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from fnmatch import fnmatch
from urllib.parse import parse_qs, urlparse

# http.server is imported where the server is built: the fake ssh/rsync start many times per test
# and should not pay for it.


def instance_type(cloud, itype, gpu, n, cents, regions):
    """An entry of GET /instances/types. regions: {name: available}."""
    return {
        "cloud": cloud,
        "shade_instance_type": itype,
        "cloud_instance_type": f"{cloud}-{itype}",
        "hourly_price": cents,
        "configuration": {"gpu_type": gpu, "num_gpus": n, "vcpus": 26 * n, "memory_in_gb": 200 * n, "storage_in_gb": 1000, "vram_per_gpu_in_gb": 80, "interconnect": "sxm5", "os_options": ["ubuntu22.04"]},
        "availability": [{"region": r, "available": a} for r, a in regions.items()],
    }


DEFAULT_TYPES = [
    instance_type("lambdalabs", "H100x8", "H100", 8, 2392, {"us-east-1": True, "us-west-2": True}),
    instance_type("datacrunch", "H100x8", "H100", 8, 1990, {"FIN-01": True}),  # the cheapest available
    instance_type("hyperstack", "H100x8", "H100", 8, 1500, {"canada-1": False}),  # cheaper, not available
    instance_type("datacrunch", "H100x1", "H100", 1, 250, {"FIN-01": True}),
    instance_type("aws", "A100_80Gx8", "A100_80G", 8, 3300, {"us-east-1": True}),
]


class FakeShadeform:
    def __init__(self, remote_home, api_key="test-key", instance_types=None, ssh_keys=None, active_after=2, never_active=False, create_error=None):
        self.remote_home = str(remote_home)
        self.api_key = api_key
        self.instance_types = DEFAULT_TYPES if instance_types is None else instance_types
        self.ssh_keys = list(ssh_keys or [])
        self.active_after = active_after
        self.never_active = never_active
        self.create_error = create_error  # (HTTP status, message) returned by instances/create
        self.requests = []  # (method, path with query, JSON body or None)
        self.instances = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        from http.server import ThreadingHTTPServer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def running(self):
        """Instances not deleted."""
        return [i for i in self.instances.values() if i["status"] != "deleted"]

    def calls(self, method, pattern):
        return [r for r in self.requests if r[0] == method and re.fullmatch(pattern, urlparse(r[1]).path)]

    # ------------------------------------------------------------------ routes

    def route(self, method, path, query, body):
        if method == "GET" and path == "/v1/instances/types":
            types = self.instance_types
            if "gpu_type" in query:
                types = [t for t in types if t["configuration"]["gpu_type"] == query["gpu_type"][0]]
            if "num_gpus" in query:
                types = [t for t in types if t["configuration"]["num_gpus"] == int(query["num_gpus"][0])]
            if "cloud" in query:
                types = [t for t in types if t["cloud"] == query["cloud"][0]]
            if query.get("available") == ["true"]:
                types = [t for t in types if any(a["available"] for a in t["availability"])]
            return 200, {"instance_types": types}
        if method == "GET" and path == "/v1/sshkeys":
            return 200, {"ssh_keys": self.ssh_keys}
        if method == "POST" and path == "/v1/sshkeys/add":
            if not (isinstance(body, dict) and body.get("name") and body.get("public_key")):
                return 400, {"error": "name and public_key are required"}
            key = {"id": f"key-{next(self._ids)}", "name": body["name"], "public_key": body["public_key"], "is_default": False}
            self.ssh_keys.append(key)
            return 200, {"id": key["id"]}
        if method == "POST" and path == "/v1/instances/create":
            if self.create_error:
                return self.create_error[0], {"error": self.create_error[1]}
            required = ("cloud", "region", "shade_instance_type", "shade_cloud", "name")
            if not isinstance(body, dict) or any(k not in body for k in required):
                return 400, {"error": f"missing fields: {[k for k in required if k not in (body or {})]}"}
            offered = any(
                t["cloud"] == body["cloud"] and t["shade_instance_type"] == body["shade_instance_type"] and any(a["region"] == body["region"] and a["available"] for a in t["availability"])
                for t in self.instance_types
            )
            if not offered:
                return 400, {"error": f"{body['shade_instance_type']} is not available on {body['cloud']} in {body['region']}"}
            iid = f"inst-{next(self._ids)}"
            self.instances[iid] = {"id": iid, "cloud": body["cloud"], "region": body["region"], "shade_instance_type": body["shade_instance_type"], "name": body["name"],
                                   "status": "pending", "ip": None, "ssh_user": "shadeform", "ssh_port": 22, "polls": 0, "request": body}
            return 200, {"id": iid, "cloud_assigned_id": f"cloud-{iid}"}
        m = re.fullmatch(r"/v1/instances/([^/]+)/(info|delete)", path)
        if m:
            inst = self.instances.get(m.group(1))
            if inst is None:
                return 404, {"error": f"instance {m.group(1)} not found"}
            if m.group(2) == "info" and method == "GET":
                inst["polls"] += 1
                if inst["status"] == "pending" and not self.never_active and inst["polls"] > self.active_after:
                    inst["status"], inst["ip"] = "active", "127.0.0.1"
                return 200, {k: v for k, v in inst.items() if k not in ("polls", "request")}
            if m.group(2) == "delete" and method == "POST":
                inst["status"] = "deleted"
                os.makedirs(self.remote_home, exist_ok=True)
                open(os.path.join(self.remote_home, "STOP"), "w").close()  # the machine goes away
                return 200, None
        if method == "GET" and path == "/v1/instances":
            return 200, {"instances": [{k: v for k, v in i.items() if k not in ("polls", "request")} for i in self.running()]}
        return 404, {"error": f"no route {method} {path}"}

    def _handler(self):
        from http.server import BaseHTTPRequestHandler

        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                with fake._lock:
                    fake.requests.append((method, self.path, body))
                    if self.headers.get("X-API-KEY") != fake.api_key:
                        status, payload = 401, {"error": "Unauthorized: invalid API key"}
                    else:
                        url = urlparse(self.path)
                        status, payload = fake.route(method, url.path, parse_qs(url.query), body)
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def log_message(self, *args):  # keep the test output clean
                pass

        return Handler


# ---------------------------------------------------------------------- fake ssh / rsync

SSH_VALUE_OPTIONS = {"-i", "-p", "-o", "-l", "-F", "-E", "-J"}
RSYNC_VALUE_OPTIONS = {"-e", "--exclude", "--include", "--filter", "--rsh"}


def _log(tool, argv):
    path = os.environ.get("FAKE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"tool": tool, "argv": argv}) + "\n")


def fake_ssh(argv):
    remote_home = os.environ["FAKE_REMOTE_HOME"]
    i, host = 0, None
    while i < len(argv):
        if argv[i] in SSH_VALUE_OPTIONS:
            i += 2
        elif argv[i].startswith("-"):
            i += 1
        else:
            host = argv[i]
            break
    command = " ".join(argv[i + 1 :])
    if host is None or not command:
        print("fake ssh: needs a host and a command", file=sys.stderr)
        return 255
    if os.path.exists(os.path.join(remote_home, "STOP")):
        print(f"ssh: connect to host {host} port 22: Connection refused", file=sys.stderr)
        return 255
    env = dict(os.environ, HOME=remote_home)
    return subprocess.run(["bash", "-c", command], cwd=remote_home, env=env).returncode


def _resolve(path, remote_home):
    """A local path, or the fake machine's path for "user@host:path"."""
    m = re.fullmatch(r"[^/:]+@[^/:]+:(.*)", path)
    if not m:
        return path, False
    return os.path.join(remote_home, m.group(1)), True


def fake_rsync(argv):
    remote_home = os.environ["FAKE_REMOTE_HOME"]
    positional, excludes, ignore_missing, i = [], [], False, 0
    while i < len(argv):
        a = argv[i]
        if a in RSYNC_VALUE_OPTIONS:
            if a == "--exclude":
                excludes.append(argv[i + 1].rstrip("/"))
            i += 2
            continue
        if a.startswith("--exclude="):
            excludes.append(a.split("=", 1)[1].rstrip("/"))
        elif a == "--ignore-missing-args":
            ignore_missing = True
        elif not a.startswith("-"):
            positional.append(a)
        i += 1
    if len(positional) < 2:
        print("fake rsync: needs sources and a destination", file=sys.stderr)
        return 1
    if os.path.exists(os.path.join(remote_home, "STOP")):
        print("rsync: connection unexpectedly closed", file=sys.stderr)
        return 255
    dest, _ = _resolve(positional[-1], remote_home)
    ignore = shutil.ignore_patterns(*excludes) if excludes else None
    for src in positional[:-1]:
        path, _ = _resolve(src, remote_home)
        if not os.path.exists(path):
            if ignore_missing:
                continue
            print(f"rsync: link_stat {path} failed: No such file or directory", file=sys.stderr)
            return 23
        contents_only = src.endswith("/")  # rsync: "dir/" copies what is inside dir
        if os.path.isdir(path):
            target = dest if contents_only else os.path.join(dest, os.path.basename(path.rstrip("/")))
            shutil.copytree(path, target, dirs_exist_ok=True, ignore=ignore)
        elif not any(fnmatch(os.path.basename(path), p) for p in excludes):
            os.makedirs(dest, exist_ok=True)
            shutil.copy2(path, dest)
    return 0


if __name__ == "__main__":
    tool, args = sys.argv[1], sys.argv[2:]
    _log(tool, args)
    sys.exit(fake_ssh(args) if tool == "ssh" else fake_rsync(args))
