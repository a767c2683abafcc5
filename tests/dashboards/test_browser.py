"""The report in a real browser: headless Chromium opens it offline and every figure draws.

A copy of the page gets a small probe script first in <head>: it records
every uncaught error and console.error, and once the page has loaded writes,
per <section>, how many figures the page promises (data-figures) and how many
plotly drew (a .plot-container holding an svg.main-svg), into a
<pre id="probe">. Chromium's --dump-dom after a virtual-time budget prints
the DOM with that element in it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dashboards.report import write_report

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push('error: ' + e.message));
window.addEventListener('unhandledrejection', e => window.__errors.push('rejection: ' + e.reason));
const __consoleError = console.error;
console.error = function (...args) { window.__errors.push('console: ' + args.join(' '));
                                     __consoleError.apply(console, args); };
window.addEventListener('load', () => setTimeout(() => {
  const sections = {};
  document.querySelectorAll('section').forEach(s => {
    const drawn = [...s.querySelectorAll('.plot-container')]
      .filter(c => c.querySelector('svg.main-svg')).length;
    sections[s.id] = {expected: Number(s.dataset.figures), drawn: drawn};
  });
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({errors: window.__errors, sections: sections});
  document.body.appendChild(pre);
}, 1000));
</script>"""


def chromium() -> str:
    """Debian's chromium; the test fails (not skips) without it: CI must run it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    found = found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if not found:
        pytest.fail("chromium not found: run `make test`, which installs Debian's chromium "
                    "(apt-get install chromium) before the tests")
    return found


def probe(page: Path, tmp_path: Path) -> dict:
    """Open a probed copy of ``page`` in headless Chromium; return the probe's JSON."""
    copy = tmp_path / f"probed-{page.name}"
    copy.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    profile = tmp_path / f"profile-{page.stem}"
    profile.mkdir()
    result = subprocess.run(
        [chromium(), *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
         "--window-size=1400,1000", "--dump-dom", copy.as_uri()],
        capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the probe never reported; chromium said:\n{result.stderr[-3000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")
                      .replace("&lt;", "<").replace("&gt;", ">"))


def test_every_figure_renders_without_javascript_errors(toy_run, tmp_path):
    from orchestrator.results import ResultsStore
    from tests.dashboards.test_neighbourhood_report import epoch_rows
    from tests.dashboards.test_curation_report import curation_rows
    ResultsStore(toy_run).write("epochs", epoch_rows(0.0, 0) + epoch_rows(10.0, 0))  # section 9
    ResultsStore(toy_run).write("curation", curation_rows())  # section 10
    page = write_report(toy_run)
    report = probe(page, tmp_path)
    assert report["errors"] == []
    sections = report["sections"]
    assert list(sections) == ["summary", "encoders", "table", "scaling", "layers", "sensitivity",
                              "search", "health", "neighbourhood", "curation"]
    assert sum(s["expected"] for s in sections.values()) == 13
    for key, counts in sections.items():
        assert counts["drawn"] == counts["expected"], f"section {key}: {counts}"


def test_the_probe_sees_a_javascript_error(toy_run, tmp_path):
    """The harness is not blind: a page that throws is reported."""
    page = write_report(toy_run, tmp_path / "broken.html")
    text = page.read_text().replace("</body>", "<script>undefinedFunction()</script></body>")
    page.write_text(text)
    report = probe(page, tmp_path)
    assert any("undefinedFunction" in e for e in report["errors"])
