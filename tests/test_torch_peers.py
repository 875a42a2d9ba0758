"""The peer mapping of docs/guides/pytorch.md, checked by running each peer where it installs.

Each test trains a small model, lets the peer keep its EMA and lets ``ModelAverager`` keep
the polyak schedule the guide maps it to, then compares the two.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import polyak.torch as pt  # noqa: E402
from polyak import schedules  # noqa: E402


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
    )


def steps(model: torch.nn.Module, n: int, seed: int = 1):
    """Yield after each of ``n`` SGD steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for i in range(n):
        model.train()
        loss = model(torch.randn(16, 3, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield i


def assert_floats_match(value, peer_state, *, exact: bool, rtol: float = 1e-5):
    checked = 0
    for name, t in peer_state.items():
        if t.is_floating_point():
            if exact:
                assert torch.equal(value[name], t), name
            else:
                np.testing.assert_allclose(value[name].double(), t.double(), rtol=rtol,
                                           atol=1e-6, err_msg=name)  # fmt: skip
            checked += 1
    assert checked >= 6


def timm_model_ema():
    """timm's own ``timm/utils/model_ema.py``, loaded alone.

    Importing the ``timm`` package needs torchvision, which this project does not install;
    ``model_ema.py`` imports only torch, so it is loaded from its file, unchanged.
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    path = Path(spec.submodule_search_locations[0]) / "utils" / "model_ema.py"
    mod_spec = importlib.util.spec_from_file_location("_timm_model_ema", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.ModelEmaV3


def test_timm_model_ema_v3_without_step_is_ema_from_the_initial_model():
    ModelEmaV3 = timm_model_ema()
    model = make_model()
    peer = ModelEmaV3(model, decay=0.9)
    avg = pt.ModelAverager(model, schedules.ema(0.9))
    avg.update()  # ModelEmaV3 starts from a copy of the model as constructed
    for _ in steps(model, 6):
        peer.update(model)
        avg.update()
    assert_floats_match(avg.value, peer.module.state_dict(), exact=True)


def test_timm_model_ema_v3_with_step_and_warmup_is_ema_warmup():
    ModelEmaV3 = timm_model_ema()
    model = make_model()
    peer = ModelEmaV3(model, decay=0.95, use_warmup=True, warmup_gamma=2.0, warmup_power=0.75,
                      min_decay=0.1)  # fmt: skip
    avg = pt.ModelAverager(
        model, schedules.ema_warmup(decay=0.95, inv_gamma=2.0, power=0.75, min_decay=0.1)
    )
    for i in steps(model, 8):
        peer.update(model, step=i + 1)  # timm's train loop passes the 1-based update count
        avg.update()
    assert_floats_match(avg.value, peer.module.state_dict(), exact=False, rtol=1e-6)
    # With step but no warm-up: the first call copies, then a plain ema(decay).
    model = make_model()
    peer = ModelEmaV3(model, decay=0.8)
    avg = pt.ModelAverager(model, schedules.ema(0.8))
    for i in steps(model, 5):
        peer.update(model, step=i + 1)
        avg.update()
    assert_floats_match(avg.value, peer.module.state_dict(), exact=True)


def test_ema_pytorch_is_ema_warmup():
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = make_model()
    peer = ema_pytorch.EMA(model, beta=0.99, update_after_step=0, update_every=1,
                           inv_gamma=1.0, power=2 / 3, min_value=0.0)  # fmt: skip
    avg = pt.ModelAverager(model, schedules.ema_warmup(decay=0.99, inv_gamma=1.0, power=2 / 3))
    for _ in steps(model, 8):
        peer.update()
        avg.update()
    # ema-pytorch computes its decay in float32, polyak in float64: close, not equal.
    assert_floats_match(avg.value, peer.ema_model.state_dict(), exact=False, rtol=1e-5)


def test_torch_ema_without_num_updates_is_ema_from_the_initial_model():
    torch_ema = pytest.importorskip("torch_ema")
    model = make_model()
    peer = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.9, use_num_updates=False)
    avg = pt.ModelAverager(model, schedules.ema(0.9))
    avg.update()  # torch-ema starts from the parameters as given
    for _ in steps(model, 6):
        peer.update()
        avg.update()
    names = [n for n, _ in model.named_parameters()]
    with peer.average_parameters():
        peer_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert_floats_match(avg.value, {n: peer_params[n] for n in names}, exact=False, rtol=1e-6)


def jax_snapshots(n: int):
    model = make_model()
    snaps = []
    for _ in steps(model, n):
        snaps.append(model[0].weight.detach().clone())
    return model, snaps


def fold_weights(model, snaps, schedule, first=None):
    avg = pt.ModelAverager(model, schedule)
    for s in ([first] if first is not None else []) + snaps:
        with torch.no_grad():
            model[0].weight.copy_(s)
        avg.update()
    return avg.value["0.weight"]


@pytest.mark.parametrize("debias", [True, False])
def test_optax_ema(debias):
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    decay = 0.7
    model, snaps = jax_snapshots(6)
    tx = optax.ema(decay, debias=debias)
    state = tx.init(jnp.zeros(snaps[0].shape))
    for s in snaps:
        out, state = tx.update(jnp.asarray(s.numpy()), state)
    if debias:
        # Debiased, it is a normalized exponential weighting: polyak's exponential schedule.
        mine = fold_weights(model, snaps, schedules.exponential(alpha=-1 / math.log(decay)))
    else:
        # Without debiasing it starts from zero: ema(decay) with a zero snapshot first.
        mine = fold_weights(model, snaps, schedules.ema(decay), first=torch.zeros_like(snaps[0]))
    np.testing.assert_allclose(mine.numpy(), np.asarray(out), rtol=2e-5, atol=1e-6)


def test_keras_use_ema_is_ema():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    if importlib.util.find_spec("keras") is None or (
        "keras" not in sys.modules
        and importlib.util.find_spec(os.environ["KERAS_BACKEND"]) is None
    ):
        pytest.skip("needs keras and its backend")
    import keras

    momentum = 0.8
    var = keras.Variable(np.linspace(-1, 1, 16, dtype="float32").reshape(8, 2).T.copy())
    opt = keras.optimizers.SGD(learning_rate=0.3, use_ema=True, ema_momentum=momentum)
    opt.build([var])
    rng = np.random.default_rng(0)
    snaps = []
    for _ in range(6):
        opt.apply_gradients([(rng.standard_normal((2, 8)).astype("float32"), var)])
        snaps.append(torch.from_numpy(np.array(keras.ops.convert_to_numpy(var))))
    peer = np.array(keras.ops.convert_to_numpy(opt._model_variables_moving_average[0]))
    model = copy.deepcopy(make_model())
    with torch.no_grad():
        model[2].weight.zero_()
    avg = pt.ModelAverager(model, schedules.ema(momentum))
    for s in snaps:
        with torch.no_grad():
            model[2].weight.copy_(s)
        avg.update()
    np.testing.assert_allclose(avg.value["2.weight"].numpy(), peer, rtol=1e-6, atol=1e-7)
