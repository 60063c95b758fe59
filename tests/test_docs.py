"""The API reference is generated from the docstrings and must be current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_api_reference_is_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "make_api_docs.py"), "--check"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_docs_links_resolve():
    for page in list((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        text = page.read_text()
        for part in text.split("](")[1:]:
            target = part.split(")")[0].split("#")[0]
            if not target or target.startswith("http"):
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_every_public_name_is_in_the_api_reference():
    import curvprune

    text = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in curvprune.__all__
               if name != "__version__" and f"### `{name}`" not in text]
    assert not missing, f"add {missing} to SECTIONS in tools/make_api_docs.py"
