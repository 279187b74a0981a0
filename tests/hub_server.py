"""A web server on the loopback address that serves weight files the way the Hugging Face Hub
and OpenAI's CDN do, for the tests of weights by name (and benchmarks/named_load.py).

Hub: HEAD and GET /ORG/REPO/resolve/REVISION/PATH, with the headers huggingface_hub reads
(X-Repo-Commit, an ETag that is the SHA-256 of a large file and the git hash of a small one,
Content-Length, ranges) and its error codes (X-Error-Code: RepoNotFound, GatedRepo,
RevisionNotFound, EntryNotFound). CDN: GET /diff-vae/SHA256/FILE, with ranges.

Faults, per URL path: "corrupt" flips a byte of every body sent; "cut" sends half of the next
body and closes the connection. Every request is logged: (method, path, Range header).
"""

from __future__ import annotations

import hashlib
import http.server
import threading

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".pt", ".bin")


class Server:
  def __init__(self):
    self.repos: dict[str, dict[str, bytes]] = {}
    self.gated: set[str] = set()
    self.cdn: dict[str, bytes] = {}
    self.faults: dict[str, str] = {}
    self.log: list[tuple[str, str, str]] = []
    self._lock = threading.Lock()
    handler = type("Handler", (_Handler,), {"server_state": self})
    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    self.httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()

  def requests(self, path_part: str = "") -> list[tuple[str, str, str]]:
    with self._lock:
      return [r for r in self.log if path_part in r[1]]

  def _record(self, entry):
    with self._lock:
      self.log.append(entry)


class _Handler(http.server.BaseHTTPRequestHandler):
  server_state: Server
  protocol_version = "HTTP/1.1"

  def log_message(self, *args):  # quiet
    pass

  def do_HEAD(self):
    self._serve(body=False)

  def do_GET(self):
    self._serve(body=True)

  def _serve(self, body: bool):
    state = self.server_state
    path = self.path.split("?")[0]
    state._record((self.command, path, self.headers.get("Range", "")))
    parts = path.lstrip("/").split("/")
    if parts[0] == "diff-vae":
      data = state.cdn.get(path.lstrip("/"))
      if data is None:
        return self._error(404, "")
      return self._send(data, path, body, etag=hashlib.sha256(data).hexdigest())
    if len(parts) < 5 or parts[2] != "resolve":
      return self._error(404, "RepoNotFound")
    repo, revision, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
    if repo not in state.repos:
      return self._error(401, "RepoNotFound")  # the Hub hides private repos this way
    if repo in state.gated and "authorization" not in {k.lower() for k in self.headers}:
      return self._error(401, "GatedRepo")
    if revision not in ("main", COMMIT):
      return self._error(404, "RevisionNotFound")
    data = state.repos[repo].get(file)
    if data is None:
      return self._error(404, "EntryNotFound")
    etag = (hashlib.sha256(data).hexdigest() if file.endswith(LFS_SUFFIXES) else
            hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
    self._send(data, path, body, etag=etag, commit=COMMIT)

  def _send(self, data: bytes, path: str, body: bool, etag: str, commit: str = ""):
    state = self.server_state
    start, status = 0, 200
    wanted = self.headers.get("Range", "")
    if wanted.startswith("bytes=") and wanted.endswith("-"):
      start = int(wanted[len("bytes="):-1])
      if start >= len(data):
        return self._error(416, "")
      status = 206
    self.send_response(status)
    self.send_header("Content-Length", str(len(data) - start))
    self.send_header("Accept-Ranges", "bytes")
    self.send_header("ETag", f'"{etag}"')
    if commit:
      self.send_header("X-Repo-Commit", commit)
    if status == 206:
      self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    self.end_headers()
    if not body:
      return
    fault = state.faults.get(path)
    out = data[start:]
    if fault == "corrupt":
      out = bytes([out[0] ^ 0xFF]) + out[1:]
    if fault == "cut":
      del state.faults[path]  # once
      self.wfile.write(out[:len(out) // 2])
      self.wfile.flush()
      self.close_connection = True
      self.connection.shutdown(2)
      return
    self.wfile.write(out)

  def _error(self, code: int, error_code: str):
    self.send_response(code)
    if error_code:
      self.send_header("X-Error-Code", error_code)
      self.send_header("X-Error-Message", f"{error_code} (test server)")
    self.send_header("Content-Length", "0")
    self.end_headers()
