"""`wattprint report`: one self-contained HTML file, opened in headless Chromium (Debian's package):
every plot loads, nothing is fetched from the network, and simulated energy is never called measured."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from wattprint.cli import main
from wattprint.profiler.twin.simulate import WorkloadSpec, simulate

FULL_PLOTS = 6  # power, requests, per token x2, strata/classes, fit


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed here when missing and running as root, else the test is skipped."""
    exe = shutil.which("chromium")
    if exe is None:
        if os.geteuid() != 0:
            pytest.skip("chromium is not installed and the tests do not run as root: `apt-get install chromium`")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "chromium"]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
            if cmd[1] == "install" and proc.returncode == 0:
                break
        exe = shutil.which("chromium")
        if exe is None:
            pytest.fail(f"could not install chromium: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return exe


def _chrome(exe: str, tmp: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """Headless Chromium with no way out: every host resolves to nothing, the proxy is a closed port."""
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp / 'chromium-profile'}", "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000"]
    return subprocess.run(base + list(args), capture_output=True, text=True, timeout=timeout)


LOAD_PROBE = ('<script>addEventListener("load", () => { const i = [...document.images]; '
              'document.body.dataset.loaded = i.filter(x => x.complete && x.naturalWidth > 0).length + "/" + i.length; });'
              "</script></body>")


def _page_requests(netlog: Path) -> list[str]:
    """URLs the page asked the network for (the browser's own background requests left out)."""
    log = json.loads(netlog.read_text())
    types = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    out = []
    for e in log["events"]:
        p = e.get("params") or {}
        if types.get(e["type"]) == "URL_REQUEST_START_JOB" and "url" in p and (
                p.get("initiator") != "not an origin" or str(p.get("network_isolation_key", "")).startswith("file://")):
            out.append(p["url"])
    return out


def _open(exe: str, html: Path, tmp: Path) -> tuple[str, list[str]]:
    """(images loaded/total, network requests of the page) once the page has loaded."""
    probe = tmp / f"probe-{html.stem}.html"
    probe.write_text(html.read_text().replace("</body>", LOAD_PROBE))
    netlog = tmp / f"net-{html.stem}.json"
    proc = _chrome(exe, tmp, f"--log-net-log={netlog}", "--dump-dom", probe.as_uri())
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = re.search(r'data-loaded="([^"]*)"', proc.stdout)
    assert loaded, "the page did not finish loading"
    return loaded.group(1), _page_requests(netlog)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, llama8b, h100):
    d = tmp_path_factory.mktemp("run")
    simulate(llama8b, h100, WorkloadSpec(requests=150, rate_rps=8, seed=4)).write(d)
    assert main(["attribute", "--steps", str(d / "steps.jsonl"), "--energy", str(d / "energy.jsonl"),
                 "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--out", str(d / "requests.jsonl"),
                 "--summary", str(d / "summary.json"), "-q"]) == 0
    assert main(["report", str(d)]) == 0
    return d


def test_report_renders_every_plot_with_no_network_request(run_dir, chromium, tmp_path):
    html = run_dir / "report.html"
    text = html.read_text()
    assert oct(html.stat().st_mode & 0o777) == "0o600"
    targets = re.findall(r"""\b(?:src|href|srcset|action|poster)\s*=\s*["']?([^"' >]*)""", text)
    assert len(targets) == FULL_PLOTS and all(t.startswith("data:image/png;base64,") for t in targets)
    assert not re.search(r"url\(|@import|<link|https?://", text)
    assert text.count('<img src="data:image/png;base64,') == FULL_PLOTS
    loaded, requests = _open(chromium, html, tmp_path)
    assert loaded == f"{FULL_PLOTS}/{FULL_PLOTS}"
    assert requests == []


def test_the_network_check_catches_a_request(run_dir, chromium, tmp_path):
    """The probe above can fail: a page with an external image is caught twice (not loaded, requested)."""
    bad = tmp_path / "bad.html"
    bad.write_text((run_dir / "report.html").read_text().replace(
        "</main>", '<img src="https://example.com/pixel.png"></main>'))
    loaded, requests = _open(chromium, bad, tmp_path)
    assert loaded == f"{FULL_PLOTS}/{FULL_PLOTS + 1}"
    assert requests == ["https://example.com/pixel.png"]


