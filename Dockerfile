# The pipeline worker image. docker-compose.yml builds it for the `worker` and
# `demo` services; on its own:
#   docker build -t eos-pipeline .
#   docker run --rm -e PIPELINE_BROKER=kafka://HOST:9092 -p 127.0.0.1:6066:6066 \
#     -e PIPELINE_WEB_HOST=0.0.0.0 eos-pipeline
FROM python:3.11-slim

# No compiler or -dev packages. On x86_64 every compiled dependency (rocksdict,
# aiokafka, orjson, faust-streaming, pydantic-core, aiohttp, ...) is a manylinux
# wheel for CPython 3.11, and this Debian base's glibc is new enough for them
# (rocksdict's are manylinux_2_28). On aarch64 all but faust-streaming are wheels;
# its sdist then falls back to pure Python when no C compiler is found, which works
# but is slower: add `apt-get install build-essential` before the pip install to
# get its Cython speedups there.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# Only what the package is built from, so edits to tests or scripts do not
# invalidate the install layer. README.md is pyproject.toml's readme (the package
# description); the glob keeps the build working in a checkout without it.
COPY pyproject.toml README.md* ./
COPY pipeline ./pipeline
# A regular (not editable) install: the image runs the installed package, and
# /src is only the build input.
RUN pip install . && rm -rf build *.egg-info

# A fixed numeric uid so a bind-mounted data directory can be chowned to match.
# /data is created here, owned by that user, because a fresh named volume mounted
# on it copies this ownership; otherwise it would be root's and RocksDB could not
# write its table stores there.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/app app \
    && mkdir -p /data \
    && chown app:app /data
USER app
# Run from a directory without the sources, so `pipeline` is always imported from
# site-packages, never from the build copy in /src.
WORKDIR /home/app

ENV PIPELINE_DATADIR=/data
VOLUME ["/data"]
# Faust's web server (its own views plus the pipeline's /stats). It binds to
# PIPELINE_WEB_HOST, which defaults to 127.0.0.1: set PIPELINE_WEB_HOST=0.0.0.0
# to reach it from outside the container (docker-compose.yml does).
EXPOSE 6066

CMD ["faust", "-A", "pipeline.app", "worker", "-l", "info"]
