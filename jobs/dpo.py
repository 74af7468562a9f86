"""DPO on the block-diffusion ELBO against the frozen SFT/CAP model.

    python jobs/dpo.py --config configs/tiny.yaml
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/dpo.py --config configs/tiny.yaml
"""

import sys

from llada_ray.train.run import main

if __name__ == "__main__":
    sys.exit(main("dpo"))
