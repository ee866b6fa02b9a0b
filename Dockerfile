# The feedback-predictor image: `fbp worker`, `fbp trainer`, `fbp replay`, ...
# (docker-compose.yml runs each as a service).
#
# Build arguments (docker build --build-arg NAME=VALUE):
#   BASE_IMAGE       any Debian-like image with Python 3.11 and its venv module
#                    (default python:3.11-slim; the Docker test uses a local
#                    debootstrap image, tests/docker/base-image.sh)
#   TORCH_INDEX_URL  where torch comes from.  Default: PyTorch's CPU-only wheels
#                    (~200 MB).  For NVIDIA GPUs use a CUDA index, e.g.
#                    https://download.pytorch.org/whl/cu126, or PyPI itself
#                    (https://pypi.org/simple: CUDA wheels, ~4 GB with the
#                    nvidia-* libraries), and run with `docker run --gpus all`
#                    (NVIDIA Container Toolkit) and FBP_TRAINER__DEVICE=cuda.
#   TORCH_SPEC       the torch requirement (default torch>=2.2)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch>=2.2"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NUMBA_CACHE_DIR=/tmp/numba \
    FBP_DATA_CACHE=/opt/fbp/data \
    FBP_WORKER__CHECKPOINT=/opt/fbp/runs/bootstrap/model

WORKDIR /opt/fbp

# Layers from the least to the most often changed, so an edit to the code
# rebuilds only the last, small ones.
# 1. A venv (the base's Python may be Debian's, which refuses system-wide pip).
RUN python3 -m venv /opt/venv \
 && useradd --create-home --uid 10001 fbp

# 2. torch alone: by far the biggest dependency; changes only with TORCH_*.
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"

# 3. The other third-party dependencies, read from pyproject.toml.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if not d.startswith('torch')))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 4. MovieLens-100K, baked in so replay and training need no network (the
#    loader and what it imports; tests/test_compose.py checks that is all).
COPY fbp_errors ./fbp_errors
COPY core/__init__.py core/datasets.py ./core/
RUN python -c "from core.datasets import load_dataset; load_dataset('ml-100k')" \
 && rm -rf core fbp_errors

# 5. The project itself (every package pyproject.toml lists).
COPY README.md ./
COPY fbp_errors ./fbp_errors
COPY core ./core
COPY stack ./stack
COPY models ./models
COPY stream ./stream
COPY trainer ./trainer
COPY bench ./bench
COPY fbp ./fbp
RUN pip install --no-deps . \
 && rm -rf build *.egg-info \
 && mkdir -p /opt/fbp/runs \
 && chown -R fbp /opt/fbp

# Local state (the worker's Faust tables) beside the code, not in site-packages.
ENV FBP_STACK__DATA_DIR=/opt/fbp/state
USER fbp
EXPOSE 6066 6068
# GET /health on the web port of the process this container runs: the
# worker's by default, FBP_HEALTH_PORT for the trainer (6068).
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=5 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('FBP_HEALTH_PORT', '6066'), timeout=4)"
ENTRYPOINT ["fbp"]
CMD ["--help"]
