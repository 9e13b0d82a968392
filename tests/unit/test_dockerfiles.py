"""Static checks of Dockerfile.operator and Dockerfile.trainer (no Docker engine runs here).

Each Dockerfile is parsed as BuildKit reads it (line continuations, ARG defaults in FROM): its COPY sources exist
and survive `.dockerignore`, its base images are pinned, it is multi-stage, the final stage runs as a numeric
non-root user, and its ENTRYPOINT/CMD is a console script of pyproject.toml with a subcommand the CLI has.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer.main
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from kontext_lora.cli import app

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONSTRAINTS = REPO / "docker" / "constraints.txt"
DOCKERFILES = ("Dockerfile.operator", "Dockerfile.trainer")


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, args = buffer.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        buffer = ""
    return out


def _substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def stages(text: str) -> list[Stage]:
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for keyword, args in instructions(text):
        if keyword == "ARG" and not result:
            name, _, default = args.partition("=")
            global_args[name] = _substitute(default.strip('"'), global_args)
        elif keyword == "FROM":
            parts = [p for p in args.split() if not p.startswith("--platform")]
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            result.append(Stage(_substitute(parts[0], global_args), name))
        elif result:
            result[-1].instructions.append((keyword, args))
    return result


class DockerIgnore:
    """`.dockerignore` semantics: patterns relative to the context, `**` any depth, `!` re-includes, last match
    wins, and a pattern matching a parent folder matches everything inside it."""

    def __init__(self, text: str):
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line[1:] if negate else line
            pattern = pattern.strip("/") or "."
            regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
            regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            self.rules.append((not negate, re.compile(f"^{regex}$")))

    def excluded(self, path: str) -> bool:
        parts = Path(path).parts
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        verdict = False
        for exclude, regex in self.rules:
            if any(regex.match(candidate) for candidate in candidates):
                verdict = exclude
        return verdict


def _console_scripts() -> dict[str, str]:
    return PYPROJECT["project"]["scripts"]


def _exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec form (a JSON list) so signals reach the process: {args}"
    return [item.strip().strip('"') for item in args.strip("[]").split(",")]


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


@pytest.fixture(params=DOCKERFILES)
def dockerfile(request: pytest.FixtureRequest) -> tuple[str, list[Stage]]:
    return request.param, stages((REPO / request.param).read_text())


def test_is_multi_stage_with_pinned_bases(dockerfile: tuple[str, list[Stage]]) -> None:
    name, parsed = dockerfile
    assert len(parsed) >= 2, f"{name} must be multi-stage (build, runtime)"
    stage_names = {stage.name for stage in parsed}
    for stage in parsed:
        if stage.image in stage_names:
            continue
        assert "$" not in stage.image, f"{name}: unresolved ARG in FROM {stage.image}"
        reference = stage.image.split("@")[0]
        repository, _, tag = reference.rpartition(":")
        assert repository and tag and "/" not in tag, f"{name}: FROM {stage.image} has no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: FROM {stage.image} is not version-pinned"


def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: tuple[str, list[Stage]]) -> None:
    name, parsed = dockerfile
    ignore = DockerIgnore((REPO / ".dockerignore").read_text())
    copied = 0
    for stage in parsed:
        for args in stage.all("COPY") + stage.all("ADD"):
            words = shlex.split(args)
            if any(word.startswith("--from") for word in words):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            for source in sources:
                path = REPO / source
                assert path.exists(), f"{name}: COPY {source}: no such file in the repository"
                assert not ignore.excluded(source), f"{name}: COPY {source} is excluded by .dockerignore"
                files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
                sent = [f for f in files if not ignore.excluded(str(f.relative_to(REPO)))]
                python = [f for f in files if f.suffix == ".py"]
                assert set(python) <= set(sent), f"{name}: .dockerignore drops sources under {source}"
                copied += len(sent)
    assert copied, f"{name} copies nothing from the build context"


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    ignore = DockerIgnore((REPO / ".dockerignore").read_text())
    for path in (".venv/bin/python", ".git/config", "runs/demo/lora.safetensors", "tests/conftest.py", ".env"):
        assert ignore.excluded(path), f"{path} would be sent to the Docker daemon"
    for path in ("kontext_lora/cli.py", "pyproject.toml", "docker/constraints.txt"):
        assert not ignore.excluded(path), path
    assert ignore.excluded("kontext_lora/__pycache__/cli.cpython-311.pyc")


def test_runs_as_a_numeric_non_root_user(dockerfile: tuple[str, list[Stage]]) -> None:
    name, parsed = dockerfile
    users = parsed[-1].all("USER")
    assert users, f"{name}: the final stage sets no USER (it would run as root)"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {users[-1]} must be a numeric non-root uid"


def test_trainer_pods_run_as_the_trainer_images_user() -> None:
    from kontext_operator.resources import TRAINER_UID

    uid, _, gid = stages((REPO / "Dockerfile.trainer").read_text())[-1].all("USER")[-1].partition(":")
    assert (int(uid), int(gid or uid)) == (TRAINER_UID, TRAINER_UID), (
        "the operator's runAsUser/fsGroup for trainer pods differs from Dockerfile.trainer's USER"
    )


def test_entrypoint_is_an_installed_console_script_with_a_real_subcommand(
    dockerfile: tuple[str, list[Stage]],
) -> None:
    name, parsed = dockerfile
    final = parsed[-1]
    entrypoint = _exec_form(final.all("ENTRYPOINT")[-1])
    assert entrypoint[0] in _console_scripts(), f"{name}: {entrypoint[0]} is not a [project.scripts] entry"
    assert _console_scripts()[entrypoint[0]] == "kontext_lora.cli:app"
    command = _exec_form(final.all("CMD")[-1])
    cli = typer.main.get_command(app)
    subcommand = getattr(cli, "commands", {}).get(command[0])
    assert subcommand is not None, f"{name}: CMD {command[0]} is not a kontext-lora command"
    if command[0] != "operator":  # the operator passes its options on to `kopf run`
        options = {opt for param in subcommand.params for opt in param.opts}
        assert set(command[1:]) <= options, f"{name}: CMD {command} uses options `{command[0]}` lacks"


def test_the_virtualenv_is_built_in_one_stage_and_copied_into_the_runtime(
    dockerfile: tuple[str, list[Stage]],
) -> None:
    name, parsed = dockerfile
    final = parsed[-1]
    assert any("--from=build" in args for args in final.all("COPY")), f"{name}: runtime copies nothing from build"
    assert not any("pip install" in args for args in final.all("RUN")), f"{name}: pip runs in the runtime stage"
    path = " ".join(final.all("ENV"))
    assert "/opt/kontext-lora/bin" in path, f"{name}: the virtualenv is not on PATH"


def test_operator_image_is_the_core_package_on_python_slim() -> None:
    parsed = stages((REPO / "Dockerfile.operator").read_text())
    assert all(re.fullmatch(r"python:3\.1[1-3](\.\d+)?-slim(-\w+)?", s.image) for s in parsed), parsed
    build = " ".join(parsed[0].all("RUN"))
    assert "[trainer]" not in build and "torch" not in build.replace('import torch"', ""), "no torch"
    core = [Requirement(r).name for r in PYPROJECT["project"]["dependencies"]]
    assert "torch" not in core, "torch must stay out of the core dependencies (the operator image)"
    python = Version(re.search(r"python:(\d+\.\d+)", parsed[0].image)[1] + ".0")
    assert python in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_operator_code_runs_without_the_trainer_extra() -> None:
    """The operator image has no torch/diffusers: its entrypoint's imports must not need them."""
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'diffusers', 'transformers', 'peft', 'accelerate'}:\n"
        "            raise ModuleNotFoundError(f'{name} is not in the operator image')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import kontext_lora.cli, kontext_operator.main, kontext_operator.handlers\n"
        "from typer.testing import CliRunner\n"
        "result = CliRunner().invoke(kontext_lora.cli.app, ['operator', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr


