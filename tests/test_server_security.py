"""The server: what it will and will not serve, weight files, no network, SIGTERM.

Run as a script (``python tests/test_server_security.py --offline-session OUT.json ...``) it is the
helper that the no-network test runs inside a fresh network namespace.
"""

from __future__ import annotations

import http.client
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
EXAMPLES = ROOT / "examples"
CHROMIUM = "/usr/bin/chromium"
CACHE_TTL = 4  # seconds: the app deletes uploads and outputs this old, checking every 2 s
NARROW_APP = Path(__file__).with_name("narrow_app.py")  # narrow_models.APP, which the helper cannot import


def _load_test() -> object:
    # Not conftest.load_test_module: this file also runs as a script (the offline helper below),
    # where conftest's imports are not on the path.
    import importlib.util

    if "load_test" in sys.modules:
        return sys.modules["load_test"]
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "benchmarks" / "load_test.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["load_test"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


lt = _load_test()


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", SANET_VIZ_OFFLINE="1", HF_HUB_OFFLINE="1",
                PYTHONUNBUFFERED="1", **extra)


# ---------------------------------------------------------------------------------------------
# The file routes

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           narrow_checkpoints: dict[str, Path]) -> Iterator[dict[str, object]]:
    """app.py with the generated checkpoints, a weights folder holding a secret, a short cache TTL
    (the narrow architectures: tests/narrow_app.py)."""
    from narrow_models import APP  # here: this file also runs as a script, without the package on its path

    torchvision_checkpoint, official_checkpoint = narrow_checkpoints["resnet50"], narrow_checkpoints["sanet50"]
    folder = tmp_path_factory.mktemp("server")
    weights_dir = folder / "weights"
    weights_dir.mkdir()
    (weights_dir / "secret-weights.pth").write_bytes(b"SECRET-WEIGHTS-" + os.urandom(32).hex().encode())
    temp = folder / "gradio-temp"
    proc, url = lt.start_app(  # type: ignore[attr-defined]
        ["--resnet50", str(torchvision_checkpoint), "--sanet50", str(official_checkpoint),
         "--weights-dir", str(weights_dir), "--cache-ttl", str(CACHE_TTL)],
        log_path=folder / "app.log", env={"GRADIO_TEMP_DIR": str(temp), "SANET_VIZ_DEBUG_STATS": "0"}, script=APP)
    try:
        yield {"url": url, "proc": proc, "temp": temp, "weights_dir": weights_dir, "log": folder / "app.log",
               "checkpoints": [official_checkpoint, torchvision_checkpoint]}
    finally:
        lt.stop_app(proc)  # type: ignore[attr-defined]


def _get(url: str, raw_path: str) -> tuple[int, bytes]:
    """GET exactly ``raw_path`` (no normalisation of ``..`` or of percent-escapes on the way)."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        conn.putrequest("GET", raw_path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _upload(url: str, path: Path) -> str:
    """The server-side path of ``path`` uploaded through Gradio's upload route."""
    boundary = "----sanetvizboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n")
    body = head.encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())[0]


ROUTES = ["/gradio_api/file=", "/file=", "/gradio_api/file/", "/file/"]


def _variants(target: str) -> list[str]:
    """``target`` as given, percent-encoded, double-encoded, with dot segments and backslashes."""
    out = [target, urllib.parse.quote(target, safe=""), urllib.parse.quote(urllib.parse.quote(target, safe=""),
                                                                            safe="")]
    if target.startswith("/"):
        out += ["//" + target.lstrip("/"), "/./" + target.lstrip("/"), "file://" + target,
                target.replace("/", "%2F"), target.replace("/", "\\")]
        out.append(target + "%00.png")
    return out


