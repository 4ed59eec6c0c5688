"""``python tests/narrow_app.py ARGS``: ``python app.py ARGS`` with the narrow architectures of
:mod:`narrow_models` (same module names, a fraction of the compute), for app-server tests."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]  # a script's own folder only is on the path

from narrow_models import use_narrow_models  # noqa: E402

use_narrow_models()
sys.argv[0] = str(ROOT / "app.py")
runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
