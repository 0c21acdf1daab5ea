"""Run the federation on Flower's deployment engine: a SuperLink and N SuperNodes as real
processes on 127.0.0.1, the app submitted with ``flwr run``, as docker-compose.yml does with
containers.

    python -m experiments.deploy                                  # 3 SuperNodes, R-GAP, 2 rounds
    python -m experiments.deploy --clients 4 --attack dlg --observers server,client
    python -m experiments.deploy --kill-node 2 --kill-node-after-round 1   # fault injection
    python -m experiments.deploy --tls                            # certificates from scripts/gen_certs.sh
    python -m experiments.deploy --superlink superlink:9093 ...   # submit to a running SuperLink only

What it does: picks free ports (or ``--port``), starts ``flower-superlink`` (subprocess
isolation: it starts the ServerApp itself) and one ``flower-supernode`` per client with its own
``partition-id`` / ``num-partitions``, waits until every SuperNode is online, writes a private
``FLWR_HOME/config.toml`` whose connection points at that SuperLink (the user's own Flower
config is never touched), submits the app in this repository with ``flwr run``, and polls
``flwr ls --run-id ID --format json`` until the run's status is ``finished:*`` (``--stream``'s
exit code is not trusted). The run folder (``--out``) gets what the ServerApp writes
(rounds.csv, results.csv, missing.csv, figures, summary.md), the processes' logs under
``logs/`` and ``deploy.json`` (run id, final status, wall time, ports, fault). Every process
started here is stopped at the end: on success, on error, on timeout and on Ctrl-C (SIGTERM,
then SIGKILL after a bounded wait), including the SuperExec and app processes Flower spawns.

Flower 1.42 serves the Fleet, Control and ServerApp runtime APIs over one HTTP port of the
SuperLink (``--host`` / ``--port``); SuperNodes and the CLI both use it.

Exit codes: 0 the run finished and completed; 1 it failed, was stopped or timed out, or a
process died; 2 bad flags (one line on stderr); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any

# The Flower app to submit: this repository (pyproject.toml with [tool.flwr.app]); when the
# package is installed elsewhere (a container's site-packages), the working directory.
ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "pyproject.toml").exists():
    ROOT = Path.cwd()
ATTACK_CHOICES = ("rgap", "dlg", "idlg", "ig", "none")
OBSERVER_CHOICES = ("server", "client")
CONNECTION = "deploy"  # the connection name in the private FLWR_HOME/config.toml
QUIET_ENV = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0"}  # no network calls


class DeployError(RuntimeError):
    """A failure reported as one line; exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m experiments.deploy",
        description="Start a SuperLink and N SuperNodes on 127.0.0.1, run the spying app with flwr run, "
                    "wait for it, collect the run folder, stop everything.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--clients", type=_positive(int), default=3, help="SuperNodes (one partition each)")
    p.add_argument("--rounds", type=_positive(int), default=2, help="server rounds")
    p.add_argument("--attack", default="rgap", help=f"comma list of {', '.join(ATTACK_CHOICES)}")
    p.add_argument("--observers", default="server,client", help="comma list of server, client")
    p.add_argument("--attack-rounds", default="1", help="rounds to attack: comma list or 'all'")
    p.add_argument("--mode", choices=("fedsgd", "fedavg"), default=None,
                   help="training mode (default: fedsgd with an attack, else the app's default)")
    p.add_argument("--batch-size", type=_positive(int), default=None,
                   help="batch size (default: 1 with an attack, else the app's default)")
    p.add_argument("--min-clients", type=_positive(int), default=None,
                   help="replies a round needs (default: all clients; clients-1 with --kill-node)")
    p.add_argument("--round-timeout", type=_positive(float), default=None,
                   help="seconds a round waits for replies (default: the app's; 60 with --kill-node)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/deploy-<date>-<time>)")
    p.add_argument("--timeout", type=_positive(float), default=900.0,
                   help="seconds for the whole run; then it is stopped and this exits 1")
    p.add_argument("--kill-node", type=int, default=None, metavar="I",
                   help="fault injection: SIGKILL the SuperNode of partition I ...")
    p.add_argument("--kill-node-after-round", type=int, default=None, metavar="R",
                   help="... as soon as round R has ended (its row is in rounds.csv)")
    p.add_argument("--tls", action="store_true", help="TLS between SuperLink, SuperNodes and the CLI")
    p.add_argument("--certs", type=Path, default=None,
                   help="with --tls: folder with ca.crt, server.pem, server.key (default: made by "
                        "scripts/gen_certs.sh in a temporary folder)")
    p.add_argument("--port", type=int, default=None, help="SuperLink HTTP port (default: a free one)")
    p.add_argument("--superlink", type=_address, default=None, metavar="HOST:PORT",
                   help="submit to this running SuperLink instead of starting one (the compose submit job)")
    p.add_argument("--run-config", action="append", default=[], metavar="'K=V ...'",
                   help="more run-config overrides, Flower syntax, e.g. --run-config 'seed=1 dataset=\"mnist5k\"'")
    p.add_argument("--poll", type=_positive(float), default=2.0, help="seconds between status polls")
    return p


