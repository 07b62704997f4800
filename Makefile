# Palette. Everything runs from the virtual environment at .venv, made from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 50051
HTTP_PORT ?= 8080
PROMPT ?= a purple ring
OUT    ?= out
REF    ?= tests/reference

.PHONY: setup demo serve test conformance proto web web-deps rayservice train-default eval bench clean

# The environment is rebuilt when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[server,ray,dev]'
	touch $@

setup: $(VENV)/.installed

# The Node.js example's packages (its test runs it), from the committed lock file. `make test` installs them
# and the web page's when npm is here; without Node.js those tests skip.
NODE_EXAMPLE := examples/node/node_modules/.package-lock.json
$(NODE_EXAMPLE): examples/node/package-lock.json
	cd examples/node && npm ci --no-audit --no-fund

# Start the server on the embedded default model set, generate ranked images for PROMPT into OUT, stop.
demo: setup
	@$(BIN)/palette serve --port $(PORT) --no-metrics --log-format text > $(OUT).server.log 2>&1 & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; wait $$pid 2>/dev/null' EXIT; \
	for i in $$(seq 1 180); do \
	  $(BIN)/palette --server 127.0.0.1:$(PORT) --timeout 2 info > /dev/null 2>&1 && break; \
	  kill -0 $$pid 2>/dev/null || { cat $(OUT).server.log; exit 1; }; sleep 1; \
	done; \
	$(BIN)/palette --server 127.0.0.1:$(PORT) generate "$(PROMPT)" -n 8 --rank --seed 1 --out $(OUT)

serve: setup
	$(BIN)/palette serve --port $(PORT) --http-port $(HTTP_PORT)

test: setup $(if $(shell command -v npm),$(NODE_EXAMPLE) web-deps)
	$(BIN)/python -m pytest -q

# The conformance suite alone, against another reference folder of the same format.
conformance: setup
	PALETTE_REFERENCE_DIR=$(abspath $(REF)) $(BIN)/python -m pytest -q tests/test_conformance.py

# Regenerate the committed gRPC and Connect code from protos/ (tests check it is current).
proto: setup
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos \
	  --plugin=protoc-gen-connectrpc=$(BIN)/protoc-gen-connectrpc --connectrpc_out=protos \
	  --connectrpc_opt=protobuf=google protos/palette/v1/palette.proto

# The web page (server/web, shipped in the package) from web/: the TypeScript client generated from protos/,
# a type check and one esbuild bundle. The committed files must be what this makes (tests/test_web.py).
WEB_DEPS := web/node_modules/.package-lock.json
$(WEB_DEPS): web/package-lock.json
	cd web && npm ci --no-audit --no-fund
	touch $@

web-deps: $(WEB_DEPS)

web: setup web-deps
	cd web && PYTHON=$(abspath $(BIN)/python) node build.mjs

# Train the embedded default model set from scratch (about an hour on 2 CPU cores).
train-default: setup
	$(BIN)/python -m palette.training.cli train default --out models/default --minutes 56

eval: setup
	$(BIN)/python -m palette.training.cli eval --models models/default --grid $(OUT)/eval-grid.png

bench: setup
	$(BIN)/python bench/sampler.py
	$(BIN)/python bench/serve.py

clean:
	rm -rf $(VENV) $(OUT) $(OUT).server.log .pytest_cache

# Regenerate the KubeRay manifest from deploy/serve_config.yaml (tests check it is current).
rayservice: setup
	$(BIN)/python deploy/gen_rayservice.py
