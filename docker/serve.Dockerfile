# The ranking API without torch: ONNX Runtime, FastAPI, FAISS, polars, tokenizers (pinned in
# docker/requirements-serve.txt).
#   docker build -f docker/serve.Dockerfile -t recsys-serve .
#   docker run -p 8000:8000 -v $PWD/artifacts/serve:/models:ro -e RECSYS_API_KEY=change-me recsys-serve
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY docker/requirements-serve.txt /tmp/requirements-serve.txt
RUN pip install -r /tmp/requirements-serve.txt
COPY pyproject.toml README.md ./
COPY recsys recsys
COPY serving serving
COPY pipelines pipelines
# --no-deps: the package's own requirements include torch; the serving runtime needs only the pinned list.
RUN pip install --no-deps . \
    && python -c "import sys, serving.app, serving.rescore, pipelines.cli; pipelines.cli.build_parser(); \
assert not {'torch', 'transformers', 'lightning'} & set(sys.modules)"
RUN useradd --create-home --uid 10001 recsys
USER recsys
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s \
    CMD python -c "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz').status == 200 else 1)"
ENTRYPOINT ["recsys", "serve", "/models", "--host", "0.0.0.0", "--port", "8000"]
# more `recsys serve` options after the image name: docker run ... recsys-serve --workers 2 --max-in-flight 32
