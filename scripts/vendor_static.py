#!/usr/bin/env python3
"""Vendor the console's JavaScript libraries from the npm registry (standard library only).

For each pinned package: read the version's metadata from the registry, check that its
`dist.integrity` is the one pinned here, download the tarball, check its SHA-512 against
that integrity, and copy the listed files (the library, untouched, with its license
header, and its LICENSE) into governance/static/vendor/. VENDORED.json there records
what was copied and each file's SHA-256, so `--check` can verify the tree offline.

    python scripts/vendor_static.py          # (re)write the vendored files
    python scripts/vendor_static.py --check  # verify them against VENDORED.json, offline

Upgrading: change `version` below and run the script; it stops and prints the registry's
integrity for the new version, which you compare (e.g. with `npm view PKG@VERSION
dist.integrity`) and paste into `integrity`. The files are committed, so `make run` and
CI never need the network.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REGISTRY = "https://registry.npmjs.org"
ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "governance" / "static" / "vendor"
MANIFEST = DEST / "VENDORED.json"


@dataclass(frozen=True)
class Pin:
    package: str
    version: str
    integrity: str  # the registry's dist.integrity for this version
    files: dict[str, str]  # path in the tarball -> file name under DEST


PINS = [
    Pin(
        "chart.js",
        "4.6.1",
        "sha512-hJyniucsFmq//EvXYvJ6c6mahPoI3kaxdjVH8awTaJ/fDNWeSqqqArixMJWkWNN6fcYvPU3HneSANFNYtRi61g==",
        {
            "package/dist/chart.umd.min.js": "chart.umd.min.js",
            "package/LICENSE.md": "chart.js.LICENSE.md",
        },
    ),
    Pin(
        "htmx.org",
        "2.0.11",
        "sha512-Thx/WtpeOQqSrqBCw/A1cwGJGg4UrVa3+sW0GmrM3p4gJgO89ecH4qtbnyzDDWFvBTqjnIMCgELTNt636dtamA==",
        {
            "package/dist/htmx.min.js": "htmx.min.js",
            "package/LICENSE": "htmx.org.LICENSE",
        },
    ),
]


class VendorError(Exception):
    pass


def _get(url: str) -> bytes:
    if not url.startswith(REGISTRY + "/"):
        raise VendorError(f"refusing to download {url}: not on {REGISTRY}")
    # https on the registry only (checked above), so S310's file: and custom schemes cannot occur.
    request = urllib.request.Request(url, headers={"User-Agent": "spend-governance-vendor"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
        return response.read()


def sri_sha512(content: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(content).digest()).decode()


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def fetch(pin: Pin) -> dict[str, bytes]:
    """The pinned files of one package, verified against the registry's integrity."""
    meta = json.loads(_get(f"{REGISTRY}/{pin.package}/{pin.version}"))
    dist = meta["dist"]
    if dist["integrity"] != pin.integrity:
        raise VendorError(
            f"{pin.package}@{pin.version}: the registry says dist.integrity is\n  "
            f"{dist['integrity']}\nbut the pin in scripts/vendor_static.py is\n  "
            f"{pin.integrity or '(empty)'}\nCheck the new value and update the pin."
        )
    tarball = _get(dist["tarball"])
    if sri_sha512(tarball) != dist["integrity"]:
        raise VendorError(f"{pin.package}@{pin.version}: the tarball does not match its integrity")
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for member in archive.getmembers():
            if member.name in pin.files and member.isfile():
                found[pin.files[member.name]] = archive.extractfile(member).read()
    missing = set(pin.files.values()) - set(found)
    if missing:
        raise VendorError(f"{pin.package}@{pin.version}: not in the tarball: {sorted(missing)}")
    return found


def vendor() -> None:
    DEST.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for pin in PINS:
        files = fetch(pin)
        for name, content in files.items():
            (DEST / name).write_bytes(content)
        manifest[pin.package] = {
            "version": pin.version,
            "integrity": pin.integrity,
            "files": {name: sha256(content) for name, content in sorted(files.items())},
        }
        print(f"{pin.package}@{pin.version}: {', '.join(sorted(files))}")
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")


def check() -> list[str]:
    """Problems with the vendored tree (empty when it matches the pins), without network."""
    if not MANIFEST.exists():
        return [f"{MANIFEST.relative_to(ROOT)} is missing: run make vendor-static"]
    manifest = json.loads(MANIFEST.read_text())
    problems = []
    for pin in PINS:
        entry = manifest.get(pin.package)
        if entry is None or (entry["version"], entry["integrity"]) != (pin.version, pin.integrity):
            problems.append(f"{pin.package}: vendored files are not {pin.version} as pinned")
            continue
        for name, digest in entry["files"].items():
            path = DEST / name
            if not path.exists():
                problems.append(f"{name} is missing")
            elif sha256(path.read_bytes()) != digest:
                problems.append(f"{name} differs from {pin.package}@{pin.version}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify offline, change nothing")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    try:
        vendor()
    except VendorError as exc:
        print(f"vendor_static: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
