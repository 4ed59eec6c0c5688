"""``python tests/narrow_app.py ARGS``: ``python app.py ARGS`` with the narrow architectures of
:mod:`narrow_models` (same module names, a fraction of the compute), for app-server tests;
``SANET_VIZ_TEST_SECONDS_PER_IMAGE=S``: their forwards also sleep S seconds per image."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # a script gets only its own folder (tests/) on the path, not the package's

from narrow_models import SECONDS_PER_IMAGE_ENV, use_narrow_models  # noqa: E402

use_narrow_models(seconds_per_image=float(os.environ.get(SECONDS_PER_IMAGE_ENV) or 0))
sys.argv[0] = str(ROOT / "app.py")
runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
