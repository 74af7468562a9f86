"""Object storage: the run's root as a pyarrow filesystem (local directory or S3).

Credentials are never part of the config: S3 access comes from the standard AWS chain (env vars,
profile, instance role) on each node, so no key is pickled into tasks or written to a log.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from llada_ray.config import StorageConfig


def storage_root(cfg: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for the run's storage root; Ray Train's storage_filesystem."""
    if not cfg.is_s3:
        root = Path(cfg.root).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return pafs.LocalFileSystem(), str(root)
    parsed = urlparse(cfg.root)
    options: dict = {
        "region": cfg.region,
        # Retries with backoff ride out a flaky or briefly unavailable endpoint.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=10),
    }
    if cfg.endpoint_url:
        endpoint = urlparse(cfg.endpoint_url)
        options |= {"endpoint_override": endpoint.netloc, "scheme": endpoint.scheme or "https"}
    return pafs.S3FileSystem(**options), f"{parsed.netloc}{parsed.path}".rstrip("/")
