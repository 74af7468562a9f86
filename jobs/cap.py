"""Confidence-aware parallel training: SFT loss + λ · entropy of correct masked predictions.

    python jobs/cap.py --config configs/tiny.yaml
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/cap.py --config configs/tiny.yaml
"""

import sys

from llada_ray.train.run import main

if __name__ == "__main__":
    sys.exit(main("cap"))
