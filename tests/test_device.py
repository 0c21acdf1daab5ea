"""--device: one function resolves it, every entry point refuses a bad one in one line, a run
on the CPU is the run it was before the setting existed, and an attack computes where the model
it is handed lives. The CUDA tests run where torch sees a GPU and skip, saying so, elsewhere."""

from __future__ import annotations

import json

import pytest
import torch

from attacks import IDLG, RGAP, FedAvgSim, InvertingGradients, ThreatModel, Update, get_attack, training_loss
from attacks.dlg import DLG
from attacks.imprint import Imprint, plan_imprint, plant_imprint
from attacks.inverting import simulate_local_update
from experiments.bench.device import main as bench_main
from experiments.run import main as run_main
from experiments.sweep.__main__ import main as sweep_main
from fl_sim.config import ConfigError, RunConfig
from fl_sim.device import DeviceError, gpu_share, model_device, resolve_device
from fl_sim.models import build_model
from fl_sim.simulation import backend_config
from fl_sim.task import batch_gradient, client_batch

CUDA = torch.cuda.is_available()
NO_CUDA = pytest.mark.skipif(CUDA, reason="checks the behaviour of a machine without CUDA; this one has it")
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs CUDA (torch.cuda.is_available() is False here)")


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the run's attack jobs and clients use: on a busy shared machine a
    second thread makes these small attacks many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _call(main, argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


# ---- resolving -------------------------------------------------------------------------------


@NO_CUDA
def test_auto_resolves_to_the_cpu_without_cuda_and_ray_gets_no_gpu():
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu") == resolve_device(" CPU ")
    assert gpu_share("auto", 4) == 0.0
    assert backend_config(device="auto", num_clients=4)["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}


@NO_CUDA
def test_cuda_without_cuda_and_an_unknown_name_are_one_line_errors():
    with pytest.raises(DeviceError, match="cuda is not available on this machine"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device 'tpu': choose one of auto, cpu, cuda"):
        resolve_device("tpu")


def test_the_run_config_checks_the_name_and_leaves_the_machine_to_the_entry_points():
    assert RunConfig().device == "auto" and RunConfig(device="CUDA").validated().device == "cuda"
    with pytest.raises(ConfigError, match="unknown device 'gpu'") as exc:
        RunConfig(device="gpu").validated()
    assert exc.value.key == "device"


@NO_CUDA
@pytest.mark.parametrize(
    "main,argv,message",
    [
        (run_main, ["--device", "cuda"], "--device: cuda is not available on this machine"),
        (run_main, ["--device", "tpu"], "--device: unknown device 'tpu': choose one of auto, cpu, cuda"),
        (sweep_main, ["dlg-defences", "--device", "cuda"], "--device: cuda is not available on this machine"),
        (bench_main, ["--device", "cuda"], "--device: cuda is not available on this machine"),
    ],
    ids=["run-cuda", "run-unknown", "sweep-cuda", "bench-cuda"],
)
def test_entry_points_refuse_a_device_this_machine_lacks_in_one_line(main, argv, message, tmp_path, capsys):
    code = _call(main, [*argv, "--out", str(tmp_path / "out")] if main is not bench_main else argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # refused before anything was made


# ---- a run on the CPU ------------------------------------------------------------------------


def test_device_cpu_run_equals_the_default_run_bit_for_bit_and_config_records_the_device(tmp_path):
    """A small FedAvg federation on the in-process engine (tests/conftest.py), once with the
    default (auto: the CPU on a machine without CUDA) and once with --device cpu: the same
    final model, bit for bit; config.json keeps the setting and the device it resolved to."""
    flags = ["--attack", "none", "--clients", "2", "--rounds", "1", "--local-steps", "2", "--batch-size", "8"]
    models, configs = {}, {}
    for name, extra in (("default", []), ("cpu", ["--device", "cpu"])):
        out = tmp_path / name
        assert run_main([*flags, *extra, "--out", str(out)]) == 0
        models[name] = torch.load(out / "final_model.pt")
        configs[name] = json.loads((out / "config.json").read_text())
    assert list(models["default"]) == list(models["cpu"])
    for key, value in models["default"].items():
        if CUDA:  # the default ran on the GPU: the same training, up to the GPU's rounding
            assert torch.allclose(value, models["cpu"][key], rtol=1e-3, atol=1e-5), key
        else:
            assert torch.equal(value, models["cpu"][key]), key
    assert configs["default"]["device"] == "auto" and configs["cpu"]["device"] == "cpu"
    expected = "cuda" if CUDA else "cpu"
    assert configs["default"]["resolved-device"] == expected and configs["cpu"]["resolved-device"] == "cpu"


# ---- attacks compute where their model lives ---------------------------------------------------


def _lenet_update(device: str | torch.device = "cpu", batch: int = 1):
    torch.manual_seed(0)
    model = build_model("lenet", (3, 16, 16), 10, init="paper", seed=0)
    x = torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(batch) % 10
    grads = torch.autograd.grad(training_loss(model(x), y), list(model.parameters()))
    return model.to(device), [g.detach() for g in grads], x, y


TINY = {
    "dlg": (DLG, {"max_steps": 2, "max_iter": 3, "max_restarts": 0}),
    "idlg": (IDLG, {"max_steps": 2, "max_iter": 3, "max_restarts": 0}),
    "ig": (InvertingGradients, {"max_steps": 3, "refine_steps": 1}),
}


@pytest.mark.parametrize("name", list(TINY))
def test_an_attack_on_a_cpu_model_computes_on_the_cpu_and_returns_cpu_tensors(name):
    cls, options = TINY[name]
    model, grads, x, y = _lenet_update()
    res = cls(**options)(model, grads, (3, 16, 16), ThreatModel(batch_size=1), seed=0)
    assert res.diagnostics["device"] == "cpu"
    assert res.images.device.type == "cpu" and res.images.shape == x.shape
    assert res.labels.device.type == "cpu"


def test_rgap_fedavg_sim_and_the_imprint_say_where_they_computed():
    cnn = build_model("cnn6", (1, 16, 16), 10, init="kaiming", seed=0)
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([3])
    grads = [g.detach() for g in torch.autograd.grad(training_loss(cnn(x), y), list(cnn.parameters()))]
    rgap = RGAP(rank=False)(cnn, grads, (1, 16, 16), ThreatModel(labels=y))
    assert rgap.diagnostics["device"] == "cpu" and rgap.images.device.type == "cpu"

    xs, ys = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 4])
    params = {k: p.detach() for k, p in cnn.named_parameters()}
    delta = simulate_local_update(cnn, params, xs, ys, 0.01, 2, False, [(0, 1), (0, 1)])
    upd = Update(tuple(d.detach() for d in delta), "weight_delta", lr=0.01, local_steps=2)
    fed = FedAvgSim(max_steps=2)(cnn, upd, (1, 16, 16), ThreatModel(batch_size=2))
    assert fed.diagnostics["device"] == "cpu" and fed.images.device.type == "cpu"
    assert fed.labels.device.type == "cpu"

    mlp = build_model("mlp", (1, 16, 16), 10, seed=0)
    built = plant_imprint(mlp, (1, 16, 16), plan_imprint(torch.rand(8, 1, 16, 16), 20, seed=0))
    g = torch.autograd.grad(training_loss(built(x), y), list(built.parameters()))
    imp = Imprint()(built, list(g), (1, 16, 16))
    assert imp.diagnostics["device"] == "cpu" and imp.images.device.type == "cpu"


def test_model_device_is_where_the_parameters_are():
    model = build_model("lenet", (3, 16, 16), 10, seed=0)
    assert model_device(model) == torch.device("cpu") and model_device(torch.nn.Flatten()) == torch.device("cpu")


# ---- on a GPU ----------------------------------------------------------------------------------


@NEEDS_CUDA
def test_on_cuda_every_attack_computes_on_the_gpu_and_returns_cpu_tensors():
    model, grads, x, y = _lenet_update("cuda")
    for name, (cls, options) in TINY.items():
        res = cls(**options)(model, grads, (3, 16, 16), ThreatModel(batch_size=1), seed=0)
        assert res.diagnostics["device"].startswith("cuda"), name
        assert res.images.device.type == "cpu" and bool(torch.isfinite(res.images).all()), name
        assert res.labels.device.type == "cpu", name
    # the update may arrive on the CPU or on the GPU: the attack moves it beside the model
    on_gpu = get_attack("idlg", max_steps=2, max_restarts=0)(model, [g.cuda() for g in grads], (3, 16, 16))
    assert on_gpu.diagnostics["device"].startswith("cuda")


@NEEDS_CUDA
def test_idlg_on_cuda_recovers_the_image_as_on_the_cpu():
    """iDLG at its defaults on one LeNet image: the reconstruction on the GPU is as good as the CPU's."""
    scores = {}
    for device in ("cpu", "cuda"):
        model, grads, x, y = _lenet_update(device)
        res = IDLG()(model, grads, (3, 16, 16), seed=0)
        scores[device] = float(-10 * torch.log10(((res.images - x) ** 2).mean()))
    assert scores["cuda"] >= 30.0 and scores["cuda"] >= scores["cpu"] - 3.0, scores


@NEEDS_CUDA
def test_a_clients_gradient_on_cuda_matches_the_cpus_and_ray_gets_a_gpu_share():
    cfg = RunConfig(mode="fedsgd", num_clients=2, batch_size=4)
    images, labels = client_batch(cfg, 0, 2, 1)
    model = build_model(cfg.model, (1, 28, 28), 10, init="kaiming", seed=0)
    cpu, _ = batch_gradient(model, images, labels)
    gpu, _ = batch_gradient(model.cuda(), images, labels)
    assert all(g.device.type == "cuda" for g in gpu)
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a, b.cpu(), rtol=1e-4, atol=1e-6)
    share = backend_config(device="cuda", num_clients=4)["client_resources"]["num_gpus"]
    assert 0 < share <= 1 and share == pytest.approx(min(1.0, torch.cuda.device_count() / 4), abs=1e-4)
