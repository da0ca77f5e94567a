"""The ConceptLens servicer: decode → validate → enqueue → encode. It holds no model logic and imports no
torch; the batchers run the work (server/runners.py) and server/errors.py turns failures into status codes."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

import grpc

from conceptlens.handlers.errors import InvalidInput
from conceptlens_client.v1 import conceptlens_service_pb2 as pb
from conceptlens_client.v1 import conceptlens_service_pb2_grpc as pb_grpc

from . import encoding, errors, probe_validation, reply_size, validation
from .batching import Batcher
from .config import BatchConfig, ServerConfig
from .decode_pool import DecodePool
from .decoding import ImageSpec, decode_images, decode_inline
from .jobs import ExplainJob, ProbeJob
from .metrics import Metrics

if TYPE_CHECKING:  # both import torch through the model runtime; the servicer itself never does
    from .repository import ModelRepository
    from .runners import Runners


class ConceptLensServicer(pb_grpc.ConceptLensServicer):
    """One instance per server. Batchers are created per (model, method) on first use."""

    def __init__(self, config: ServerConfig, repository: ModelRepository, runners: Runners,
                 metrics: Metrics) -> None:
        self.config = config
        self.limits = config.limits
        self.repo = repository
        self.metrics = metrics
        self.runners = runners
        self._batchers: dict[tuple[str, str], Batcher] = {}
        self._decoder = DecodePool(threads=2, per_call=1)  # calls take turns per image: no heavy one starves others
        self._cancels: set[threading.Event] = set()  # one per Explain whose work may still run

    async def close(self) -> None:
        for cancel in list(self._cancels):  # stop the traces still running on executor threads
            cancel.set()
        for batcher in self._batchers.values():
            await batcher.close()
        self._decoder.close()

    def batcher(self, model: str, method: str) -> Batcher:
        """The batching queue of (model, method), made on first use; the Open Inference Protocol shares Predict's."""
        key = (model, method)
        if key not in self._batchers:
            fn = {"predict": self.runners.predict, "explain": self.runners.explain,
                  "probe": self.runners.probe}[method]
            cfg: BatchConfig = getattr(self.config, method)
            self._batchers[key] = Batcher(model, method, fn, cfg, self.metrics)
        return self._batchers[key]

    async def _images(self, images, runtime, cap: int):
        validation.image_count(len(images), cap)
        spec = ImageSpec(runtime.input_size, runtime.channels)
        if decode_inline(images):
            return decode_images(images, spec, max_pixels=self.limits.max_pixels)
        # a deadline or cancel cancels this task, which drops the call's remaining decode work
        return await self._decoder.decode(images, spec, max_pixels=self.limits.max_pixels,
                                          max_request_pixels=self.limits.max_request_pixels, deadline=None)

    # --- methods -------------------------------------------------------------------------------------------

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        try:
            runtime = self.repo.resolve(*validation.model_ref(request.model, request.version))
            k = validation.top_k(request.top_k, len(runtime.classes), "top_k")
            batcher, deadline = self.batcher(runtime.name, "predict"), _deadline(context)
            batcher.check_admission(deadline)  # refused before the decoding work
            images = await self._images(request.images, runtime, self.limits.max_images)
            logits = await batcher.submit(runtime, images, len(images), deadline)
            return encoding.predict_response(runtime.name, runtime.version, logits, runtime.classes, k)
        except Exception as err:
            await errors.abort(context, err, "Predict")

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.ExplainResponse:
        cancel = threading.Event()  # set when this call ends, whatever ends it: its trace stops at the next check
        self._cancels.add(cancel)
        try:
            runtime = self.repo.resolve(*validation.model_ref(request.model, request.version))
            classes = runtime.classes
            k = validation.top_k(request.top_k_classes, len(classes), "top_k_classes")
            layers = validation.layers(list(request.layers), runtime.layer_order)
            units = min(runtime.layer(name).units for name in layers)
            top_k_units = validation.top_k(request.top_k_units, units, "top_k_units")
            depth = validation.depth(request.depth, len(layers))
            validation.link_work(top_k_units, depth, self.limits.max_links)
            validation.image_count(len(request.images), self.limits.max_images)
            map_size = validation.map_size(request.map_size, runtime.input_size)
            reply_size.check_explain(runtime, len(request.images), layers, top_k_units, depth, request.include_maps,
                                     map_size, k, self.limits.max_message_bytes)
            batcher, deadline = self.batcher(runtime.name, "explain"), _deadline(context)
            batcher.check_admission(deadline)
            images = await self._images(request.images, runtime, self.limits.max_images)
            job = ExplainJob(
                images=images,
                layers=tuple(layers),
                top_k_units=top_k_units,
                target=validation.target_class(request.target_class, classes),
                include_maps=request.include_maps,
                map_size=map_size,
                depth=depth,
                candidates=validation.candidates(request.candidates, self.limits.max_candidates),
                deadline=deadline,
                cancel=cancel,
            )
            out = await batcher.submit(runtime, job, len(images), deadline)
            self._count_explained(runtime.name, out.traces)
            return encoding.explain_response(runtime.name, runtime.version, out.logits, out.traces, classes, k)
        except Exception as err:
            await errors.abort(context, err, "Explain")
        finally:
            cancel.set()
            self._cancels.discard(cancel)

    def _count_explained(self, model: str, traces) -> None:
        """Adversarial flags and concept hits of one response, one counter update per distinct label."""
        flagged = sum(1 for result in traces if result.adversarial)
        if flagged:
            self.metrics.adversarial_flags.labels(model).inc(flagged)
        hits = Counter(unit.concept for result in traces for unit in result.layers[-1].units if unit.concept)
        for concept, count in hits.items():
            self.metrics.concept_hit(model, concept, count)

    async def Probe(self, request: pb.ProbeRequest, context: grpc.aio.ServicerContext) -> pb.ProbeResponse:
        """Attack the images on the probe queue (its own executor: Predict is never starved), then encode."""
        model, kind = request.model or "unknown", probe_validation.kind_name(request.attack)
        try:
            runtime = self.repo.resolve(*validation.model_ref(request.model, request.version))
            model = runtime.name
            validation.image_count(len(request.images), self.limits.max_probe_images)
            layers = validation.layers(list(request.layers), runtime.layer_order)
            units = min(runtime.layer(name).units for name in layers)
            top_k_units = validation.top_k(request.top_k_units, units, "top_k_units")
            if not request.HasField("attack"):
                raise InvalidInput("attack", "required: the attack to run")
            attack = probe_validation.attack(request.attack, runtime.classes, runtime.input_size, self.limits,
                                             len(request.images), self.repo.resolve)
            reply_size.check_probe(runtime, len(request.images), request.return_adversarial, top_k_units, len(layers),
                                   self.limits.max_message_bytes)
            batcher, deadline = self.batcher(runtime.name, "probe"), _deadline(context)
            batcher.check_admission(deadline)
            images = await self._images(request.images, runtime, self.limits.max_probe_images)
            job = ProbeJob(images=images, attack=attack, layers=tuple(layers), top_k_units=top_k_units,
                           candidates=min(validation.DEFAULT_CANDIDATES, self.limits.max_candidates),
                           deadline=deadline, top_k=min(validation.DEFAULT_TOP_K, len(runtime.classes)),
                           return_adversarial=request.return_adversarial)
            # results come encoded by the probe worker: no per-image encoding on the event loop
            results = await batcher.submit(runtime, job, len(images), deadline)
            return pb.ProbeResponse(model=runtime.name, version=runtime.version, results=results)
        except Exception as err:
            if not isinstance(err, errors.DeadlineExpired):  # the runner counts the ones it stopped
                self.metrics.probes.labels(model if model in self.repo.names() else "unknown", kind,
                                           errors.status_for(err).name.lower()).inc()
            await errors.abort(context, err, "Probe")

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        try:
            offset, size = validation.page(request.page_size, request.page_token)
            names = self.repo.names()
            end = len(names) if size == 0 else min(len(names), offset + size)
            models = [encoding.model(self.repo.resolve(n), self.repo.versions(n)) for n in names[offset:end]]
            return pb.ListModelsResponse(models=models, next_page_token=str(end) if end < len(names) else "")
        except Exception as err:
            await errors.abort(context, err, "ListModels")

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.Model:
        try:
            runtime = self.repo.resolve(*validation.get_model_ref(request.name, request.model, request.version))
            return encoding.model(runtime, self.repo.versions(runtime.name))
        except Exception as err:
            await errors.abort(context, err, "GetModel")


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
