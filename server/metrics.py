"""Prometheus metrics, one registry per server (so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    def __init__(self, num_slots: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("palette_requests", "Finished RPCs by method, status code and caller",
                                ["method", "code", "caller"], registry=r)
        self.latency = Histogram("palette_request_latency_seconds", "RPC wall time, accepted to finished",
                                 ["method", "caller"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("palette_inflight_requests", "RPCs started and not yet finished", registry=r)
        self.time_to_first_image = Histogram("palette_time_to_first_image_seconds",
                                             "Generate: accepted to first image sent", buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.queue_depth = Gauge("palette_queue_depth", "Generate requests waiting for sampler rows", registry=r)
        self.queued_images = Gauge("palette_queued_images", "Images waiting for sampler rows", registry=r)
        self.active_slots = Gauge("palette_active_slots", "Sampler rows in use", registry=r)
        slot_buckets = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < num_slots} | {num_slots})
        self.batch_size = Histogram("palette_sampler_batch_size", "Occupied sampler rows per step",
                                    buckets=slot_buckets, registry=r)
        self.step_seconds = Histogram("palette_sampler_step_seconds", "Wall time of one sampler step",
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=r)
        self.tokens = Counter("palette_tokens_sampled", "Image tokens sampled", registry=r)
        self.tokens_per_second = Gauge("palette_tokens_per_second", "Image tokens per second in the last step",
                                       registry=r)
        self.images = Counter("palette_images", "Images sent to clients", registry=r)
        self.decode_batch_size = Histogram("palette_decode_batch_size", "Images per VQGAN decode batch",
                                           buckets=slot_buckets, registry=r)
        self.decode_seconds = Histogram("palette_decode_seconds", "Wall time of one decode batch",
                                        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5), registry=r)
        self.rank_batch_size = Histogram("palette_rank_batch_size", "Images per CLIP batch",
                                         buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self._http = None

    def serve(self, port: int, host: str) -> int:
        """Expose /metrics over HTTP; returns the bound port (0 picks a free one)."""
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise OSError(f"cannot serve metrics on {host}:{port} ({err.strerror or err}); "
                          f"pick another --metrics-port or pass --no-metrics") from None
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
