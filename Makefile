# ConceptLens: the two commands a new user runs are `make serve` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 9090
MODELS ?= models
PROTO := proto/conceptlens/v1/conceptlens_service.proto
STUBS := clients/python/conceptlens_client/v1/conceptlens_service_pb2.py
OIP_PROTO := proto/kserve/v2/grpc_predict_v2.proto
OIP_STUBS := clients/python/conceptlens_client/kserve/v2/grpc_predict_v2_pb2.py

.PHONY: test test-fast serve proto lint default-model clean-venv

# The environment is made once and remade only when the requirements change.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(MAKE) proto
	$(BIN)/pip install -q --no-deps --no-build-isolation -e clients/python
	touch $(STAMP)

# gRPC stubs generated from the proto into the client package (git-ignored, never edited). The virtual path
# makes generated imports read `conceptlens_client.v1...`; wire names stay `conceptlens.v1.*`.
$(STUBS): $(PROTO) | $(STAMP)
	$(MAKE) proto

$(OIP_STUBS): $(OIP_PROTO) | $(STAMP)
	$(MAKE) proto

proto:
	mkdir -p clients/python/conceptlens_client/v1
	$(BIN)/python -m grpc_tools.protoc -Iconceptlens_client/v1=proto/conceptlens/v1 \
		--python_out=clients/python --grpc_python_out=clients/python --pyi_out=clients/python \
		conceptlens_client/v1/conceptlens_service.proto
	touch clients/python/conceptlens_client/v1/__init__.py
	# The Open Inference Protocol (KServe v2, package `inference`) that server/oip.py serves beside conceptlens.v1.
	mkdir -p clients/python/conceptlens_client/kserve/v2
	$(BIN)/python -m grpc_tools.protoc -Iconceptlens_client/kserve/v2=proto/kserve/v2 \
		--python_out=clients/python --grpc_python_out=clients/python --pyi_out=clients/python \
		conceptlens_client/kserve/v2/grpc_predict_v2.proto
	touch clients/python/conceptlens_client/kserve/__init__.py clients/python/conceptlens_client/kserve/v2/__init__.py

# The service on the default model repository (models/<name>/<version>/), on this machine only (plaintext, no
# token): `make serve HOST=0.0.0.0` exposes it, metrics port included.
serve: $(STUBS) $(OIP_STUBS)
	$(BIN)/conceptlens serve --models $(MODELS) --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

test: $(STUBS) $(OIP_STUBS)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The inner loop: everything but the tests marked `slow` (the costliest, by a per-test CPU-time run). `make test` stays
# the whole suite, and is what CI runs.
test-fast: $(STUBS) $(OIP_STUBS)
	$(BIN)/python -m pytest -q -m "not slow"

# Rebuild the embedded default bundle models/shapes/1 from scratch (about 15 min of training on 2 CPU cores):
# consistent-loss training, Network Dissection on 1000 held-out ShapesWorld images (+ adversarial versions), export.
DEFAULT_RUN := runs/default
default-model: $(STAMP)
	$(BIN)/conceptlens train --config configs/shapes_consistent.toml --out $(DEFAULT_RUN)
	$(BIN)/conceptlens dissect --model $(DEFAULT_RUN) --data shapes:1000:7 --adversarial --out $(DEFAULT_RUN)/dissect
	$(BIN)/conceptlens export --run $(DEFAULT_RUN) --dissection $(DEFAULT_RUN)/dissect --out $(MODELS)/shapes/1 --overwrite

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
