# The ranking API without torch: ONNX Runtime, FastAPI, FAISS, polars, tokenizers.
#   docker build -f docker/serve.Dockerfile -t recsys-serve .
#   docker run -p 8000:8000 -v $PWD/artifacts/serve:/models:ro recsys-serve
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY recsys recsys
COPY serving serving
COPY pipelines pipelines
# --no-deps: the package's own requirements include torch; the serving runtime needs only these.
RUN pip install "onnxruntime>=1.18" "fastapi>=0.110" "uvicorn>=0.29" "uvloop>=0.19" "httptools>=0.6" "polars>=1.0" "numpy" "faiss-cpu>=1.8" \
        "tokenizers>=0.19" "pyyaml" "pydantic>=2" "tqdm" "prometheus-client>=0.20" "jinja2>=3.1" \
    && pip install --no-deps . \
    && python -c "import sys, serving.app, serving.rescore; assert 'torch' not in sys.modules"
RUN useradd --create-home --uid 10001 recsys
USER recsys
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s \
    CMD python -c "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz').status == 200 else 1)"
ENV RECSYS_SERVE_DIR=/models RECSYS_SERVE_SETTINGS={}
CMD ["uvicorn", "--factory", "serving.app:app_from_env", "--host", "0.0.0.0", "--port", "8000"]
