# Training, evaluation, export and batch jobs (CPU torch 2.13; add the gpu extra on a CUDA base image).
#   docker build -f docker/train.Dockerfile -t recsys-train .
#   docker run -v $PWD/artifacts:/work/artifacts -v recsys-cache:/home/recsys/.cache/recsys recsys-train recsys quickstart
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /work
COPY pyproject.toml README.md ./
COPY recsys recsys
COPY serving serving
COPY pipelines pipelines
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu && pip install .
RUN useradd --create-home --uid 10001 recsys && chown recsys /work
USER recsys
HEALTHCHECK NONE
ENTRYPOINT []
CMD ["recsys", "--help"]
