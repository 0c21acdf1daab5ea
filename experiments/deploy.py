"""Run an experiment plan on Flower's deployment engine: a SuperLink and N SuperNodes as real
processes on 127.0.0.1, the app submitted with ``flwr run``, as docker-compose.yml does with
containers.

    python -m experiments.deploy --attack rgap                    # 3 SuperNodes, R-GAP, 2 rounds
    python -m experiments.deploy --clients 4 --attack dlg --observers server,client
    python -m experiments.deploy --attack rgap --kill-node 2 --kill-node-after-round 1   # a node dies
    python -m experiments.deploy --attack rgap --faulty-client 1:nan   # a node sends NaN
    python -m experiments.deploy --tls                            # certificates from scripts/gen_certs.sh
    python -m experiments.deploy --superlink superlink:9093 ...   # submit to a running SuperLink only

It takes the same plan flags as ``python -m experiments.run`` (one table, the same plan and
rules: a plan refused there is refused here, before any process starts), plus the
deployment's own. What it does: claims the run folder, picks free ports (or ``--port``),
starts ``flower-superlink`` (subprocess isolation: it starts the ServerApp itself) and one
``flower-supernode`` per client with its own ``partition-id`` / ``num-partitions``, writes a
private ``FLWR_HOME/config.toml`` whose connection points at that SuperLink (the user's own
Flower config is never touched), submits the app in this repository with ``flwr run`` and the
whole plan as its run config while the SuperNodes come online (the ServerApp waits for all of
them before round 1; this checks that they are online within 90 s; with ``--superlink`` it
waits for them before submitting), and polls ``flwr ls --run-id ID --format json`` until the
run's status is ``finished:*`` (``--stream``'s exit code is not trusted). The run folder
(``--out``) gets what the ServerApp writes (rounds.csv, dropped.csv, results.csv, figures,
summary.md), the processes' logs under ``logs/`` and ``deploy.json`` (run id, final status,
wall time, ports, fault). Every process started here is stopped at the end: on success, on
error, on timeout and on Ctrl-C or SIGTERM (SIGTERM, then SIGKILL after a bounded wait),
including the SuperExec and app processes Flower spawns.

Flower 1.42 serves the Fleet, Control and ServerApp runtime APIs over one HTTP port of the
SuperLink (``--host`` / ``--port``); SuperNodes and the CLI both use it.

Exit codes: 0 the run finished and completed; 1 it failed, was stopped or timed out, or a
process died; 2 bad flags, data or run folder (one line on stderr); 130 / 143 interrupted by
Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
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

import psutil

from .cli import Parser, add_plan_arguments, add_run_config_argument, given, plan_from_args, run_config, say_error
from .run_folder import RunFolder, RunFolderError
from .stopping import terminate

# The Flower app to submit: this repository (pyproject.toml with [tool.flwr.app]); when the
# package is installed elsewhere (a container's site-packages), the working directory.
ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "pyproject.toml").exists():
    ROOT = Path.cwd()
CONNECTION = "deploy"  # the connection name in the private FLWR_HOME/config.toml
QUIET_ENV = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0"}  # no network calls
DEFAULT_NODES = 3  # SuperNodes started when --clients is not given
KILL_NODE_ROUND_TIMEOUT = 60.0  # seconds a round waits when a node is to be killed
NODES_ONLINE_S = 90.0  # seconds the SuperNodes started here have to come online


class Interrupted(Exception):
    """Ctrl-C or SIGTERM; ``signum`` decides the exit code (128 + signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class DeployError(RuntimeError):
    """A failure reported as one line; exit code 1."""


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
    p = Parser(
        prog="python -m experiments.deploy",
        description="Start a SuperLink and N SuperNodes on 127.0.0.1, run the spying app with flwr run, "
        "wait for it, collect the run folder, stop everything.",
    )
    add_plan_arguments(p, defaults={"num-clients": DEFAULT_NODES})
    d = p.add_argument_group("the deployment")
    d.add_argument(
        "--out", "--out-dir", type=Path, default=None, help="run folder (default: a new runs/deploy-<date>-<time>)"
    )
    how = d.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished round")
    how.add_argument("--overwrite", action="store_true", help="empty the run folder --out first")
    d.add_argument(
        "--timeout",
        type=_positive(float),
        default=900.0,
        help="seconds for the whole run; then it is stopped and this exits 1 (default: 900)",
    )
    d.add_argument(
        "--kill-node",
        type=int,
        default=None,
        metavar="I",
        help="fault injection: SIGKILL the SuperNode of partition I ...",
    )
    d.add_argument(
        "--kill-node-after-round",
        type=int,
        default=None,
        metavar="R",
        help=f"... as soon as round R has ended (its row is in rounds.csv); min-clients then defaults to "
        f"N-1 and round-timeout to {KILL_NODE_ROUND_TIMEOUT:.0f} s",
    )
    d.add_argument("--tls", action="store_true", help="TLS between SuperLink, SuperNodes and the CLI")
    d.add_argument(
        "--certs",
        type=Path,
        default=None,
        help="with --tls: folder with ca.crt, server.pem, server.key (default: made by "
        "scripts/gen_certs.sh in a temporary folder)",
    )
    d.add_argument("--port", type=int, default=None, help="SuperLink HTTP port (default: a free one)")
    d.add_argument(
        "--superlink",
        type=_address,
        default=None,
        metavar="HOST:PORT",
        help="submit to this running SuperLink instead of starting one (the compose submit job)",
    )
    add_run_config_argument(d)
    d.add_argument(
        "--poll",
        type=_positive(float),
        default=10.0,
        help="seconds between `flwr ls` status polls; asked at once when the run folder shows the run's end "
        "(default: 10)",
    )
    return p


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Check the flags and build the plan (parser.error or a one-line exit 2 on a bad one);
    returns the plan and its folder (claimed and locked)."""
    if (args.kill_node is None) != (args.kill_node_after_round is None):
        parser.error("--kill-node and --kill-node-after-round go together")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port: not a port: {args.port}")
    if args.certs is not None and not args.tls:
        parser.error("--certs goes with --tls")
    if args.certs is not None:
        needed = ("ca.crt",) if args.superlink else ("ca.crt", "server.pem", "server.key")
        missing = [n for n in needed if not (args.certs / n).is_file()]
        if missing:
            parser.error(f"--certs {args.certs}: missing {', '.join(missing)} (make them with scripts/gen_certs.sh)")
    extra = run_config(args, parser)
    typed = set(extra)  # the keys the user gave in --run-config (errors name them so)
    flags = given(args)
    clients = int(flags.get("num-clients", DEFAULT_NODES)) if str(flags.get("num-clients", "")).isdigit() else None
    if args.kill_node is not None:
        if args.superlink:
            parser.error("--kill-node needs the SuperNodes started here, not --superlink")
        if clients is None or clients < 2:
            parser.error("--kill-node needs --clients >= 2, so that someone is left")
        if not 0 <= args.kill_node < clients:
            parser.error(f"--kill-node: partition id must lie in 0..{clients - 1}, got {args.kill_node}")
        extra.setdefault("min-clients", flags.get("min-clients", clients - 1))
        extra.setdefault("round-timeout", flags.get("round-timeout", KILL_NODE_ROUND_TIMEOUT))
    mode = "resume" if args.resume else "overwrite" if args.overwrite else "new"
    # the plan's modules load torch: after parsing, so that --help answers at once
    from fl_sim.data import DatasetError

    from .plan import ConfigError  # after parsing, as above

    try:
        base = _saved_config(args.out) if args.resume else {}
        plan = plan_from_args(
            args,
            engine="deployment",
            base=base,
            extra={k: v for k, v in extra.items() if k not in flags},
            resume=args.resume,
        )
        c = plan.fed
        if args.kill_node is not None:
            if not 0 <= args.kill_node_after_round < c.num_server_rounds:
                parser.error(
                    f"--kill-node-after-round: must lie in 0..{c.num_server_rounds - 1} (a later round "
                    f"must follow), got {args.kill_node_after_round}"
                )
            if min(c.min_clients, c.num_clients) > c.num_clients - 1:
                parser.error(
                    f"--min-clients {c.min_clients}: only {c.num_clients - 1} SuperNode(s) will be left to reply"
                )
        data = plan.check_data()
        folder = RunFolder.claim(args.out, mode, plan.to_mapping(), default_prefix="deploy-")
    except (ConfigError, DatasetError, RunFolderError) as exc:
        raise SystemExit(say_error(parser.prog, exc, run_config=typed)) from None
    for note in (*plan.notes, *data.notes):
        _say(f"note: {note}")
    return plan.replace(out_dir=str(folder.path)), folder


def _saved_config(out: Path | None) -> dict:
    try:
        return json.loads((Path(out).expanduser() / "config.json").read_text()) if out else {}
    except (OSError, ValueError):
        return {}


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
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.work, start_new_session=True
        )
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
        try:
            root = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return []
        found = {root.pid: root}
        for child in root.children(recursive=True):
            found[child.pid] = child
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info.get("cmdline") or []
            if "--parent-pid" in cmd and str(pid) in cmd[cmd.index("--parent-pid") + 1 : cmd.index("--parent-pid") + 2]:
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        return list(found.values())

    def kill(self, name: str) -> None:
        """SIGKILL one process and everything it started (fault injection)."""
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
        names = [n for n in self.procs if n != "superlink"] + (["superlink"] if "superlink" in self.procs else [])
        tree = []
        for name in names:  # gather every tree before anything dies and gets re-parented
            tree += self._tree(self.procs[name].pid)
        terminate(tree, grace)
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
            data = json.loads(text[text.index("{") :])
        except ValueError:
            msg = (res.stderr.strip() or text.strip()).splitlines()
            raise DeployError(
                f"`flwr {' '.join(args[:2])}` failed: {msg[-1] if msg else f'exit {res.returncode}'}"
            ) from None
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


def _online(flwr: Flwr) -> int:
    """How many SuperNodes the SuperLink sees online."""
    return sum(n.get("status") == "online" for n in flwr.json("supernode", "ls", CONNECTION).get("nodes", []))


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


def _ended_since(out: Path, wall0: float) -> bool:
    """Whether the ServerApp wrote the run's summary.md after ``wall0`` (time.time())."""
    try:
        return (out / "summary.md").stat().st_mtime >= wall0
    except OSError:
        return False


def deploy(args: argparse.Namespace, plan) -> dict[str, Any]:
    """Start (unless --superlink), submit, wait, collect. Returns the deploy record."""
    config = {**plan.to_mapping(), "resume": plan.resume}
    out = Path(plan.fed.out_dir)
    n_nodes = plan.fed.num_clients
    work = Path(tempfile.mkdtemp(prefix="fl-deploy-"))
    home = work / "flwr-home"
    env = {
        **os.environ,
        **QUIET_ENV,
        "FLWR_HOME": str(home),
        # The SuperLink starts `flower-superexec` by name: the venv's bin must be on PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("PYTHONPATH", None)
    topo = Topology(work, env)
    record: dict[str, Any] = {
        "out": str(out),
        "clients": n_nodes,
        "rounds": plan.fed.num_server_rounds,
        "tls": args.tls,
        "run_id": None,
        "status": None,
        "killed": None,
        "run_config": config,
    }
    t0, wall0 = time.monotonic(), time.time()
    run_id = None
    flwr = Flwr(env, ROOT)
    try:
        ca = None
        security_link = ["--insecure"]
        security_node = ["--insecure"]
        if args.tls:
            certs = args.certs.absolute() if args.certs else make_certs(work / "certs")
            ca = certs / "ca.crt"
            security_link = [
                "--ssl-ca-certfile",
                str(ca),
                "--ssl-certfile",
                str(certs / "server.pem"),
                "--ssl-keyfile",
                str(certs / "server.key"),
            ]
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
            topo.start(
                "superlink",
                [
                    _cli_bin("flower-superlink"),
                    *security_link,
                    "--isolation",
                    "subprocess",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--disable-runtime-dependency-installation",
                ],
            )
            wait_port("127.0.0.1", port, 60.0, alive=lambda: topo.check_alive(["superlink"]))
            record["superlink"] = address
            record["supernode_ports"] = []
            for i in range(n_nodes):
                node_port = free_port()
                record["supernode_ports"].append(node_port)
                topo.start(
                    f"supernode-{i}",
                    [
                        _cli_bin("flower-supernode"),
                        *security_node,
                        "--superlink",
                        address,
                        "--isolation",
                        "subprocess",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(node_port),
                        "--node-config",
                        f"partition-id={i} num-partitions={n_nodes}",
                    ],
                )
            _say(f"SuperLink on {address}, {n_nodes} SuperNodes starting")
        # Every SuperNode online before round 1: with --kill-node, min-clients is clients-1, and
        # round 1 must not start without the node that is to die. The ServerApp waits for all
        # num-clients nodes before round 1 (fl_sim.server_app), so the SuperNodes started here
        # come online while the app is submitted and starts, and the wait loop below checks that
        # they all do within NODES_ONLINE_S; a running SuperLink's nodes (--superlink, e.g.
        # containers still starting) are waited for before submitting.
        nodes_by = None
        if args.superlink:
            wait_s = min(args.timeout, 600.0)
            deadline = time.monotonic() + wait_s
            while (online := _online(flwr)) < n_nodes:
                if time.monotonic() > deadline:
                    raise DeployError(f"only {online} of {n_nodes} SuperNodes came online within {wait_s:.0f}s")
                time.sleep(2.0)  # each `flwr supernode ls` is a Python process too
            _say(f"{online} SuperNodes online")
        else:
            nodes_by = time.monotonic() + NODES_ONLINE_S

        overrides = work / "run_config.toml"
        overrides.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items()))
        submitted = flwr.json("run", str(ROOT), CONNECTION, "--run-config", str(overrides), timeout=300.0)
        run_id = str(submitted["run-id"])
        record["run_id"] = run_id
        _say(f"run {run_id} submitted; results go to {out}")

        deadline = t0 + args.timeout
        status, last_round, next_status = "pending", -1, time.monotonic() + 1.0
        next_nodes = time.monotonic()
        while True:
            if not args.superlink:
                topo.check_alive(
                    ["superlink"]
                    + [f"supernode-{i}" for i in range(n_nodes) if i != args.kill_node or record["killed"] is None]
                )
            if nodes_by is not None and time.monotonic() >= next_nodes:
                online = _online(flwr)
                if online >= n_nodes:
                    _say(f"{online} SuperNodes online")
                    nodes_by = None
                elif time.monotonic() > nodes_by:
                    raise DeployError(f"only {online} of {n_nodes} SuperNodes came online within {NODES_ONLINE_S:.0f}s")
                next_nodes = time.monotonic() + 2.0  # each `flwr supernode ls` is a Python process too
            done = _rounds_done(out)
            if done > last_round:
                last_round = done
                if done >= 1:
                    _say(f"round {done}/{plan.fed.num_server_rounds} done")
            if args.kill_node is not None and record["killed"] is None and done >= args.kill_node_after_round:
                topo.kill(f"supernode-{args.kill_node}")
                record["killed"] = {
                    "partition": args.kill_node,
                    "after_round": args.kill_node_after_round,
                    "at_s": round(time.monotonic() - t0, 1),
                }
                _say(f"killed the SuperNode of partition {args.kill_node} after round {done}")
            # Each `flwr ls` is a Python process (about 1.5 s of CPU): asked every --poll
            # seconds, and at once when the run folder shows the ServerApp's end (summary.md).
            ended = _ended_since(out, wall0)
            if time.monotonic() >= next_status or ended:
                runs = flwr.json("ls", CONNECTION, "--run-id", run_id).get("runs", [])
                status = runs[0].get("status", "unknown") if runs else "unknown"
                if status.startswith("finished"):
                    record["status_details"] = runs[0].get("status-details")
                    break
                next_status = time.monotonic() + args.poll
            if time.monotonic() > deadline:
                record["status"] = "timeout"
                raise DeployError(f"run {run_id} still {status} after {args.timeout:.0f}s: stopped it")
            time.sleep(1.0 if ended else 0.5)
        record["status"] = status
        return record
    except BaseException as exc:
        if isinstance(exc, Interrupted):
            record["status"] = f"interrupted ({exc})"
        if (
            run_id is not None
            and args.superlink
            and (record.get("status") in (None, "timeout") or isinstance(exc, Interrupted))
        ):
            try:  # don't leave the run going on a SuperLink that outlives us
                flwr.json("stop", run_id, CONNECTION, timeout=5.0)
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
        _report_again(out)


