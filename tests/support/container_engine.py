"""Podman for the image test: its engine settings, a local Debian base image standing in for ``python:3.11-slim``,
and a probe saying whether this machine can run containers at all.

No container registry is reachable from the test machines, so the base is made from Debian's own packages:
``mmdebstrap`` writes a minimal bookworm root filesystem with Python, a virtual environment in ``/opt/py`` (first on
``PATH``, so ``pip`` and ``python`` are the venv's, as in the official image) and the host's extra certificate
authorities (HTTPS to PyPI may go through a proxy with its own CA: the build's ``pip`` must trust it), and
``podman import`` turns it into a local image. Its tag carries a hash of the recipe and of those certificates, so
it is built once and reused until either changes.

Run as a script (``python -m tests.support.container_engine``) it writes the engine settings and builds the base
ahead of time, printing the base's tag, or prints why containers cannot run here.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_DIR = REPO_ROOT / ".tools" / "containers"
CONTAINERS_CONF = TOOLS_DIR / "containers.conf"

# The settings this machine kind needs (see the project's container notes): runc, because crun refuses the hybrid
# cgroup layout; limits root may actually set; cgroupfs and a file event log, because there is no systemd.
ENGINE_SETTINGS = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = "ca-certificates,passwd,python3,python3-venv"
BASE_VENV = "/opt/py"
BASE_PATH = f"{BASE_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_EXTRA_CAS = Path("/usr/local/share/ca-certificates")
BASE_REPOSITORY = "localhost/difyq-test-base"
BASE_TIMEOUT_S = 900


class ContainersUnavailable(RuntimeError):
    """This machine cannot build or run containers; the message says what is missing."""


def engine_env() -> dict[str, str]:
    """The environment for every podman command: the process's own, with ``CONTAINERS_CONF`` set."""
    TOOLS_DIR.mkdir(parents=True, exist_ok=True)
    if not CONTAINERS_CONF.is_file() or CONTAINERS_CONF.read_text(encoding="utf-8") != ENGINE_SETTINGS:
        CONTAINERS_CONF.write_text(ENGINE_SETTINGS, encoding="utf-8")
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``podman args`` with the engine settings; raises with podman's output when ``check`` and it fails."""
    result = subprocess.run(["podman", *args], env=engine_env(), capture_output=True, text=True, timeout=timeout,
                            check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def check_engine() -> None:
    """Raise ``ContainersUnavailable`` unless podman and mmdebstrap are installed and a container can start."""
    missing = [tool for tool in ("podman", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        raise ContainersUnavailable(f"{' and '.join(missing)} not installed (`make tools` installs them as root)")
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    if info.returncode != 0:
        raise ContainersUnavailable(f"podman cannot run here: {info.stderr.strip()[-500:]}")


def _extra_cas() -> list[Path]:
    return sorted(HOST_EXTRA_CAS.glob("*.crt")) if HOST_EXTRA_CAS.is_dir() else []


def _mmdebstrap_command(rootfs: Path) -> list[str]:
    cas = _extra_cas()
    hooks = [
        *(["--customize-hook=copy-in " + " ".join(str(ca) for ca in cas) + " /usr/local/share/ca-certificates/",
           '--customize-hook=chroot "$1" update-ca-certificates'] if cas else []),
        f'--customize-hook=chroot "$1" python3 -m venv {BASE_VENV}',
        # pip trusts the system bundle (which now holds the host's extra CAs), not its own copy of certifi's.
        '--customize-hook=printf "[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n" > "$1/etc/pip.conf"',
        '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin',
    ]
    return ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={BASE_PACKAGES}", *hooks, DEBIAN_SUITE,
            str(rootfs), DEBIAN_MIRROR]


def _import_changes() -> list[str]:
    return ["--change", f"ENV PATH={BASE_PATH}", "--change", 'CMD ["python"]']


def base_tag() -> str:
    """The base image's tag: a hash of its recipe and of the host's extra certificate authorities."""
    digest = hashlib.sha256("\0".join([*_mmdebstrap_command(Path("rootfs.tar")), *_import_changes()]).encode())
    for ca in _extra_cas():
        digest.update(ca.read_bytes())
    return f"{BASE_REPOSITORY}:{digest.hexdigest()[:16]}"


def _build_base(tag: str, workdir: Path) -> None:
    rootfs = workdir / "rootfs.tar"
    result = subprocess.run(_mmdebstrap_command(rootfs), capture_output=True, text=True, timeout=BASE_TIMEOUT_S,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"mmdebstrap exited {result.returncode}:\n{result.stdout}{result.stderr}")
    podman("import", *_import_changes(), str(rootfs), tag, timeout=300)


def ensure_base() -> str:
    """The base image's tag, importing it first unless podman's storage already holds it (older bases, made by
    an earlier recipe, are removed then)."""
    check_engine()
    tag = base_tag()
    with (TOOLS_DIR / "base.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if podman("image", "exists", tag, check=False).returncode != 0:
            with tempfile.TemporaryDirectory(prefix="difyq-base-") as workdir:
                _build_base(tag, Path(workdir))
            listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", BASE_REPOSITORY).stdout.split()
            outdated = [name for name in listed if name != tag]
            if outdated:
                podman("rmi", *outdated, check=False)
    return tag


def main() -> int:
    try:
        print(ensure_base())
    except ContainersUnavailable as unavailable:
        print(f"warning: containers unavailable, the image test will be skipped: {unavailable}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
