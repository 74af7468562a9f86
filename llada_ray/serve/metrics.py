"""The decode loop's figures as Ray metrics: Prometheus, so the Ray dashboard and Grafana show
them (exported by every node's metrics agent, tagged with the deployment and replica)."""

from __future__ import annotations

from ray.serve import metrics

from llada_ray.serve.loop import LoopStats, bucket_bounds

SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class ServeMetrics(LoopStats):
    """LoopStats that also observe into Ray metrics."""

    def __init__(self, max_batch: int) -> None:
        super().__init__(max_batch)
        self.batch_size = metrics.Histogram(
            "llada_batch_size",
            "requests in a decode step",
            boundaries=[float(b) for b in bucket_bounds(max_batch)],
        )
        self.queue_wait = metrics.Histogram(
            "llada_queue_wait_s", "seconds from arrival to joining the batch", SECONDS
        )
        self.first_block = metrics.Histogram(
            "llada_time_to_first_block_s", "seconds from arrival to the first update", SECONDS
        )
        self.request_speed = metrics.Histogram(
            "llada_request_tokens_per_s",
            "a finished request's tokens over its decoding seconds",
            [10, 25, 50, 100, 250, 500, 1000, 2500, 5000],
        )
        self.tokens_out = metrics.Counter("llada_generated_tokens", "tokens decoded")
        self.prefix_hit_rate = metrics.Gauge(
            "llada_prefix_cache_hit_rate", "prompt tokens restored over prompt tokens"
        )
        self.prefix_bytes = metrics.Gauge("llada_prefix_cache_bytes", "bytes of pages held")

    def observe_step(self, batch_size: int) -> None:
        super().observe_step(batch_size)
        self.batch_size.observe(batch_size)

    def observe_state(self, state: dict) -> None:
        if (prefix := state["prefix_cache"]) is not None:
            self.prefix_hit_rate.set(prefix["hit_rate"])
            self.prefix_bytes.set(prefix["bytes"])

    def observe_admitted(self, queue_wait_s: float) -> None:
        super().observe_admitted(queue_wait_s)
        self.queue_wait.observe(queue_wait_s)

    def observe_first_block(self, seconds: float) -> None:
        super().observe_first_block(seconds)
        self.first_block.observe(seconds)

    def observe_finished(
        self, tokens: int, seconds: float, forwards: int, repeated: int, trigrams: int, edits: int
    ) -> None:
        super().observe_finished(tokens, seconds, forwards, repeated, trigrams, edits)
        self.tokens_out.inc(tokens)
        if seconds > 0:
            self.request_speed.observe(tokens / seconds)