def _report_again(out: Path) -> None:
    """The ServerApp wrote report.html before the deployment ended; made again now that
    deploy.json says how it ended (a folder the run never wrote to has none)."""
    if not (out / "config.json").exists():
        return
    from .report.summary import report_run  # pandas and matplotlib: not loaded for --help

    try:
        report_run(out)
    except Exception as exc:  # noqa: BLE001 - the report must not hide the deployment's outcome
        print(f"note: report.html of {out} not made again: {type(exc).__name__}: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    plan, folder = resolve(args, parser)

    def _stop(signum, frame):  # Ctrl-C, SIGTERM (docker stop, a test's timeout): stop everything, in order
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with folder:
            record = deploy(args, plan)
    except Interrupted as exc:
        print(
            f"{parser.prog}: interrupted ({exc}); every process started here was stopped; what finished is in "
            f"{plan.fed.out_dir}",
            file=sys.stderr,
        )
        return 128 + exc.signum
    except DeployError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if record["status"] != "finished:completed":
        print(
            f"{parser.prog}: error: run {record['run_id']} ended {record['status']}"
            f" ({record.get('status_details') or 'no details'}); logs in {record['out']}/logs",
            file=sys.stderr,
        )
        return 1
    _say(f"run {record['run_id']} completed in {record['seconds']:.0f}s; run folder: {record['out']}")
    summary = Path(record["out"]) / "summary.md"
    if summary.exists():
        print(summary.read_text())
    return 0


def exit_now(code: int) -> None:
    """Exit with ``code`` once everything is written and every process stopped, skipping the
    interpreter's teardown of torch, matplotlib and Flower (measured: 2-7 s on two loaded
    cores), which would only delay the exit code a user, a test or ``docker stop`` waits for."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
