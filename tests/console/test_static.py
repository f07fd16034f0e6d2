"""The console's JavaScript is vendored from the npm registry at pinned versions and
served as static files; pages carry no inline script (issue 7)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.staticfiles import finders

ROOT = Path(__file__).resolve().parents[2]
VENDOR = ROOT / "governance" / "static" / "vendor"
PAGES = [
    "/console/",
    "/console/budgets/",
    "/console/budgets/tenant/cus_acme/",
    "/console/agents/",
    "/console/spend/",
]


def test_the_vendored_files_match_their_pins():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "vendor_static.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((VENDOR / "VENDORED.json").read_text())
    assert manifest["chart.js"]["version"].startswith("4.")
    assert manifest["htmx.org"]["version"].startswith("2.")
    for entry in manifest.values():
        assert entry["integrity"].startswith("sha512-")


def test_a_changed_vendored_file_is_caught(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "vendor_static", ROOT / "scripts" / "vendor_static.py"
    )
    vendor_static = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "vendor_static", vendor_static)
    spec.loader.exec_module(vendor_static)
    copy = tmp_path / "vendor"
    copy.mkdir()
    for path in VENDOR.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(vendor_static, "DEST", copy)
    monkeypatch.setattr(vendor_static, "MANIFEST", copy / "VENDORED.json")
    assert vendor_static.check() == []
    (copy / "htmx.min.js").write_text("/* tampered */")
    (problem,) = vendor_static.check()
    assert problem.startswith("htmx.min.js differs from htmx.org@2.")


def test_the_libraries_keep_their_license_headers_and_files():
    chart = (VENDOR / "chart.umd.min.js").read_text()
    assert re.match(r"/\*!\n \* Chart\.js v4\.\d+\.\d+\n", chart)
    assert "Released under the MIT License" in chart[:300]
    assert "MIT License" in (VENDOR / "chart.js.LICENSE.md").read_text()
    assert 'version:"2.' in (VENDOR / "htmx.min.js").read_text()
    assert "Zero-Clause BSD" in (VENDOR / "htmx.org.LICENSE").read_text()


@pytest.mark.parametrize(
    "name", ["vendor/chart.umd.min.js", "vendor/htmx.min.js", "console/console.js"]
)
def test_django_finds_the_static_files(name):
    assert finders.find(name) is not None


@pytest.mark.parametrize("url", PAGES)
def test_each_page_loads_the_libraries_from_static_files(staff_client, acme_budget, url):
    html = staff_client.get(url).content.decode()
    for src in ("/static/vendor/htmx.min.js", "/static/vendor/chart.umd.min.js",
                "/static/console/console.js"):  # fmt: skip
        assert f'<script src="{src}" defer></script>' in html
    # No inline script: only files, and JSON data that is never run.
    for tag in re.findall(r"<script[^>]*>", html):
        assert ' src="' in tag or 'type="application/json"' in tag, tag
    assert " on" not in " ".join(re.findall(r"<[^>]+ on[a-z]+=", html))
    assert "cdn" not in html.lower()
