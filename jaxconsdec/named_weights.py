"""Weights by name, and the files a name stands for, fetched.

    hf://ORG/REPO[/FOLDER][@REVISION]       a diffusers folder on the Hugging Face Hub: its
                                            config.json and diffusion_pytorch_model
                                            .safetensors (the .fp16 file where that is all)
    hf://ORG/REPO/PATH/FILE.safetensors     one file (and the config.json beside it, if any)
    ORG/REPO[@REVISION]                     hf://ORG/REPO, where no local path has that name
    openai:decoder.pt                       OpenAI's original TorchScript decoder, from the
                                            CDN the original package downloads it from
    openai:diff-vae/SHA256/FILE             any file on that CDN, by its path

Hub files are fetched by `huggingface_hub` (the `jaxconsdec[hub]` extra), which keeps them in
its own cache and honours HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE and HF_TOKEN. A large file's
SHA-256 is then checked against the one the Hub lists for it. A CDN file is checked against
the SHA-256 in its path, as the original package does. Every file then goes through the
converter's checks like any local file: a name changes where bytes come from, not how far
they are trusted.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Callable, Optional

from jaxconsdec import downloads

OPENAI_ENDPOINT = "https://openaipublic.azureedge.net"  # the original package's host
OPENAI_DECODER = ("diff-vae/c9cebd3132dd9c42936d803e33424145a748843c8f716c0814838bdc8a2fe7cb"
                  "/decoder.pt")
DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors",
                   "diffusion_pytorch_model.fp16.safetensors")
WEIGHT_SUFFIXES = (".safetensors", ".pt")
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?P<path>(?:/{_PART})*)(?:@(?P<rev>[^@\s]+))?$")
_BARE = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[^@/\s]+))?$")
_OPENAI = re.compile(r"^diff-vae/(?P<sha>[0-9a-f]{64})/(?P<file>[A-Za-z0-9._-]+)$")


class UnknownNameError(ValueError):
  """A name that resolves to nothing: no such repository, file or revision; a gated
  repository without access; or, offline, a name not cached (exit status 2)."""


@dataclasses.dataclass(frozen=True)
class Name:
  """A parsed weights name. `text` is its canonical spelling, which keys the cache."""
  source: str                    # "hub" or "openai"
  repo: str = ""                 # ORG/REPO on the Hub
  path: str = ""                 # a folder or a file inside the repo ("" = its root)
  revision: str = "main"
  cdn_path: str = ""             # diff-vae/SHA256/FILE on OpenAI's CDN
  bare: bool = False             # spelled ORG/REPO: it may also be a local path mistyped

  @property
  def text(self) -> str:
    if self.source == "openai":
      return f"openai:{self.cdn_path}"
    return f"hf://{self.repo}{'/' + self.path if self.path else ''}@{self.revision}"


def parse(text: str) -> Optional[Name]:
  """The name `text` spells, or None for anything else (a local path). A bare ORG/REPO is a
  name only where nothing exists at that path (`is_local` first)."""
  text = os.fspath(text)
  if text.startswith("hf://"):
    m = _HUB.match(text[len("hf://"):])
    if not m:
      raise UnknownNameError(f"{text}: not a Hub name; write hf://ORG/REPO[/FOLDER][@REVISION]")
    return Name("hub", m["repo"], m["path"].strip("/"), m["rev"] or "main")
  if text.startswith("openai:"):
    path = text[len("openai:"):]
    path = OPENAI_DECODER if path == "decoder.pt" else path
    if not _OPENAI.match(path):
      raise UnknownNameError(f"{text}: write openai:decoder.pt, or openai:diff-vae/SHA256/FILE")
    return Name("openai", cdn_path=path)
  m = _BARE.match(text)
  if m and not os.path.lexists(text):
    return Name("hub", m["repo"], "", m["rev"] or "main", bare=True)
  return None


def offline() -> bool:
  """HF_HUB_OFFLINE, read as huggingface_hub reads it; it applies to the CDN too."""
  return (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or
          "").upper() in ("1", "ON", "YES", "TRUE")


def fetch(name: Name, folder: str, *, progress: bool = False,
          say: Callable[[str], None] = lambda line: None) -> list[str]:
  """The local files `name` stands for, in the order the converter takes them. CDN files
  are downloaded into `folder`; Hub files stay in the Hub's cache."""
  if offline():
    raise UnknownNameError(f"{name.text} is not in jaxconsdec's weights cache, and"
                           " HF_HUB_OFFLINE forbids downloading it. Run once with a network"
                           " connection (and HF_HUB_OFFLINE unset), or convert a local copy"
                           " with `jaxconsdec convert`")
  if name.source == "openai":
    return [_fetch_openai(name, folder, progress, say)]
  return _fetch_hub(name, progress, say)


