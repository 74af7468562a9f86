"""Teacher generation: SFT chats or DPO pairs from an AR teacher over a prompt set (Ray Data).

    python jobs/generate.py --config configs/generate-sft.yaml
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/generate.py --config configs/generate-sft.yaml

The output directory is a `data.sft` / `data.dpo` files source (format jsonl) of a pipeline.
"""

import sys

from llada_ray.generate.job import main

if __name__ == "__main__":
    sys.exit(main())