def _app_config_keys() -> dict[str, Any]:
    import tomllib

    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Check the flags (parser.error on a bad one) and return the run-config overrides."""
    from flwr.common.config import parse_config_args

    attacks = [a.strip() for a in args.attack.split(",") if a.strip()]
    bad = [a for a in attacks if a not in ATTACK_CHOICES]
    if bad or not attacks or ("none" in attacks and len(attacks) > 1):
        parser.error(f"--attack: {bad[0] if bad else args.attack!r} is not one of {', '.join(ATTACK_CHOICES)} (comma list)")
    observers = [o.strip() for o in args.observers.split(",") if o.strip()]
    bad = [o for o in observers if o not in OBSERVER_CHOICES]
    if bad or not observers:
        parser.error(f"--observers: {bad[0] if bad else args.observers!r} is not one of {', '.join(OBSERVER_CHOICES)}"
                     " (secagg runs only under python -m experiments.run)")
    if args.attack_rounds != "all":
        try:
            rounds = [int(r) for r in args.attack_rounds.split(",") if r.strip()]
        except ValueError:
            parser.error(f"--attack-rounds: expected a comma list of rounds or 'all', got {args.attack_rounds!r}")
        if not rounds or any(r < 1 or r > args.rounds for r in rounds):
            parser.error(f"--attack-rounds: rounds must lie in 1..{args.rounds}, got {args.attack_rounds!r}")
    attacked = attacks != ["none"]
    mode = args.mode or ("fedsgd" if attacked else None)
    if attacked and mode != "fedsgd":
        parser.error("--mode fedavg: attacks run on FedSGD updates; use --mode fedsgd or --attack none")
    if (args.kill_node is None) != (args.kill_node_after_round is None):
        parser.error("--kill-node and --kill-node-after-round go together")
    if args.kill_node is not None:
        if args.superlink:
            parser.error("--kill-node needs the SuperNodes started here, not --superlink")
        if args.clients < 2:
            parser.error("--kill-node needs --clients >= 2, so that someone is left")
        if not 0 <= args.kill_node < args.clients:
            parser.error(f"--kill-node: partition id must lie in 0..{args.clients - 1}, got {args.kill_node}")
        if not 0 <= args.kill_node_after_round < args.rounds:
            parser.error(f"--kill-node-after-round: must lie in 0..{args.rounds - 1} (a later round must follow), "
                         f"got {args.kill_node_after_round}")
    survivors = args.clients - (1 if args.kill_node is not None else 0)
    min_clients = args.min_clients or survivors
    if min_clients > survivors:
        parser.error(f"--min-clients {min_clients}: only {survivors} SuperNode(s) will be left to reply")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port: not a port: {args.port}")
    if args.certs is not None and not args.tls:
        parser.error("--certs goes with --tls")
    if args.certs is not None:
        needed = ("ca.crt",) if args.superlink else ("ca.crt", "server.pem", "server.key")
        missing = [n for n in needed if not (args.certs / n).is_file()]
        if missing:
            parser.error(f"--certs {args.certs}: missing {', '.join(missing)} (make them with scripts/gen_certs.sh)")

    known = _app_config_keys()
    extra: dict[str, Any] = {}
    try:
        extra = parse_config_args(args.run_config) if args.run_config else {}
    except Exception as exc:  # noqa: BLE001 - Flower's parser raises several kinds
        parser.error(f"--run-config: cannot parse: {exc}".splitlines()[0])
    unknown = sorted(set(extra) - set(known))
    if unknown:
        parser.error(f"--run-config: unknown key {unknown[0]!r}: the keys are those of [tool.flwr.app.config]")

    out = (args.out or ROOT / "runs" / f"deploy-{datetime.now():%Y%m%d-%H%M%S}").expanduser().absolute()
    config: dict[str, Any] = {
        "num-clients": args.clients,
        "num-server-rounds": args.rounds,
        "min-clients": min_clients,
        "attack": ",".join(attacks),
        "observers": ",".join(observers),
        "attack-rounds": args.attack_rounds,
        "out-dir": str(out),
    }
    if mode:
        config["mode"] = mode
    if args.batch_size or attacked:
        config["batch-size"] = args.batch_size or 1
    timeout = args.round_timeout or (60.0 if args.kill_node is not None else None)
    if timeout:
        config["round-timeout"] = float(timeout)
    clash = sorted(set(extra) & set(config))
    if clash:
        parser.error(f"--run-config: {clash[0]!r} has its own flag here")
    config.update(extra)
    for key, value in config.items():  # the app's own check of types and values, before starting anything
        if type(value) is not type(known[key]) and not (isinstance(known[key], float) and isinstance(value, int)):
            parser.error(f"{key}: expected {type(known[key]).__name__}, got {value!r}")
    try:
        from fl_sim.config import RunConfig

        RunConfig.from_mapping(config)
    except ValueError as exc:
        parser.error(str(exc))
    return config


# ---- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def _cli_bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found next to {sys.executable} or on PATH: install flwr")
    return found


class Topology:
    """The processes started here, and how to stop them all."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work = work
        self.env = env
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, list[str]] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        # Own session: a Ctrl-C in the terminal reaches this script only, which then stops
        # everything in order.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        self.commands[name] = cmd
        return proc

    def check_alive(self, names=None) -> None:
        for name in names or list(self.procs):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise DeployError(f"{name} exited with code {proc.returncode}: {self.tail(name)}")

    def tail(self, name: str, lines: int = 3) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return " | ".join(t.strip() for t in text[-lines:])[:400] or "(no output)"

    @staticmethod
    def _tree(pid: int) -> list:
        """The process, its descendants, and processes Flower detached from it (SuperExec is
        started in its own session with ``--parent-pid PID``), with theirs."""
        import psutil

        try:
            root = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return []
        found = {root.pid: root}
        for child in root.children(recursive=True):
            found[child.pid] = child
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info.get("cmdline") or []
            if "--parent-pid" in cmd and str(pid) in cmd[cmd.index("--parent-pid") + 1:cmd.index("--parent-pid") + 2]:
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        return list(found.values())

    def kill(self, name: str) -> None:
        """SIGKILL one process and everything it started (fault injection)."""
        import psutil

        proc = self.procs[name]
        tree = self._tree(proc.pid)
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=5)
        proc.wait(timeout=5)

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM everything (SuperNodes first), wait ``grace`` seconds, SIGKILL the rest."""
        import psutil

        names = [n for n in self.procs if n != "superlink"] + (["superlink"] if "superlink" in self.procs else [])
        tree = []
        for name in names:  # gather every tree before anything dies and gets re-parented
            tree += self._tree(self.procs[name].pid)
        for p in tree:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=grace)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_port(host: str, port: int, timeout: float, alive=lambda: None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive()
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise DeployError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


class Flwr:
    """The ``flwr`` CLI against the private FLWR_HOME's connection."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.bin = _cli_bin("flwr")
        self.env = env
        self.cwd = cwd

    def json(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        cmd = [self.bin, *args, "--format", "json"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=self.cwd, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeployError(f"`flwr {args[0]}` did not answer within {timeout:.0f}s") from None
        text = res.stdout
        try:
            data = json.loads(text[text.index("{"):])
        except ValueError:
            msg = (res.stderr.strip() or text.strip()).splitlines()
            raise DeployError(f"`flwr {' '.join(args[:2])}` failed: {msg[-1] if msg else f'exit {res.returncode}'}") from None
        if not data.get("success", False):
            raise DeployError(f"`flwr {args[0]}` failed: {data.get('error-message', data)}".splitlines()[0][:400])
        return data


def write_flwr_home(home: Path, address: str, ca: Path | None) -> None:
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    lines += [f"root-certificates = {json.dumps(str(ca))}"] if ca else ["insecure = true"]
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def make_certs(dest: Path) -> Path:
    script = ROOT / "scripts" / "gen_certs.sh"
    res = subprocess.run(["bash", str(script), str(dest)], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise DeployError(f"scripts/gen_certs.sh failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    return dest


def _say(text: str) -> None:
    print(f"[deploy {datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def _rounds_done(out: Path) -> int:
    path = out / "rounds.csv"
    if not path.exists():
        return -1
    rows = path.read_text().strip().splitlines()[1:]
    done = -1
    for row in rows:
        try:
            done = max(done, int(row.split(",")[0]))
        except ValueError:
            pass
    return done


def deploy(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    """Start (unless --superlink), submit, wait, collect. Returns the deploy record."""
    out = Path(config["out-dir"])
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fl-deploy-"))
    home = work / "flwr-home"
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(home),
           # The SuperLink starts `flower-superexec` by name: the venv's bin must be on PATH.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    topo = Topology(work, env)
    record: dict[str, Any] = {"out": str(out), "clients": args.clients, "rounds": args.rounds, "tls": args.tls,
                              "run_id": None, "status": None, "killed": None, "run_config": config}
    t0 = time.monotonic()
    run_id = None
    flwr = Flwr(env, ROOT)
    try:
        ca = None
        security_link = ["--insecure"]
        security_node = ["--insecure"]
        if args.tls:
            certs = args.certs.absolute() if args.certs else make_certs(work / "certs")
            ca = certs / "ca.crt"
            security_link = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(certs / "server.pem"),
                             "--ssl-keyfile", str(certs / "server.key")]
            security_node = ["--root-certificates", str(ca)]
        if args.superlink:
            address = args.superlink
            host, _, port = address.rpartition(":")
            _say(f"waiting for the SuperLink at {address}")
            wait_port(host, int(port), min(args.timeout, 300.0))
            write_flwr_home(home, address, ca)
        else:
            port = args.port or free_port()
            address = f"127.0.0.1:{port}"
            write_flwr_home(home, address, ca)  # the certificate's SANs include IP 127.0.0.1
            # Subprocess isolation: the SuperLink runs the ServerApp, each SuperNode its
            # ClientApps, as child processes of the same installed environment.
            topo.start("superlink", [_cli_bin("flower-superlink"), *security_link, "--isolation", "subprocess",
                                     "--host", "127.0.0.1", "--port", str(port),
                                     "--disable-runtime-dependency-installation"])
            wait_port("127.0.0.1", port, 60.0, alive=lambda: topo.check_alive(["superlink"]))
            record["superlink"] = address
            record["supernode_ports"] = []
            for i in range(args.clients):
                node_port = free_port()
                record["supernode_ports"].append(node_port)
                topo.start(f"supernode-{i}", [
                    _cli_bin("flower-supernode"), *security_node, "--superlink",
                    address, "--isolation", "subprocess",
                    "--host", "127.0.0.1", "--port", str(node_port),
                    "--node-config", f"partition-id={i} num-partitions={args.clients}",
                ])
            _say(f"SuperLink on {address}, {args.clients} SuperNodes starting")
        # Every SuperNode online before the run starts: with --kill-node, min-clients is
        # clients-1, and round 1 must not start without the node that is to die.
        wait_s = 90.0 if not args.superlink else min(args.timeout, 600.0)
        deadline = time.monotonic() + wait_s
        while True:
            topo.check_alive()
            nodes = flwr.json("supernode", "ls", CONNECTION).get("nodes", [])
            online = sum(n.get("status") == "online" for n in nodes)
            if online >= args.clients:
                break
            if time.monotonic() > deadline:
                raise DeployError(f"only {online} of {args.clients} SuperNodes came online within {wait_s:.0f}s")
            time.sleep(1.0)
        _say(f"{online} SuperNodes online")

        overrides = work / "run_config.toml"
        overrides.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items()))
        submitted = flwr.json("run", str(ROOT), CONNECTION, "--run-config", str(overrides), timeout=300.0)
        run_id = str(submitted["run-id"])
        record["run_id"] = run_id
        _say(f"run {run_id} submitted; results go to {out}")

        deadline = t0 + args.timeout
        status, last_round = "pending", -1
        while True:
            if not args.superlink:
                topo.check_alive(["superlink"] + [f"supernode-{i}" for i in range(args.clients) if i != args.kill_node
                                                  or record["killed"] is None])
            done = _rounds_done(out)
            if done > last_round:
                last_round = done
                if done >= 1:
                    _say(f"round {done}/{args.rounds} done")
            if args.kill_node is not None and record["killed"] is None and done >= args.kill_node_after_round:
                topo.kill(f"supernode-{args.kill_node}")
                record["killed"] = {"partition": args.kill_node, "after_round": args.kill_node_after_round,
                                    "at_s": round(time.monotonic() - t0, 1)}
                _say(f"killed the SuperNode of partition {args.kill_node} after round {done}")
            runs = flwr.json("ls", CONNECTION, "--run-id", run_id).get("runs", [])
            status = runs[0].get("status", "unknown") if runs else "unknown"
            if status.startswith("finished"):
                record["status_details"] = runs[0].get("status-details")
                break
            if time.monotonic() > deadline:
                record["status"] = "timeout"
                raise DeployError(f"run {run_id} still {status} after {args.timeout:.0f}s: stopped it")
            time.sleep(args.poll)
        record["status"] = status
        return record
    except BaseException:
        if run_id is not None and record.get("status") is None or record.get("status") == "timeout":
            try:  # don't leave the run pending on a SuperLink that outlives us (--superlink)
                flwr.json("stop", run_id, CONNECTION, timeout=20.0)
            except Exception:  # noqa: BLE001
                pass
        raise
    finally:
        topo.stop_all()
        record["seconds"] = round(time.monotonic() - t0, 1)
        record["commands"] = {k: v for k, v in topo.commands.items()}
        if topo.procs:
            shutil.copytree(topo.logs, out / "logs", dirs_exist_ok=True)
        (out / "deploy.json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = resolve(args, parser)

    def _term(signum, frame):  # SIGTERM (docker stop, a test's timeout): clean up like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    try:
        record = deploy(args, config)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; every process started here was stopped", file=sys.stderr)
        return 130
    except DeployError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    if record["status"] != "finished:completed":
        print(f"{parser.prog}: error: run {record['run_id']} ended {record['status']}"
              f" ({record.get('status_details') or 'no details'}); logs in {record['out']}/logs", file=sys.stderr)
        return 1
    _say(f"run {record['run_id']} completed in {record['seconds']:.0f}s; run folder: {record['out']}")
    summary = Path(record["out"]) / "summary.md"
    if summary.exists():
        print(summary.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