def _fetch_openai(name: Name, folder: str, progress: bool, say) -> str:
  m = _OPENAI.match(name.cdn_path)
  endpoint = os.environ.get("JAXCONSDEC_OPENAI_ENDPOINT", OPENAI_ENDPOINT).rstrip("/")
  url = f"{endpoint}/{name.cdn_path}"
  os.makedirs(folder, exist_ok=True)
  say(f"downloading {url}")
  try:
    return downloads.download(url, os.path.join(folder, m["file"]), m["sha"],
                              progress=progress)
  except downloads.NotOnServerError as e:
    raise UnknownNameError(f"{name.text}: {e}") from None


def _fetch_hub(name: Name, progress: bool, say) -> list[str]:
  if importlib.util.find_spec("huggingface_hub") is None:
    raise UnknownNameError(f"{name.text}: Hub names need huggingface_hub; install it with"
                           " pip install 'jaxconsdec[hub]'")
  say(f"fetching {name.text} from the Hub")
  if name.path.endswith(WEIGHT_SUFFIXES):
    folder, _, file = name.path.rpartition("/")
    weights = _hub_file(name, folder, file, progress)
    if weights is None:
      raise UnknownNameError(f"{name.text}: the repository has no file {name.path}")
  else:
    folder = name.path
    for file in DIFFUSERS_FILES:
      weights = _hub_file(name, folder, file, progress)
      if weights is not None:
        break
    else:
      where = f"{name.repo}/{folder}" if folder else name.repo
      raise UnknownNameError(f"{name.text}: {where} holds no {' or '.join(DIFFUSERS_FILES)}."
                             " Name a weight file in it: hf://ORG/REPO/PATH/FILE.safetensors")
  _hub_file(name, folder, "config.json", progress)  # beside the weights, where there is one
  return [weights]


def _hub_file(name: Name, folder: str, file: str, progress: bool) -> Optional[str]:
  """The file's path in the Hub's cache, its SHA-256 checked; None if the repo lacks it."""
  import huggingface_hub as hub
  from huggingface_hub import errors
  try:
    path = hub.hf_hub_download(name.repo, file, subfolder=folder or None,
                               revision=name.revision)
  except errors.GatedRepoError:
    raise UnknownNameError(f"{name.text}: {name.repo} is gated. Accept its terms on its Hub"
                           " page, then log in (`hf auth login`) or set HF_TOKEN") from None
  except errors.RepositoryNotFoundError:
    local = f"{name.repo}: no such file or folder here, and " if name.bare else f"{name.text}: "
    raise UnknownNameError(f"{local}the Hub has no repository {name.repo}, or it is private"
                           " (log in with `hf auth login` or set HF_TOKEN)") from None
  except errors.RevisionNotFoundError:
    raise UnknownNameError(f"{name.text}: {name.repo} has no revision {name.revision}"
                           ) from None
  except errors.RemoteEntryNotFoundError:
    return None
  except errors.OfflineModeIsEnabled:
    raise UnknownNameError(f"{name.text} is not cached, and HF_HUB_OFFLINE forbids"
                           " downloading it") from None
  except errors.LocalEntryNotFoundError:
    raise downloads.DownloadError(f"{name.text}: cannot reach the Hub at"
                                  f" {hub.constants.ENDPOINT}. Check the network connection;"
                                  " a name already in jaxconsdec's cache loads without one"
                                  ) from None
  except errors.HfHubHTTPError as e:
    raise downloads.DownloadError(f"{name.text}: the Hub answered"
                                  f" {str(e).splitlines()[0][:200]}; try again later") from None
  _check_hub_hash(name, path)
  return path


def _check_hub_hash(name: Name, path: str) -> None:
  """The Hub stores a large file under its SHA-256 (the file's name in the Hub's cache of
  blobs): the bytes must hash to it. A mismatched blob is removed, so that the next run
  downloads it again instead of failing on the same bytes."""
  from jaxconsdec.convert.formats import sha256_of  # remembered: the cache key reuses it
  blob = os.path.realpath(path)
  expected = os.path.basename(blob)
  if not re.fullmatch(r"[0-9a-f]{64}", expected):
    return  # a small file kept in git: listed by its git hash, checked by the converter
  digest = sha256_of(blob)
  if digest != expected:
    os.remove(blob)
    if os.path.lexists(path):
      os.remove(path)  # the snapshot's link to the blob
    raise downloads.DownloadError(
        f"{name.text}: {os.path.basename(path)} has SHA-256 {digest}, not the {expected} the"
        " Hub lists: it was corrupted on the way. It was deleted; run the same command again"
        " to download it afresh")
