"""The whole recipe as one job: pack → [AR] → CPT phases → merge → SFT → CAP → DPO → export.

Committed stages are skipped and an interrupted one resumes from its checkpoint; a changed
config for a committed stage is refused unless --force-from names it (or a stage before it).

    python jobs/pipeline.py --config configs/tiny.yaml
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/pipeline.py --config configs/qwen3-0.6b.yaml

Under `ray job submit` the job runs in a temporary copy of the working directory: give it s3://
storage and an MLflow server (or absolute paths on a one-machine cluster, as `make demo` does).
"""

import sys

from llada_ray.pipeline.scheduler import main

if __name__ == "__main__":
    sys.exit(main())
