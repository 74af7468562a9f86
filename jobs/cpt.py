"""Continual pre-training AR → block diffusion along the WSD schedule: one phase (--phase) or all.

    python jobs/cpt.py --config configs/tiny.yaml
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/cpt.py --config configs/tiny.yaml
"""

import sys

from llada_ray.train.run import main

if __name__ == "__main__":
    sys.exit(main("cpt"))
