# The kit's image: PyTorch with CUDA, the packages of requirements.txt, an offline GPT-2 vocabulary. The repository
# is mounted at /workspace at run time (train.sh, generate.sh); a copy of it is baked in for use without the mount.
# Build with ./build.sh, which picks BASE_IMAGE (a local cvlization-torch-gpu image, else this pinned one).
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# TIKTOKEN_CACHE_DIR is a cache path, not a secret (DL3064 matches the word TOKEN)
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TIKTOKEN_CACHE_DIR=/opt/tiktoken-cache

WORKDIR /workspace

COPY requirements.txt /tmp/requirements.txt
# torch comes with the base image; openai-whisper only for its copy of the GPT-2 vocabulary, without its dependencies
RUN python -c "import torch" \
    && python -m pip install --no-cache-dir -r /tmp/requirements.txt \
    && python -m pip install --no-cache-dir --no-deps openai-whisper==20250625

# tiktoken's own gpt2 files, when the build has network; the whisper copy above serves when it has not
RUN mkdir -p "${TIKTOKEN_CACHE_DIR}" \
    && (python -c "import tiktoken; tiktoken.get_encoding('gpt2')" \
        || echo "tiktoken gpt2 not cached (no network); the offline vocabulary from openai-whisper is used") \
    && chmod -R a+rwX "${TIKTOKEN_CACHE_DIR}"

COPY . /workspace
