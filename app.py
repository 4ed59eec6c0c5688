"""sanet-viz web app: ``python app.py`` (flags: ``python app.py --help``; each has an environment
variable).

The module-level ``demo`` is what Hugging Face Spaces and ``gradio app.py`` look for; it is built
from the environment, or from the command line when run as a script. Everything it does lives
in ``sanet_viz.server``.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # until the server runs, SIGTERM just exits: imports and loading take a while
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))

from sanet_viz.server.env import prepare_environment

prepare_environment()  # before Gradio is imported

from sanet_viz.server.config import parse_args  # noqa: E402
from sanet_viz.server.startup import create_demo, launch  # noqa: E402
from sanet_viz.weights import WeightsError  # noqa: E402

ARGS = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
try:
    demo = create_demo(ARGS)
except WeightsError as exc:  # a refused or unusable weights file: the reason, not a traceback
    if __name__ != "__main__":
        raise
    import logging

    logging.getLogger("sanet-viz").error("cannot start: %s", exc)
    sys.exit(2)

if __name__ == "__main__":
    launch(demo, ARGS)
