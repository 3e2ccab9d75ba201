# The kit's image: PyTorch with CUDA, a C/C++ compiler for torch.compile, the packages of requirements.txt, an offline
# GPT-2 vocabulary. The repository is mounted at /workspace at run time (train.sh, generate.sh); a copy of it is baked
# in for use without the mount. Build with ./build.sh, which picks BASE_IMAGE (a local cvlization-torch-gpu image,
# else this pinned one) and the builder: the RUN --mount=type=secret options need BuildKit (build.sh hands the legacy
# builder this file without them). The secrets (build.sh --ca-bundle, PIP_INDEX_URL, PIP_EXTRA_INDEX_URL) are mounted
# for one step at a time and are in no layer.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# TIKTOKEN_CACHE_DIR is a cache path, not a secret (DL3064 matches the word TOKEN)
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TIKTOKEN_CACHE_DIR=/opt/tiktoken-cache

WORKDIR /workspace

COPY lib/image_setup.sh /usr/local/bin/kit-image-setup

# torch.compile needs a C compiler (Triton), a C++ compiler (inductor on the CPU) and Python's headers; whatever the
# base lacks of them is installed, then a tiny compile on the CPU proves it
RUN --mount=type=secret,id=ca_bundle kit-image-setup compilers

# torch comes with the base image
COPY requirements.txt requirements-vocab.txt /tmp/
RUN --mount=type=secret,id=ca_bundle --mount=type=secret,id=pip_index_url --mount=type=secret,id=pip_extra_index_url \
    kit-image-setup pip /tmp/requirements.txt

# tiktoken's own gpt2 files, when the build has network; the whisper copy above serves when it has not
RUN --mount=type=secret,id=ca_bundle kit-image-setup tiktoken

COPY . /workspace