def _secret_targets(server: dict[str, object]) -> dict[str, bytes]:
    """Paths that must never be served, with a piece of their content to look for in responses."""
    weights_secret = Path(str(server["weights_dir"])) / "secret-weights.pth"
    temp = Path(str(server["temp"]))
    files = [Path("/etc/passwd"), ROOT / "app.py", ROOT / "pyproject.toml", ROOT / "sanet_viz" / "weights.py",
             ROOT / "tests" / "conftest.py", ROOT / "weights" / "README.md", weights_secret,
             Path(str(server["log"])), *[Path(str(p)) for p in server["checkpoints"]]]  # type: ignore[union-attr]
    if (ROOT / ".git" / "config").is_file():
        files.append(ROOT / ".git" / "config")
    targets: dict[str, bytes] = {}
    for f in files:
        content = f.read_bytes()
        marker = content[:64] if len(content) >= 16 else content
        targets[str(f)] = marker
    # Relative to the working directory (the repo) and escapes from allowed folders.
    app_marker = (ROOT / "app.py").read_bytes()[:64]
    targets["app.py"] = app_marker
    targets["./app.py"] = app_marker
    targets["examples/../app.py"] = app_marker
    targets[str(EXAMPLES) + "/../app.py"] = app_marker
    targets[str(EXAMPLES) + "/../../" + ROOT.name + "/app.py"] = app_marker
    targets[str(temp) + "/../app.log"] = Path(str(server["log"])).read_bytes()[:64]
    targets[str(EXAMPLES) + "/../../../../../../etc/passwd"] = Path("/etc/passwd").read_bytes()[:64]
    targets["../" * 12 + "etc/passwd"] = Path("/etc/passwd").read_bytes()[:64]
    return targets


@pytest.mark.slow
def test_file_routes_serve_examples_and_uploads(server: dict[str, object], tmp_path: Path) -> None:
    """Positive controls: the routes under test do serve what they should."""
    url = str(server["url"])
    example = EXAMPLES / "chelsea.jpg"
    for route in ("/gradio_api/file=", "/gradio_api/file/"):  # Gradio 6 has no /file= without the prefix
        status, body = _get(url, route + urllib.parse.quote(str(example)))
        assert status == 200 and body == example.read_bytes(), (route, status)
    picture = tmp_path / "mine.png"
    shutil.copy(EXAMPLES / "coffee.jpg", picture)
    served = _upload(url, picture)
    assert Path(served).is_relative_to(Path(str(server["temp"])).resolve()), served
    status, body = _get(url, "/gradio_api/file=" + urllib.parse.quote(served))
    assert status == 200 and body == picture.read_bytes()


@pytest.mark.slow
def test_file_routes_refuse_everything_else(server: dict[str, object]) -> None:
    url = str(server["url"])
    leaks, statuses = [], {}
    for target, marker in _secret_targets(server).items():
        for variant in _variants(target):
            for route in ROUTES:
                status, body = _get(url, route + variant)
                statuses[status] = statuses.get(status, 0) + 1
                if marker in body or (status == 200 and route.endswith("=") and variant == target):
                    leaks.append(f"{status} {route}{variant}")
    assert leaks == [], f"served: {leaks[:10]} ({len(leaks)} in all)"
    for target in _secret_targets(server):  # refused by the file check itself, not just not found
        if target.startswith("/"):
            assert _get(url, "/gradio_api/file=" + target)[0] == 403, target


def _call_api(url: str, api_name: str, data: list[object]) -> tuple[str, str]:
    """Gradio's two-step HTTP API: POST the inputs, read the event stream; (event, data) at the end."""
    request = urllib.request.Request(f"{url}gradio_api/call/{api_name}", method="POST",
                                     data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=120) as response:
        text = response.read().decode(errors="replace")
    events = re.findall(r"event: (\w+)\ndata: (.*)", text)
    return events[-1] if events else ("", text)


@pytest.mark.slow
def test_api_will_not_read_server_paths_given_as_uploads(server: dict[str, object]) -> None:
    """A FileData whose path names a server file (not an upload) is refused before any decoding."""
    url = str(server["url"])
    checkpoint = str(server["checkpoints"][0])  # type: ignore[index]
    for path in ["/etc/passwd", checkpoint, str(ROOT / "app.py"), str(EXAMPLES) + "/../app.py",
                 str(Path(str(server["weights_dir"])) / "secret-weights.pth")]:
        file_data = {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "cat.jpg"}
        # Raw HTTP sends every input: the last one (/analyze's optional pair) may be empty.
        event, data = _call_api(url, "analyze", [file_data, "gradcam", "predicted", None, 0.5, None, False, ""])
        assert event == "error" and re.search(r"(?i)not uploaded|not allowed|blocked", data), (path, data[:300])
        assert str(server["weights_dir"]) not in data or path.startswith(str(server["weights_dir"])), data
        assert "root:" not in data and "SECRET" not in data and "import" not in data, data[:300]
        event, data = _call_api(url, "correlate", [[file_data, file_data], ""])
        assert event == "error" and re.search(r"(?i)not uploaded|not allowed|blocked", data), (path, data[:300])
    # The same request shape with real uploads goes through: the refusals above are about the paths.
    uploads = [{"path": _upload(url, EXAMPLES / n), "meta": {"_type": "gradio.FileData"}, "orig_name": n}
               for n in ("chelsea.jpg", "rocket.jpg")]
    event, data = _call_api(url, "correlate", [uploads, "cat\nrocket"])
    assert event == "complete", data[:300]
    log = Path(str(server["log"])).read_text(errors="replace")
    assert "secret-weights.pth: not a picture" not in log  # never reached our decoder


