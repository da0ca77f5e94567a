"""The blocking work behind each method, run by the batchers on executor threads: one ONNX Runtime pass per
batch, then per-image tracing; probes are handed to worker processes (server/probe_worker.py). Inputs are already
decoded and validated."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from conceptlens.handlers.attacks.registry import attack_kind
from conceptlens.handlers.backends import ModelRuntime
from conceptlens.handlers.trace import TraceOptions, TraceResult, trace_image, trace_last_layer
from conceptlens_client.v1 import conceptlens_service_pb2 as pb

from .errors import Cancelled, DeadlineExpired
from .jobs import ExplainJob, ProbeJob
from .metrics import Metrics
from .probe_worker import ProbeWorkers


@dataclass(frozen=True)
class ExplainOutput:
    logits: np.ndarray  # (n, K)
    traces: list[TraceResult]


class Runners:
    """Batch functions bound to the server's metrics and settings."""

    def __init__(self, metrics: Metrics, plausibility_threshold: float,
                 probe_workers: ProbeWorkers | None = None) -> None:
        self.metrics = metrics
        self.threshold = plausibility_threshold
        if probe_workers is None:  # probes on the batcher's own thread
            probe_workers = ProbeWorkers(0, threshold=plausibility_threshold)
        self.probe_workers = probe_workers

    def _forward(self, runtime: ModelRuntime, images: Sequence[np.ndarray]):
        batch = np.concatenate(list(images), axis=0)
        out = runtime.forward(batch)
        self.metrics.inference.labels(runtime.name, "onnxruntime").observe(out.seconds)
        return out

    def predict(self, runtime: ModelRuntime, payloads: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each payload is one request's images; returns each request's logits."""
        logits = self._forward(runtime, payloads).logits
        return np.split(logits, np.cumsum([len(p) for p in payloads])[:-1])

    def explain(self, runtime: ModelRuntime, jobs: Sequence[ExplainJob]) -> list[ExplainOutput | DeadlineExpired]:
        """One ONNX pass for the whole batch, then each image's trace with its request's options. A job whose
        deadline passes between images gets DeadlineExpired as its result (the batcher raises it to its caller)."""
        out = self._forward(runtime, [job.images for job in jobs])
        started = time.perf_counter()
        results, start = [], 0
        traced = {layer for job in jobs for layer in job.layers}
        means = {name: out.activations[name].mean(axis=(2, 3)) for name in traced}  # (N, C), once per batch
        for job in jobs:
            n = len(job.images)
            try:
                results.append(self._trace_job(runtime, job, out, means, start))
            except (DeadlineExpired, Cancelled) as err:  # this caller's only: the batch's other jobs go on
                results.append(err)
            start += n
        if any(layer != getattr(runtime.head, "layer", None) for job in jobs for layer in job.layers):
            self.metrics.inference.labels(runtime.name, "torch").observe(time.perf_counter() - started)
        return results

    def _trace_job(self, runtime: ModelRuntime, job: ExplainJob, out, means, start: int) -> ExplainOutput:
        n = len(job.images)
        done = [0]  # images traced so far, for the messages of `check`
        check = _stop_check(job, n, done)
        options = TraceOptions(layers=job.layers, top_k_units=job.top_k_units, target=job.target,
                               include_maps=job.include_maps, map_size=job.map_size, depth=job.depth,
                               candidates=job.candidates, check=check)
        head = runtime.head
        if head is not None and job.layers == (head.layer,) and job.depth == 1:  # exact and cheap: all at once
            check()
            end = start + n
            traces = trace_last_layer(runtime, out.logits[start:end], out.activations[head.layer][start:end],
                                      means[head.layer][start:end], options, plausibility_threshold=self.threshold)
            return ExplainOutput(out.logits[start:end], traces)
        traces = []
        for i in range(start, start + n):
            done[0] = i - start
            check()
            traces.append(trace_image(
                runtime, job.images[i - start], out.logits[i],
                {layer: out.activations[layer][i] for layer in job.layers}, options,
                plausibility_threshold=self.threshold, means={layer: means[layer][i] for layer in job.layers}))
        return ExplainOutput(out.logits[start : start + n], traces)

    def probe(self, runtime: ModelRuntime, jobs: Sequence[ProbeJob]) -> list[list[pb.ProbeResult] | Exception]:
        """Each job's probe in turn on a probe worker process (server/probe_worker.py: its own GIL, so Predict
        never waits for a probe's torch calls), returned as ProbeResult messages the worker encoded; jobs carry
        different attacks, so they do not share passes. A job whose deadline passes, whose attack refuses its
        inputs or whose worker dies fails alone."""
        results: list[list[pb.ProbeResult] | Exception] = []
        for job in jobs:
            kind = job.attack.kind
            try:
                out = self.probe_workers.run(runtime, job)
            except Exception as err:  # InvalidInput, DeadlineExpired, ProbeWorkerLost, ...: the table maps it
                if isinstance(err, DeadlineExpired):  # counted here: the caller may be gone already
                    self.metrics.probes.labels(runtime.name, kind, "deadline_exceeded").inc()
                results.append(err)
                continue
            self.metrics.probe_duration.labels(runtime.name, kind).observe(out.seconds)
            backend = "onnxruntime" if attack_kind(kind).black_box else "torch"
            self.metrics.inference.labels(runtime.name, backend).observe(out.seconds)
            messages = [pb.ProbeResult.FromString(data) for data in out.results]
            for item in messages:
                self.metrics.probes.labels(runtime.name, kind, "flipped" if item.flipped else "robust").inc()
                if item.flipped:
                    self.metrics.probe_flips.labels(runtime.name).inc()
                    if item.HasField("min_flip_epsilon"):
                        self.metrics.flip_epsilon.labels(runtime.name).observe(item.min_flip_epsilon)
            results.append(messages)
        return results


def _stop_check(job: ExplainJob, n: int, done: list[int]):
    """Called between images and between the exact passes inside one image's trace: raises Cancelled once the call
    ended (its client went away, or the server is stopping) and DeadlineExpired once its deadline passed."""

    def check() -> None:
        if job.cancel is not None and job.cancel.is_set():
            raise Cancelled(f"the call ended while tracing image {done[0]} of {n}; stopped")
        if job.deadline is not None and time.monotonic() > job.deadline:
            raise DeadlineExpired(f"deadline passed while tracing image {done[0]} of {n}")

    return check
