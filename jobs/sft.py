"""Supervised fine-tuning: response-only BD ELBO, mask-ratio bandwidth, complementary pairs.

    python jobs/sft.py --config configs/tiny.yaml
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/sft.py --config configs/tiny.yaml
"""

import sys

from llada_ray.train.run import main

if __name__ == "__main__":
    sys.exit(main("sft"))
