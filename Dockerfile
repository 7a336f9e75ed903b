# syntax=docker/dockerfile:1
# GPU image for megatron-autothink: NVIDIA's PyTorch container (CUDA, cuDNN, NCCL, torch,
# Transformer Engine and apex, built together) plus megatron-core, vLLM, megatron-energon and this
# package, all pinned. Build, convert and run commands: docs/launch.md, "Container image".
#
#   docker build -t megatron-autothink:0.1.0 .
#
# vLLM is compiled against the container's torch (vLLM's documented "use an existing PyTorch"
# build). A CUDA vLLM wheel from PyPI pins its own torch and would replace NVIDIA's, which breaks
# Transformer Engine and apex. The (base tag, vLLM version) pair is the knob to move together:
# 26.07 ships a torch 2.13 pre-release, the torch that vLLM 0.32 was released against.
# Not built on the development machines (no Docker there); checked with hadolint.

ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.07-py3

# ---- stage 1: a vLLM wheel built against the base image's torch -------------------------------
FROM ${BASE_IMAGE} AS vllm-wheel
ARG VLLM_VERSION=0.32.0
# 9.0 = Hopper (H100/H200); add 10.0 for Blackwell. Fewer architectures build much faster.
ARG TORCH_CUDA_ARCH_LIST="9.0"
ARG MAX_JOBS=16
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/src
RUN git clone --depth 1 --branch "v${VLLM_VERSION}" https://github.com/vllm-project/vllm.git
WORKDIR /opt/src/vllm
# use_existing_torch.py drops vLLM's torch pins; the build requirements moved to
# requirements/build/cuda.txt in recent releases (requirements/build.txt before).
RUN python use_existing_torch.py \
    && reqs=requirements/build/cuda.txt \
    && if [[ ! -f "${reqs}" ]]; then reqs=requirements/build.txt; fi \
    && pip install --no-cache-dir -r "${reqs}" \
    && TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS="${MAX_JOBS}" \
       pip wheel --no-cache-dir --no-build-isolation --no-deps --wheel-dir /wheels .

# ---- stage 2: the runtime image -----------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG VLLM_VERSION=0.32.0
ARG MEGATRON_CORE_VERSION=0.19.2
ARG ENERGON_VERSION=7.4.1
LABEL org.opencontainers.image.title="megatron-autothink" \
      org.opencontainers.image.description="megatron-core + vLLM training stack for auto-thinking VLMs" \
      org.opencontainers.image.version="0.1.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# vLLM (its own runtime requirements resolve around the container's torch), then the Python
# dependencies of this package at the versions tested on CPU (requirements/constraints-cpu.txt).
# NVIDIA's pip constraints (/etc/pip/constraint.txt, PIP_CONSTRAINT) keep the container's torch,
# numpy and friends: a conflict fails the build instead of replacing them.
COPY --from=vllm-wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir "/tmp/wheels/vllm-${VLLM_VERSION}"*.whl \
    && pip install --no-cache-dir \
        "megatron-core==${MEGATRON_CORE_VERSION}" \
        "megatron-energon[s3]==${ENERGON_VERSION}" \
        "webdataset==1.0.2" \
        "transformers==5.19.0" \
        "safetensors==0.8.0" \
        "math-verify==0.9.0" \
        "pydantic==2.13.4" \
        "rich==15.0.0" \
        "scikit-learn==1.9.1" \
        "psutil==7.2.2" \
        "tqdm==4.70.1" \
    && rm -rf /tmp/wheels

# This package without dependencies: they are installed above, and pyproject's "torch>=2.13" does
# not accept the container's pre-release build (2.13.0a0+...), so pip would fetch another torch.
WORKDIR /opt/megatron-autothink
COPY pyproject.toml README.md ./
COPY megatron_autothink ./megatron_autothink
COPY recipes ./recipes
COPY launch ./launch
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import importlib.util as u, megatron.core, megatron.energon, vllm, megatron_autothink.cli; \
assert u.find_spec('transformer_engine') and u.find_spec('apex'), 'TE/apex missing from the base'; \
print('megatron-core', megatron.core.__version__, '| vllm', vllm.__version__)"

WORKDIR /workspace
