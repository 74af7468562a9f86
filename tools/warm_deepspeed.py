"""Build DeepSpeed's JIT C++ ops once (cached in $TORCH_EXTENSIONS_DIR, else ~/.cache).

On CPU the first ZeRO engine compiles its communication/optimizer ops (~30 s) and CPU-offloaded
Adam another (~45 s). Doing it at install time keeps that cost out of the first training run.
"""

from __future__ import annotations

import os
import socket
import time


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    import deepspeed
    import torch
    from deepspeed.ops.op_builder import CPUAdamBuilder

    started = time.monotonic()
    deepspeed.init_distributed(dist_backend="gloo")
    model = torch.nn.Linear(8, 8)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config={
            "train_micro_batch_size_per_gpu": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": 1},
        },
    )
    engine.backward(engine(torch.randn(1, 8)).sum())
    engine.step()
    CPUAdamBuilder().load()
    print(f"DeepSpeed ops ready in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
