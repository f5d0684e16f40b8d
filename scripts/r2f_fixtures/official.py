"""The official R2F+ file (`R2Fplus_Diffusion_sd3.py` of krafton-ai/Rare-to-Frequent @ 834f459):
found from a path (the file, a checkout, or a git directory of the repository), checked against
its pinned sha256, and imported unmodified. It is never copied into this repository."""

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

OFFICIAL_REPO = "krafton-ai/Rare-to-Frequent"
OFFICIAL_FILE = "R2Fplus_Diffusion_sd3.py"
OFFICIAL_COMMIT = "834f459aa9ae90a7b653abc4bf0ad8a230056bc1"
OFFICIAL_SHA256 = "809fe25adc84f6fc633b3989c851a5ff13ab7eb045060bb525c7e65fc966df91"


def is_git_dir(p):
    return (p / "HEAD").is_file() and (p / "objects").is_dir()


def resolve_official(official, tmp):
    """-> (path of the official file, commit it was read at or None)."""
    p = Path(official)
    if p.is_file():
        return p, None
    if p.is_dir() and (p / OFFICIAL_FILE).is_file():
        return p / OFFICIAL_FILE, None
    for g in (p, p / ".git", p / "repo"):
        if g.is_dir() and is_git_dir(g):
            data = subprocess.run(
                ["git", f"--git-dir={g}", "show", f"{OFFICIAL_COMMIT}:{OFFICIAL_FILE}"],
                check=True, capture_output=True).stdout
            out = Path(tmp) / OFFICIAL_FILE
            out.write_bytes(data)
            return out, OFFICIAL_COMMIT
    raise SystemExit(f"--official {official}: neither {OFFICIAL_FILE}, a directory holding it, "
                     f"nor a git directory of {OFFICIAL_REPO}")


def import_official(path):
    import PIL.ImageDraw  # noqa: F401  (the official file uses PIL.ImageDraw after `import PIL`)
    spec = importlib.util.spec_from_file_location("r2fplus_official_sd3", str(path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_official(official, tmp, allow_unpinned=False):
    path, commit = resolve_official(official, tmp)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    if sha != OFFICIAL_SHA256:
        if not allow_unpinned:
            raise SystemExit(f"{path}: sha256 {sha} is not the pinned {OFFICIAL_SHA256} "
                             f"({OFFICIAL_REPO}@{OFFICIAL_COMMIT[:7]}); use --allow-unpinned")
        commit = None
    else:
        commit = OFFICIAL_COMMIT
    info = {"repository": OFFICIAL_REPO, "file": OFFICIAL_FILE, "commit": commit, "sha256": sha}
    return import_official(path), info
