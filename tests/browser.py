"""Renders a page in headless Chromium (Debian's ``chromium``) and reads back what it laid out."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# Measures, once the page has loaded, each partner section and the plots inside it.
PROBE = """
<script>
window.addEventListener('load', () => {
  const out = [...document.querySelectorAll('section.partner')].map(s => ({
    partner: s.dataset.partner,
    heading: s.querySelector('h2')?.innerText,
    height: s.getBoundingClientRect().height,
    plots: [...s.querySelectorAll('figure.plot svg')].map(svg => {
      const r = svg.getBoundingClientRect();
      return {width: r.width, height: r.height, marks: svg.querySelectorAll('path, use, line, polyline').length};
    }),
  }));
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def rendered_layout(page: Path, scratch: Path) -> list[dict[str, object]]:
    """Each partner section as Chromium laid it out: heading, height, and its plots' sizes."""
    browser = chromium()
    if browser is None:
        if os.environ.get("FEDXREC_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed (apt-get install chromium); .ci/run installs it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    probe = scratch / "probed.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000", f"--user-data-dir={scratch / 'chromium'}",
         "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    match = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert match, f"chromium rendered no probe (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(html.unescape(match.group(1)))


def assert_page_shows_every_partner(page: Path, partners: list[str], scratch: Path, *, plots_each: int = 1) -> list[dict[str, object]]:
    layout = rendered_layout(page, scratch)
    assert sorted(str(s["partner"]) for s in layout) == sorted(partners), layout
    for section in layout:
        assert section["heading"] == f"Partner {section['partner']}"
        assert float(section["height"]) > 200, section  # type: ignore[arg-type]
        plots = section["plots"]
        assert isinstance(plots, list) and len(plots) >= plots_each, section
        for plot in plots:
            assert plot["width"] > 200 and plot["height"] > 100 and plot["marks"] > 5, section
    return layout
