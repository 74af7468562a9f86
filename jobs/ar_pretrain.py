"""Autoregressive pre-training of the tiny default (the AR model CPT converts).

    python jobs/ar_pretrain.py --config configs/tiny.yaml
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/ar_pretrain.py --config configs/tiny.yaml
"""

import sys

from llada_ray.train.run import main

if __name__ == "__main__":
    sys.exit(main("ar_pretrain"))
