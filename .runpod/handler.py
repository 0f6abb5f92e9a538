"""The entry file RunPod's Hub looks for: it starts the worker exactly as `python -m handler` does.

The image runs `python -m handler`; this file exists so the Hub's build finds a handler, and it
works when run directly (`python .runpod/handler.py`).
"""

import sys
from pathlib import Path

# Run as a script, this directory would come first on the path and shadow the `handler` package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from handler.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main()
