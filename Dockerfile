# wyoming_kyutai server image. CPU by default:
#   docker build -t wyoming-kyutai .
# CUDA (torch's CUDA wheels carry the CUDA libraries; the host needs the NVIDIA
# Container Toolkit and `docker run --gpus all`):
#   docker build -t wyoming-kyutai:cuda \
#     --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" .
# BASE may be any image with Python >= 3.11 as python3 (with venv) and a glibc.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# The CPU build of torch (PyPI's default torch on amd64 is the multi-GB CUDA build).
ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1

RUN useradd --system --uid 10300 --user-group --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin kyutai \
    && mkdir -p /data /app \
    && chown kyutai:kyutai /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY script/ script/
COPY wyoming_kyutai/ wyoming_kyutai/
COPY config/ config/
# The same install steps as CI (script/setup), runtime only, into /app/.venv.
RUN VENV=/app/.venv PYTHON=python3 TORCH_SPEC="${TORCH_SPEC}" script/setup --no-dev

# Models are downloaded into the volume on first start (~2 GB for the default model).
ENV WYOMING_KYUTAI_DATA_DIR=/data \
    HF_HOME=/data/hf \
    PATH=/app/.venv/bin:${PATH}
VOLUME /data
USER kyutai
EXPOSE 10300

# Healthy once the model is loaded and the server answers describe; the first start
# may download the model for a long while, hence the long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["/app/.venv/bin/wyoming-kyutai-health", "--uri", "tcp://127.0.0.1:10300", "--timeout", "5"]

# Configure with WYOMING_KYUTAI_<SETTING> environment variables (e.g.
# -e WYOMING_KYUTAI_SLOTS=8) or with extra flags after the image name (--slots 8).
ENTRYPOINT ["/app/.venv/bin/wyoming-kyutai", "--uri", "tcp://0.0.0.0:10300", "--config", "/app/config/default.yaml"]
CMD []
