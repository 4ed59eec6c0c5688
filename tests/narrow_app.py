"""``python tests/narrow_app.py ARGS``: ``python app.py ARGS`` with the narrow architectures of
:mod:`narrow_models` (same module names, a fraction of the compute), for app-server tests."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # a script gets only its own folder (tests/) on the path, not the package's

from narrow_models import use_narrow_models  # noqa: E402

use_narrow_models()
sys.argv[0] = str(ROOT / "app.py")
runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