@pytest.mark.slow
def test_uploads_and_outputs_are_deleted_on_schedule(server: dict[str, object], tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    url, temp = str(server["url"]), Path(str(server["temp"]))
    examples = {p.name for p in EXAMPLES.iterdir()}

    def ours() -> set[Path]:  # everything in Gradio's folder except its copies of the examples
        return {p for p in temp.rglob("*") if p.is_file() and p.name not in examples}

    client = Client(url, verbose=False)
    client.predict(handle_file(str(EXAMPLES / "rocket.jpg")), api_name="/analyze")  # yields gr.update()
    picture = tmp_path / "to-forget.jpg"
    shutil.copy(EXAMPLES / "rocket.jpg", picture)
    uploaded = Path(_upload(url, picture))
    client.predict([handle_file(str(EXAMPLES / "chelsea.jpg")), handle_file(str(EXAMPLES / "coffee.jpg"))],
                   "a\nb", api_name="/correlate")
    present = ours()
    assert uploaded in present, present
    assert any(p.suffix == ".zip" for p in present), f"the /analyze download should be in {temp}: {present}"
    assert sum(p.suffix in {".png", ".webp"} for p in present) >= 2, present  # the correlation charts
    deadline = time.monotonic() + CACHE_TTL * 3 + 10
    while time.monotonic() < deadline and present & ours():
        time.sleep(0.5)
    left = sorted(str(p) for p in present & ours())
    assert left == [], f"still there {CACHE_TTL * 3 + 10} s later: {left[:5]}"
    status, _ = _get(url, "/gradio_api/file=" + urllib.parse.quote(str(uploaded)))
    assert status != 200
    assert any(p.name in examples for p in temp.rglob("*")), "the copies of the examples must stay"


# ---------------------------------------------------------------------------------------------
# Weight files

class _RunsCode:
    """Unpickling this would run a shell command: a weights file must never do that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _start_and_fail(args: list[str], tmp_path: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "app.py"), "--port", str(lt.free_port()),  # type: ignore
                           "--weights-dir", str(tmp_path / "no-weights"), *args],
                          cwd=ROOT, env=_env(GRADIO_TEMP_DIR=str(tmp_path / "gradio")), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_app_refuses_a_code_executing_pickle(writer: str, tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "owned"
    evil = tmp_path / "sa_resnet50.pth.tar"
    payload = {"state_dict": {"conv1.weight": _RunsCode(marker)}}
    if writer == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    out = _start_and_fail(["--resnet50", "untrained", "--sanet50", str(evil)], tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert not marker.exists(), "the pickle ran code"
    assert re.search(rf"{re.escape(str(evil))}.*refused", text), text[-2000:]
    assert "Traceback" not in text, text[-2000:]


@pytest.mark.slow
def test_app_refuses_weights_whose_sha256_is_not_the_manifests(tmp_path: Path, official_checkpoint: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(official_checkpoint, weights / "sa_resnet50.pth.tar")
    (weights / "manifest.json").write_text(json.dumps({"sa_resnet50.pth.tar": "0" * 64}))
    out = _start_and_fail(["--resnet50", "untrained", "--sanet50", str(weights / "sa_resnet50.pth.tar")], tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-2000:]
    assert re.search(r"sa_resnet50\.pth\.tar: sha256 [0-9a-f]{64} does not match 0{64}", text), text[-2000:]
    assert "Traceback" not in text


@pytest.mark.slow
def test_temp_folder_over_the_repo_is_refused(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--port", str(lt.free_port()),  # type: ignore
                          "--resnet50", "untrained", "--sanet50", "untrained"], cwd=ROOT,
                         env=_env(GRADIO_TEMP_DIR=str(ROOT.parent)), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "GRADIO_TEMP_DIR" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------
# No network, and SIGTERM

SITECUSTOMIZE = '''
"""Test harness: record (and with SANET_VIZ_BLOCK_NETWORK=1 refuse) connections off this machine."""
import os, socket, sys

_LOG = os.environ.get("SANET_VIZ_NET_LOG")
_BLOCK = os.environ.get("SANET_VIZ_BLOCK_NETWORK") == "1"
_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "", None}


def _local(host):
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    return host in _LOCAL_NAMES or str(host).startswith("127.") or str(host).startswith("::ffff:127.")


def _hook(event, args):
    if event == "socket.connect":
        sock, address = args
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _note(f"connect {address}")
    elif event == "socket.getaddrinfo" and not _local(args[0]):
        _note(f"getaddrinfo {args[0]!r}")


def _note(what):
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(f"{os.getpid()} {what}\\n")
    if _BLOCK:
        raise OSError(101, f"network is unreachable (blocked by the test harness): {what}")


sys.addaudithook(_hook)
'''


def offline_session(out_path: Path, checkpoints: list[str], workdir: Path, isolated: bool) -> None:
    """Run inside the namespace: app, API, page, then SIGTERM with a request in flight."""
    from gradio_client import Client, handle_file

    report: dict[str, object] = {"isolated_namespace": isolated}
    site = workdir / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net_log = workdir / "net.log"
    env = _env(GRADIO_TEMP_DIR=str(workdir / "gradio"), SANET_VIZ_NET_LOG=str(net_log),
               PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               SANET_VIZ_BLOCK_NETWORK="0" if isolated else "1", SANET_VIZ_DEBUG_STATS="0")
    env.pop("SANET_VIZ_OFFLINE")  # no "offline" switches: the network itself is gone
    env.pop("HF_HUB_OFFLINE")
    port = lt.free_port()  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}/"
    log = open(workdir / "app.log", "wb")
    # The narrow architectures (tests/narrow_app.py runs app.py with them), sleeping per image so the
    # analysis is still in flight at the SIGTERM: SANET_VIZ_TEST_SECONDS_PER_IMAGE, from the fixture.
    proc = subprocess.Popen([sys.executable, str(NARROW_APP), "--port", str(port), "--resnet50", checkpoints[0],
                             "--sanet50", checkpoints[1], "--weights-dir", str(workdir / "no-weights")],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        lt.wait_ready(url, proc)  # type: ignore[attr-defined]
        report["outside_network_reachable"] = _reachable("1.1.1.1", 53) or _reachable("8.8.8.8", 53)
        client = Client(url, verbose=False)
        _, _, table, _, _ = client.predict([handle_file(str(EXAMPLES / "chelsea.jpg")),
                                         handle_file(str(EXAMPLES / "rocket.jpg"))], "cat\nrocket",
                                        api_name="/correlate")
        report["api_correlate_rows"] = len(table["data"])
        try:
            report["page"] = _page_check(url) if Path(CHROMIUM).exists() else {"skipped": "no chromium"}
        except Exception as exc:  # noqa: BLE001 - reported; the test fails on it
            report["page"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}

        # SIGTERM while an analysis runs: it finishes and reaches its client; new ones are refused.
        job = Client(url, verbose=False).submit(handle_file(str(EXAMPLES / "coffee.jpg")), api_name="/analyze")
        deadline = time.monotonic() + 120
        while job.status().code.name not in {"PROCESSING", "PROGRESS", "ITERATING"} and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        try:
            Client(url, verbose=False).predict(handle_file(str(EXAMPLES / "rocket.jpg")), api_name="/analyze")
            report["new_request_during_shutdown"] = "accepted"
        except Exception as exc:  # noqa: BLE001 - the refusal is what we look for
            report["new_request_during_shutdown"] = f"{type(exc).__name__}: {exc}"
        try:
            outputs = job.result(timeout=300)
            result = [o for o in outputs if isinstance(o, dict) and "models" in o]
            report["in_flight"] = "completed" if result and result[0]["models"]["sanet50"]["group_probe"] else \
                f"incomplete: {outputs!r}"[:300]
        except Exception as exc:  # noqa: BLE001
            report["in_flight"] = f"{type(exc).__name__}: {exc}"
        delivered = time.monotonic()
        try:
            report["exit_status"] = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            report["exit_status"] = "hung"
        report["exit_after_signal_s"] = round(time.monotonic() - sent, 1)
        report["exit_after_result_s"] = round(time.monotonic() - delivered, 1)
        report["left_in_gradio_temp"] = [str(p) for p in (workdir / "gradio").rglob("*") if p.is_file()]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        report["outside_attempts"] = net_log.read_text().splitlines() if net_log.exists() else []
        report["app_log_tail"] = (workdir / "app.log").read_text(errors="replace")[-3000:]
        out_path.write_text(json.dumps(report, indent=1))


def _reachable(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _page_check(url: str) -> dict[str, object]:
    from playwright.sync_api import sync_playwright

    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                                          "--disable-background-networking", "--disable-component-update"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
                ("http://127.0.0.1", "http://localhost", "data:", "blob:")) else None)
            page.goto(url)
            page.wait_for_selector("#analyse-button", timeout=60_000)
            page.wait_for_timeout(3000)  # not "networkidle": Gradio's heartbeat stream stays open
            return {"banner": page.inner_text("#weights-banner")[:200], "outside_requests": outside,
                    "analyse_button": page.is_visible("#analyse-button")}
        finally:
            browser.close()


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def offline_report(tmp_path_factory: pytest.TempPathFactory, narrow_checkpoints: dict[str, Path]) -> dict[str, object]:
    from narrow_models import APP, SECONDS_PER_IMAGE_ENV

    assert APP == NARROW_APP
    workdir = tmp_path_factory.mktemp("offline")
    out = workdir / "report.json"
    isolated = _can_unshare()
    helper = [sys.executable, str(Path(__file__).resolve()), "--offline-session", str(out), str(workdir),
              str(narrow_checkpoints["resnet50"]), str(narrow_checkpoints["sanet50"]), "1" if isolated else "0"]
    if isolated:  # a fresh network namespace: only a loopback interface, brought up here
        command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *helper]
    else:  # not root: the sitecustomize harness refuses every connection off this machine
        command = helper
    # ~70 images an analysis: ~3.5 s of sleep, so the SIGTERM lands while it runs.
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=_env(**{SECONDS_PER_IMAGE_ENV: "0.05"}))
    assert out.exists(), f"the helper wrote no report:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
def test_page_and_api_work_with_no_network(offline_report: dict[str, object]) -> None:
    report = offline_report
    assert report["outside_network_reachable"] is False, "the test did not cut the network"
    assert report["api_correlate_rows"] == 2, report
    page = report["page"]
    if "skipped" not in page:  # type: ignore[operator]
        assert page["analyse_button"] and "pretrained weights" in page["banner"], page  # type: ignore[index]
        assert page["outside_requests"] == [], page  # type: ignore[index]
    assert report["in_flight"] == "completed", report  # /analyze too, with its probes
    assert report["outside_attempts"] == [], f"the app tried to reach: {report['outside_attempts'][:10]}"


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_refuses_new_ones_and_exits_zero(
        offline_report: dict[str, object]) -> None:
    report = offline_report
    assert report["in_flight"] == "completed", report["app_log_tail"]
    assert re.search(r"(?i)queue is full|shutting down|refused", str(report["new_request_during_shutdown"])), report
    assert report["exit_status"] == 0, report["app_log_tail"]
    assert report["exit_after_result_s"] < 15, report  # prompt once the last result is out
    assert "Traceback" not in str(report["app_log_tail"]), report["app_log_tail"]


@pytest.mark.slow
def test_sigterm_while_loading_exits_zero_promptly(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(lt.free_port()),  # type: ignore
                             "--resnet50", "untrained", "--sanet50", "untrained",
                             "--weights-dir", str(tmp_path / "none")],
                            cwd=ROOT, env=_env(GRADIO_TEMP_DIR=str(tmp_path / "gradio")),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(4)  # importing torch and gradio, building the models
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=30)
    output = proc.stdout.read() if proc.stdout else ""
    assert status == 0, output[-2000:]
    assert time.monotonic() - sent < 10
    assert "Traceback" not in output, output[-2000:]


@pytest.mark.slow
def test_sigterm_when_idle_exits_zero_promptly(server: dict[str, object]) -> None:
    """Last in this file: it stops the module's server."""
    proc = server["proc"]
    assert proc.poll() is None  # type: ignore[union-attr]
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    status = proc.wait(timeout=60)  # type: ignore[union-attr]
    took = time.monotonic() - sent
    log = Path(str(server["log"])).read_text(errors="replace")
    assert status == 0, log[-2000:]
    assert took < 8, f"{took:.1f} s to stop an idle server"
    shutdown = log[log.rindex("signal 15"):]  # earlier tracebacks are Gradio's, of refused API calls
    assert "stopped" in shutdown and "Traceback" not in shutdown, shutdown[-2000:]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--offline-session":
    out_file, work, resnet, sanet, isolated_flag = sys.argv[2:7]
    offline_session(Path(out_file), [resnet, sanet], Path(work), isolated_flag == "1")
