# sanet-viz: the Gradio lab (ResNet50 vs SANet50) in one image, for CPU and NVIDIA GPU hosts.
#   docker build -t sanet-viz .
#   docker run --rm -p 7860:7860 -v "$PWD/weights:/app/weights:ro" sanet-viz
# See docs/docker.md. Building needs no weights; without any the app starts untrained, with a banner.

# Base image; any Debian-based image with Python 3.11+ and `python` on PATH will do.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="sanet-viz" \
      org.opencontainers.image.description="Interpretability lab for Shuffle Attention (SA-Net): Grad-CAM, group probes and SA gates vs ResNet50"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A numeric non-root user, and the only folders it may write to: weights (URL downloads land there),
# caches (Hugging Face, torch hub). Group 0 may write too, for hosts that run an arbitrary uid.
RUN groupadd --gid 10001 sanet \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/sanet --shell /usr/sbin/nologin sanet \
    && mkdir -p /app/weights /app/.cache \
    && chown -R 10001:0 /app/weights /app/.cache /home/sanet \
    && chmod -R g=u /app/weights /app/.cache /home/sanet \
    && python -m venv "$VIRTUAL_ENV"

WORKDIR /app

# Dependencies first (this layer is reused while requirements.txt is unchanged); torch and
# torchvision are pinned there. All are wheels but grad-cam, a pure-Python sdist that pip turns into
# a wheel: no compiler is needed, so none is installed and the image needs no build stage.
COPY requirements.txt ./
# Another index for torch/torchvision only, e.g. https://download.pytorch.org/whl/cpu for a much
# smaller CPU-only image. Empty (the default): PyPI's wheels, which run on CPU and NVIDIA GPUs.
ARG TORCH_INDEX_URL=""
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        grep -E '^(torch|torchvision)==' requirements.txt > /tmp/torch-pins.txt \
        && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" -r /tmp/torch-pins.txt \
        && rm /tmp/torch-pins.txt; \
    fi \
    && pip install --no-cache-dir -r requirements.txt \
    && python -c "import torch, torchvision, gradio, pytorch_grad_cam; print('torch', torch.__version__)"

# The code (root-owned: the app cannot modify itself). .dockerignore keeps the context to what runs.
COPY app.py ./
COPY sanet_viz/ ./sanet_viz/
COPY examples/ ./examples/

ENV SANET_VIZ_HOST=0.0.0.0 \
    SANET_VIZ_WEIGHTS_DIR=/app/weights \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_TEMP_DIR=/tmp/gradio \
    HF_HOME=/app/.cache/huggingface \
    TORCH_HOME=/app/.cache/torch \
    XDG_CACHE_HOME=/app/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/home/sanet

USER 10001:10001
VOLUME ["/app/weights"]
EXPOSE 7860

# Asks the app itself for its Gradio config, on the port and root path it was given through the
# environment (SANET_VIZ_PORT or PORT; SANET_VIZ_ROOT_PATH or GRADIO_ROOT_PATH, a path or a URL).
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.parse as p, urllib.request as r; e = os.environ.get; port = e('SANET_VIZ_PORT') or e('PORT') or '7860'; root = p.urlparse(e('SANET_VIZ_ROOT_PATH') or e('GRADIO_ROOT_PATH') or '').path.rstrip('/'); r.urlopen(f'http://127.0.0.1:{port}{root}/config', timeout=8).close()"]

# Exec form: python is PID 1 and gets SIGTERM itself; app.py stops the server gracefully on it.
STOPSIGNAL SIGTERM
CMD ["python", "app.py"]
