"""``python -m train.pipeline``: the main job (``make demo``)."""
import sys

from train.pipeline import main

sys.exit(main())
