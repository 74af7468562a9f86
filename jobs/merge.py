"""Uniform average of the last CPT phase's top-k checkpoints by validation loss.

    python jobs/merge.py --config configs/tiny.yaml
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/merge.py --config configs/tiny.yaml
"""

import sys

from llada_ray.train.run import main

if __name__ == "__main__":
    sys.exit(main("merge"))
