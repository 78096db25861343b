"""``python -m train.pipeline``: the main job (``make demo``)."""
import sys

from train.pipeline import main

if __name__ == "__main__":   # not when a spawned worker (the control reward model) imports this as __mp_main__
    sys.exit(main())
