"""The README's figures are the results files': rendering the template again changes nothing."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import render_readme  # noqa: E402

sys.path.pop(0)


def test_readme_is_rendered_from_the_results_files() -> None:
    check = [sys.executable, str(ROOT / "tools" / "render_readme.py"), "--check"]
    done = subprocess.run(check, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_changed_figure_changes_the_readme(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every scalar placeholder resolves, and a file saying otherwise renders another README."""
    template = render_readme.TEMPLATE.read_text()
    found = [m for m in render_readme.PLACEHOLDER.finditer(template) if m.group(1) != "table"]
    assert len(found) > 20
    rendered = render_readme.render(template)
    assert "{{" not in rendered
    original = render_readme.results
    for m in found:
        name, path = m.group(1), m.group(2)
        changed = copy.deepcopy(original(name))
        *parents, last = [q or p for q, p in render_readme.SEGMENT.findall(path)]
        holder = changed
        for key in parents:
            holder = holder[int(key)] if isinstance(holder, list) else holder[key]
        key = int(last) if isinstance(holder, list) else last
        value = holder[key]
        # Never a fixed point, and large enough to show at any format's precision.
        changed_value = value + 1 + abs(value) if isinstance(value, (int, float)) else f"{value}!"
        holder[key] = changed_value
        monkeypatch.setattr(render_readme, "results", lambda n, c=changed, k=name:
                            c if n == k else original(n))  # fmt: skip
        assert render_readme.render(template) != rendered, m.group(0)
