"""Weights by name (`openai/consistency-decoder`, `hf://...`, `openai:...`), fetched from a
web server on the loopback address that serves small models in the Hub's layout and API
paths (through HF_ENDPOINT) and at the CDN's path shape (tests/hub_server.py). Every command
runs in a child process, as a user runs it, with its own caches."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import jaxconsdec as jcd
from hostile import cli_command, snapshot
from hub_server import Server

torch = pytest.importorskip("torch")  # the published files are written by diffusers / torch
pytest.importorskip("huggingface_hub")

NAME = "openai/consistency-decoder"
WEIGHTS = "diffusion_pytorch_model.safetensors"

# One child process: the name is resolved (timed) and the decoder's params are saved.
LOAD = """
import sys, time, numpy as np, jax, jaxconsdec as jcd
from jaxconsdec import loading
config = jcd.TINY if sys.argv[3] == "tiny" else None
start = time.perf_counter()
path = loading.local(sys.argv[1], config=config)
print("SECONDS", time.perf_counter() - start)
params, _ = jcd.load(path, config=config)
np.savez(sys.argv[2], **{jax.tree_util.keystr(p): np.asarray(v)
                         for p, v in jax.tree_util.tree_flatten_with_path(params)[0]})
"""


@pytest.fixture(scope="module")
def published(tmp_path_factory):
  """The server, with a TINY ConsistencyDecoderVAE in the Hub's diffusers layout (also under
  a gated name), and a TINY TorchScript decoder.pt at the CDN's path shape; and the same
  files on disk."""
  import weight_files
  from reference import diffusers_unet, diffusers_vae
  folder = tmp_path_factory.mktemp("published")
  weights = weight_files.write_diffusers(str(folder / "hub"), diffusers_vae(jcd.TINY, 61),
                                         torch.float32)
  config = open(os.path.join(os.path.dirname(weights), "config.json"), "rb").read()
  decoder_pt = str(folder / "decoder.pt")
  weight_files.write_torchscript(decoder_pt, diffusers_unet(jcd.TINY, 62), jcd.TINY,
                                 "parameter")
  data = open(decoder_pt, "rb").read()
  cdn_path = f"diff-vae/{hashlib.sha256(data).hexdigest()}/decoder.pt"
  server = Server()
  repo = {"config.json": config, WEIGHTS: open(weights, "rb").read()}
  server.repos[NAME] = repo
  server.repos["someone/gated-decoder"] = repo
  server.gated.add("someone/gated-decoder")
  server.cdn[cdn_path] = data
  yield {"server": server, "weights": weights, "decoder_pt": decoder_pt,
         "cdn_name": f"openai:{cdn_path}", "cdn_path": "/" + cdn_path}
  server.close()


def _env(published, tmp_path, **extra):
  server = published["server"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_ENDPOINT=server.url,
             HF_HOME=str(tmp_path / "hf"), JAXCONSDEC_CACHE=str(tmp_path / "cache"),
             JAXCONSDEC_OPENAI_ENDPOINT=server.url, HF_HUB_DISABLE_TELEMETRY="1",
             HF_HUB_DISABLE_PROGRESS_BARS="1", **extra)
  for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    if name not in extra:
      env.pop(name, None)
  return env


def _load(env, name, out, config="own", timeout=300):
  proc = subprocess.run([sys.executable, "-c", LOAD, name, str(out), config], env=env,
                        capture_output=True, text=True, timeout=timeout)
  seconds = next((float(l.split()[1]) for l in proc.stdout.splitlines()
                  if l.startswith("SECONDS")), None)
  return proc, seconds


def _cli(env, *args, file_size_limit=None, timeout=300):
  return subprocess.run(cli_command(*args, file_size_limit=file_size_limit), env=env,
                        capture_output=True, text=True, timeout=timeout)


def _arrays(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _last_line(proc):
  return proc.stderr.strip().splitlines()[-1]


def _latents(tmp_path):
  folder = tmp_path / "latents"
  folder.mkdir(exist_ok=True)
  np.save(folder / "one.npy", np.random.default_rng(0).normal(size=(4, 8, 8)).astype("f4"))
  return folder


def _files_in_cache(tmp_path):
  """The regular files of the weights cache, but its lock files."""
  weights = tmp_path / "cache" / "weights"
  return [p for p, (kind, _, _) in snapshot(weights, skip=[weights / "locks"]).items()
          if kind == 0o10]


def _entries(tmp_path):
  folder = tmp_path / "cache" / "weights" / "entries"
  return sorted(os.listdir(folder)) if folder.is_dir() else []


def test_a_hub_name_is_fetched_and_converted_once_then_served_from_the_cache(published,
                                                                           tmp_path):
  server, env = published["server"], _env(published, tmp_path)
  first, t_first = _load(env, NAME, tmp_path / "first.npz")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "converting hf://openai/consistency-decoder@main into the cache" in first.stderr
  fetched = len(server.requests("/openai/consistency-decoder/"))
  assert fetched > 0
  # The second use reads the cache: no request reaches the server, and it is faster.
  second, t_second = _load(env, NAME, tmp_path / "second.npz")
  assert second.returncode == 0, second.stderr[-3000:]
  assert len(server.requests("/openai/consistency-decoder/")) == fetched
  assert t_second < t_first, (t_second, t_first)
  print("SECONDS first", t_first, "cached", t_second)
  # The params equal those of the same file converted from disk, and the command decodes
  # with the name exactly as with the local file.
  local = tmp_path / "local.npz"
  proc, _ = _load(env, published["weights"], local)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _same(_arrays(tmp_path / "first.npz"), _arrays(local))
  _same(_arrays(tmp_path / "second.npz"), _arrays(local))
  latents = _latents(tmp_path)
  outs = []
  for weights in (f"hf://{NAME}", published["weights"]):
    out = tmp_path / f"out-{len(outs)}"
    proc = _cli(env, "decode", latents, "-o", out, "--weights", weights, "--format", "npy",
                "--no-progress", "--compile-cache", tmp_path / "xla")  # compiled once
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs.append(np.load(out / "one.npy"))
  np.testing.assert_array_equal(outs[0], outs[1])
  assert len(server.requests("/openai/consistency-decoder/")) == fetched
  assert _entries(tmp_path) and len(_entries(tmp_path)) == 1
  # Offline: the cached name loads; one never fetched is refused, saying why.
  offline = _env(published, tmp_path, HF_HUB_OFFLINE="1")
  proc, _ = _load(offline, NAME, tmp_path / "offline.npz")
  assert proc.returncode == 0, proc.stderr[-3000:]
  before = len(server.log)
  proc = _cli(offline, "decode", latents, "-o", tmp_path / "x", "--weights",
              "hf://openai/other-decoder", "--no-progress", "--no-compile-cache")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "HF_HUB_OFFLINE" in _last_line(proc) and "not in jaxconsdec's weights cache" in (
      _last_line(proc))
  assert len(server.log) == before
  # The cache lists the name with its size, and clears it.
  listed = _cli(env, "cache", "list")
  assert listed.returncode == 0 and "hf://openai/consistency-decoder@main" in listed.stdout
  cleared = _cli(env, "cache", "clear", NAME)
  assert cleared.returncode == 0 and "1 item(s) removed" in cleared.stdout, cleared.stdout
  assert _entries(tmp_path) == []


def test_a_cdn_download_cut_midway_resumes_and_a_corrupted_one_is_refused(published,
                                                                          tmp_path):
  server, env = published["server"], _env(published, tmp_path)
  name, path = published["cdn_name"], published["cdn_path"]
  size = len(server.cdn[path.lstrip("/")])
  server.faults[path] = "cut"
  proc, _ = _load(env, name, tmp_path / "cut.npz", config="tiny")
  assert proc.returncode != 0
  assert "was cut at" in proc.stderr and "it resumes" in proc.stderr, proc.stderr[-2000:]
  assert _entries(tmp_path) == []
  # The rerun asks for the rest only.
  proc, _ = _load(env, name, tmp_path / "cdn.npz", config="tiny")
  assert proc.returncode == 0, proc.stderr[-3000:]
  ranges = [r for m, p, r in server.requests(path) if r]
  assert ranges == [f"bytes={size // 2}-"], server.requests(path)
  local = tmp_path / "local.npz"
  proc, _ = _load(env, published["decoder_pt"], local, config="tiny")
  assert proc.returncode == 0, proc.stderr[-3000:]
  _same(_arrays(tmp_path / "cdn.npz"), _arrays(local))
  # A file corrupted on the way is refused by the SHA-256 in its path, and nothing of it is
  # kept: the next run downloads it afresh.
  assert _cli(env, "cache", "clear").returncode == 0
  server.faults[path] = "corrupt"
  try:
    proc = _cli(env, "decode", _latents(tmp_path), "-o", tmp_path / "out", "--weights", name,
                "--config", "tiny", "--no-progress", "--no-compile-cache")
  finally:
    del server.faults[path]
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "SHA-256" in _last_line(proc) and "corrupted" in _last_line(proc), _last_line(proc)
  assert _files_in_cache(tmp_path) == []
  # A full disk while downloading is the disk, named as such.
  proc = _cli(env, "decode", _latents(tmp_path), "-o", tmp_path / "out", "--weights", name,
              "--config", "tiny", "--no-progress", "--no-compile-cache",
              file_size_limit=size // 3)
  assert proc.returncode == 3 and "File too large" in _last_line(proc), proc.stderr[-2000:]
  assert _entries(tmp_path) == []


def test_a_hub_file_corrupted_in_flight_is_refused_and_a_cut_one_is_resumed(published,
                                                                            tmp_path):
  server, env = published["server"], _env(published, tmp_path)
  path = f"/{NAME}/resolve/main/{WEIGHTS}"
  server.faults[path] = "corrupt"
  try:
    proc, _ = _load(env, NAME, tmp_path / "bad.npz")
  finally:
    del server.faults[path]
  assert proc.returncode != 0
  assert "corrupted on the way" in proc.stderr, proc.stderr[-2000:]
  assert _entries(tmp_path) == []
  blobs = list((tmp_path / "hf").rglob("blobs/*"))
  assert all(b.stat().st_size < 10_000 for b in blobs), blobs  # only config.json is kept
  # huggingface_hub retries a cut download by itself (its own policy: afresh, in this
  # version); the file it ends with is whole.
  server.faults[path] = "cut"
  before = len(server.requests(path))
  proc, _ = _load(env, NAME, tmp_path / "good.npz")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [m for m, _, _ in server.requests(path)[before:]].count("GET") == 2
  assert len(_entries(tmp_path)) == 1


def test_two_processes_at_once_leave_one_entry_and_download_once(published, tmp_path):
  server, env = published["server"], _env(published, tmp_path)
  name, path = published["cdn_name"], published["cdn_path"]
  before = len(server.requests(path))
  procs = [subprocess.Popen([sys.executable, "-c", LOAD, name, str(tmp_path / f"{i}.npz"),
                             "tiny"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  assert len(server.requests(path)) - before == 1
  assert len(_entries(tmp_path)) == 1
  _same(_arrays(tmp_path / "0.npz"), _arrays(tmp_path / "1.npz"))
  assert os.listdir(tmp_path / "cache" / "weights" / "downloads") == []


def _closed_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_names_that_resolve_to_nothing_are_answered_in_one_line(published, tmp_path):
  env = _env(published, tmp_path)
  common = ["-o", tmp_path / "out", "--no-progress", "--no-compile-cache"]
  cases = [  # (weights, env, exit status, words of the last line)
      ("hf://nobody/nothing", env, 2, "no repository nobody/nothing"),
      ("nobody/nothing", env, 2, "no such file or folder here, and the Hub has no repository"),
      ("hf://someone/gated-decoder", env, 2, "is gated"),
      ("hf://openai/consistency-decoder@v9", env, 2, "no revision v9"),
      ("hf://openai/consistency-decoder/unet", env, 2, "holds no diffusion_pytorch_model"),
      ("hf://openai/consistency-decoder/x/y.safetensors", env, 2, "has no file x/y.safetensors"),
      ("hf://openai", env, 2, "not a Hub name"),
      ("openai:diff-vae/" + "0" * 64 + "/decoder.pt", env, 2, "no such file (HTTP 404)"),
      ("openai:nothing.pt", env, 2, "write openai:decoder.pt"),
      ("hf://openai/consistency-decoder", dict(env, HF_ENDPOINT=f"http://127.0.0.1:"
                                               f"{_closed_port()}"), 3, "cannot reach"),
      ("openai:decoder.pt", dict(env, JAXCONSDEC_OPENAI_ENDPOINT=f"http://127.0.0.1:"
                                 f"{_closed_port()}"), 3, "cannot reach"),
  ]
  for weights, case_env, code, words in cases:
    proc = _cli(case_env, "decode", _latents(tmp_path), "--weights", weights, *common)
    assert proc.returncode == code, (weights, proc.stderr[-2000:])
    last = _last_line(proc)
    assert last.startswith("error:") and words in last, (weights, last)
    assert "Traceback" not in proc.stderr, (weights, proc.stderr[-2000:])
  assert _entries(tmp_path) == []