def test_trainer_image_matches_the_pinned_torch_and_keeps_the_model_cache_on_a_volume() -> None:
    text = (REPO / "Dockerfile.trainer").read_text()
    parsed = stages(text)
    assert all(s.image.startswith("nvidia/cuda:") for s in parsed), [s.image for s in parsed]
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-ubuntu", parsed[-1].image)
    assert cuda, parsed[-1].image
    pins = _constraints()
    assert "torch" in pins, "docker/constraints.txt must pin torch"
    toolkit = pins[canonicalize_name("cuda-toolkit")]
    assert (int(cuda[1]), int(cuda[2])) == (toolkit.major, toolkit.minor), (
        f"the base image's CUDA {cuda[1]}.{cuda[2]} differs from torch's CUDA {toolkit} (docker/constraints.txt)"
    )
    assert "[trainer]" in " ".join(parsed[0].all("RUN"))
    env = " ".join(parsed[-1].all("ENV"))
    assert "HF_HOME=/cache/huggingface" in env
    volumes = " ".join(parsed[-1].all("VOLUME"))
    assert "/cache/huggingface" in volumes and "/work" in volumes


def test_constraints_pin_every_dependency_within_pyproject_ranges() -> None:
    pins = _constraints()
    wanted = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["trainer"]
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"docker/constraints.txt has no pin for {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{requirement.name}=={pins[name]} is outside pyproject's {requirement.specifier}"
        )


def test_parser_reads_continuations_args_and_stage_names() -> None:
    parsed = stages("ARG A=x:1.2\nARG B=${A}-slim\nFROM ${B} AS one\nRUN a \\\n  # note\n  && b\nFROM one\n")
    assert [s.image for s in parsed] == ["x:1.2-slim", "one"]
    assert parsed[0].name == "one" and parsed[0].all("RUN") == ["a  && b"]
