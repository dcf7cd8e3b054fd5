# The dashboard as a team server. Build: docker compose build; run: docker compose up -d
# (see docker-compose.yml and the README's "Team server" section).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/influence

# Fashion-MNIST (Debian's package, 30 MB of IDX files under /usr/share/datasets/fashion-mnist):
# the demo run's photographs, and `--data fashion-mnist` for runs of one's own.
RUN apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

# PyTorch's CPU wheel first (a GPU image would start from a CUDA torch instead): the project
# itself asks only torch>=2.4, which this satisfies without pulling a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY engine engine
COPY app app
COPY templates templates
COPY static static
RUN pip install -e . && useradd --create-home --uid 1000 influence && mkdir -p /data \
    && chown influence /data

USER influence
ENV INFLUENCE_RUN=/data/runs/demo \
    INFLUENCE_DATABASE_URL=sqlite:////data/audits.sqlite3 \
    INFLUENCE_HOST=0.0.0.0 \
    INFLUENCE_PORT=8000
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/v1/health', timeout=4)"
# On first start, when no run is there yet, build the demo run (app/demo.py: a cnn on a
# Fashion-MNIST subset, about a minute on two cores; a run already there is never touched), then serve.
CMD ["sh", "-c", "test -f \"$INFLUENCE_RUN/run.json\" || python -m app.demo \"$INFLUENCE_RUN\" --quiet || exit 1; exec influence serve --run \"$INFLUENCE_RUN\" --host \"$INFLUENCE_HOST\" --port \"$INFLUENCE_PORT\""]
