"""The fair AR baseline: the AR parent fine-tuned with the next-token loss on the SFT rows.

    python jobs/ar_sft.py --config configs/tiny.yaml
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/ar_sft.py --config configs/tiny.yaml
"""

import sys

from llada_ray.train.run import main

if __name__ == "__main__":
    sys.exit(main("ar_sft"))
