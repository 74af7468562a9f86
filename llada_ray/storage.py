"""Object storage: local paths and s3:// URIs as pyarrow filesystems (the run's root, sources).

Credentials are never part of the config: S3 access comes from the standard AWS chain (env vars,
profile, instance role) on each node, so no key is pickled into tasks or written to a log.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from llada_ray.config import StorageConfig


def filesystem_for(uri: str, cfg: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI (via cfg's endpoint)."""
    if not uri.startswith("s3://"):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    options: dict = {
        "region": cfg.region,
        # Retries with backoff ride out a flaky or briefly unavailable endpoint.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.retry_attempts),
    }
    if cfg.endpoint_url:
        endpoint = urlparse(cfg.endpoint_url)
        options |= {"endpoint_override": endpoint.netloc, "scheme": endpoint.scheme or "https"}
    parsed = urlparse(uri)
    return pafs.S3FileSystem(**options), f"{parsed.netloc}{parsed.path}".rstrip("/")


def storage_root(cfg: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """The run's storage root; Ray Train's storage_filesystem + storage_path."""
    fs, root = filesystem_for(cfg.root, cfg)
    if isinstance(fs, pafs.LocalFileSystem):  # S3 has no directories to make
        fs.create_dir(root, recursive=True)
    return fs, root
