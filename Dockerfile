# The feedback-predictor image: `fbp worker`, `fbp trainer`, `fbp replay`, ...
# (docker-compose.yml runs each as a service).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FBP_DATA_CACHE=/opt/fbp/data \
    FBP_WORKER__CHECKPOINT=/opt/fbp/runs/bootstrap/model

WORKDIR /opt/fbp

# CPU-only torch first, in its own layer: it is by far the biggest dependency
# and rarely changes.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.2"

COPY pyproject.toml README.md* ./
COPY fbp ./fbp
COPY stream ./stream
COPY models ./models
COPY trainer ./trainer
COPY bench ./bench
RUN pip install . \
 # Bake MovieLens-100K into the image so replay/training need no network.
 && python -c "from core.datasets import load_dataset; load_dataset('ml-100k')" \
 && useradd --create-home --uid 10001 fbp \
 && mkdir -p /opt/fbp/runs \
 && chown -R fbp /opt/fbp

USER fbp
EXPOSE 6066 6068
ENTRYPOINT ["fbp"]
CMD ["--help"]
