"""The built wheel carries the twistd dropin (and no twisted/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_contains_the_plugin_dropin_and_console_files(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), ROOT],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    [wheel] = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    assert "twisted/plugins/stdaemon_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "stdaemon/tap.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "stdaemon-admin" in zipfile.ZipFile(tmp_path / wheel).read(entry_points).decode()


def test_plugin_is_one_line_and_imports_nothing_heavy():
    text = open(os.path.join(ROOT, "twisted", "plugins", "stdaemon_plugin.py")).read()
    assert "import stdaemon" not in text and "from stdaemon" not in text
    assert not os.path.exists(os.path.join(ROOT, "twisted", "plugins", "__init__.py"))
    assert not os.path.exists(os.path.join(ROOT, "twisted", "__init__.py"))