def test_screenshot_on_a_laptop_screen(run_dir, chromium, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    proc = _chrome(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1440,900",
                   (run_dir / "report.html").as_uri())
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-3000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1440, 900)
    assert len(img.getcolors(1 << 20) or []) > 200  # the power plot is on the first screen, not a blank page


def test_simulated_energy_is_labelled_so(run_dir):
    text = (run_dir / "report.html").read_text()
    assert "SIMULATED (simulated): not a measurement" in text
    assert "none of it is a measurement" in text
    assert "measured (simulated)" not in text


def test_parquet_inputs_and_explicit_paths(run_dir, tmp_path):
    for name in ("steps", "energy", "requests"):
        assert main(["convert", str(run_dir / f"{name}.jsonl"), str(tmp_path / f"{name}.parquet")]) == 0
    out = tmp_path / "r.html"
    assert main(["report", "--steps", str(tmp_path / "steps.parquet"), "--energy", str(tmp_path / "energy.parquet"),
                 "--requests", str(tmp_path / "requests.parquet"), "--summary", str(run_dir / "summary.json"),
                 "--out", str(out), "--title", "from Parquet"]) == 0
    text = out.read_text()
    assert "<title>from Parquet</title>" in text and text.count("data:image/png;base64,") == FULL_PLOTS
    table = re.search(r"<table>.*?</table>", text, flags=re.S).group(0)
    assert table == re.search(r"<table>.*?</table>", (run_dir / "report.html").read_text(), flags=re.S).group(0)


def test_requests_and_summary_alone_say_what_is_missing(run_dir, tmp_path, chromium):
    d = tmp_path / "demo"
    d.mkdir()
    for name in ("requests.jsonl", "summary.json"):
        shutil.copy(run_dir / name, d / name)
    assert main(["report", str(d)]) == 0
    text = (d / "report.html").read_text()
    assert "Not in this report" in text and "no steps or energy file" in text
    assert text.count("data:image/png;base64,") == 3 and text.count('class="missing"') == 1
    loaded, requests = _open(chromium, d / "report.html", tmp_path)
    assert loaded == "3/3" and requests == []


def test_summary_without_model_or_hardware_still_reports(run_dir, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    s = json.loads((d / "summary.json").read_text())
    del s["model_config"], s["hardware"]
    (d / "summary.json").write_text(json.dumps(s))
    assert main(["report", str(d)]) == 0
    assert "per-step figures need the model config and the hardware profile" in (d / "report.html").read_text()


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no requests file" in capsys.readouterr().err
    (tmp_path / "requests.jsonl").write_text('{"id": 1}\n')
    (tmp_path / "summary.json").write_text("{}")
    assert main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path / 'requests.jsonl'}:1:" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def test_library_call_as_profile_makes_it(tmp_path, llama8b, h100):
    """What `profile` calls at its end: the result it has, the steps it recorded; nothing re-read."""
    from wattprint.commands.output import summary_dict
    from wattprint.exporters.report_html import StepCounts, write_report
    from wattprint.profiler.attribution.offline import attribute
    from wattprint.profiler.core.records import entry_arrays

    sim = simulate(llama8b, h100, WorkloadSpec(requests=30, rate_rps=6, seed=8), n_devices=2)
    result = attribute(sim.steps, sim.energy, llama8b, h100, source="simulated", model_name="llama")
    out = write_report(tmp_path / "report.html", requests=result.requests, steps=sim.steps, attribution=result,
                       summary=summary_dict(result.totals, model="llama", hardware="h100-sxm"))
    text = out.read_text()
    assert text.count("data:image/png;base64,") == FULL_PLOTS and "device 1: R²" not in text  # (in the PNG)
    half = len(sim.steps) // 2
    chunks = StepCounts.concat([StepCounts.of(entry_arrays(sim.steps[:half])), StepCounts.of(sim.steps[half:])])
    whole = StepCounts.of(sim.steps)
    assert (chunks.batch == whole.batch).all() and (chunks.decode_tokens == whole.decode_tokens).all()
    assert whole.decode_tokens.sum() == sum(r.decode_tokens for s in sim.steps for r in s.requests)
