# The slim ursa server: ONNX Runtime + numpy + Pillow + Starlette/uvicorn, no torch or timm (docs/deploy.md).
#   ursa export runs/bears/model.safetensors --onnx          # on the training machine (`pip install '.[train]'`)
#   docker build -t ursa-serve .
#   docker run -p 8000:8000 -v $PWD/runs/bears/model.onnx:/model/model.onnx:ro ursa-serve
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# Dependencies first (their own layer, cached while only the source changes); the same set as `pip install .`.
COPY requirements-serve.txt ./
RUN pip install -r requirements-serve.txt
COPY pyproject.toml README.md ./
COPY ursa ./ursa
# The base install is the slim one; fail the build if torch came along or the serve path needs it.
RUN pip install . && python -c "import ursa.apps.serve, ursa.inference.runtime, ursa.cli" \
    && ! python -c "import torch" 2>/dev/null
RUN useradd --create-home ursa
USER ursa
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"
CMD ["ursa", "serve", "/model/model.onnx", "--host", "0.0.0.0", "--port", "8000"]
