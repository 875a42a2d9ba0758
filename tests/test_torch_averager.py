"""polyak.torch.ModelAverager against torch's AveragedModel and float64 references."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.optim.swa_utils import (  # noqa: E402
    AveragedModel,
    get_ema_multi_avg_fn,
)

import polyak  # noqa: E402
import polyak.torch as pt  # noqa: E402
from polyak import schedules  # noqa: E402


def make_model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 2),
    ).to(dtype)


def train(model, steps, averagers=(), seed=1, each=None):
    """SGD steps on random data; after each, every averager folds the model."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    snaps = []
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        model.train()
        x = torch.randn(16, 3, generator=gen).to(dtype)
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        snaps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        for a in averagers:
            a(model) if callable(a) else a.update()
        if each is not None:
            each()
    return snaps


def fold64(snaps, schedule, keys):
    """The float64 reference: the schedule's offline weights over the snapshots."""
    w = schedule.weights(len(snaps))
    return {k: sum(wi * s[k].double() for wi, s in zip(w, snaps)) for k in keys}


@pytest.mark.parametrize("decay", [0.9, 0.5])
def test_ema_equals_averaged_model_with_ema_multi_avg_fn(decay):
    model = make_model()
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    avg = pt.ModelAverager(model, schedules.ema(decay))
    train(model, 7, [avg, ref.update_parameters])
    value = avg.value
    for name, t in ref.module.state_dict().items():
        if t.is_floating_point():  # params and BatchNorm statistics
            torch.testing.assert_close(value[name], t, rtol=0, atol=0, msg=name)
    assert avg.count == 7


def test_equal_equals_the_swa_running_mean():
    model = make_model()
    ref = AveragedModel(model, use_buffers=True)  # the default: SWA running mean
    avg = pt.ModelAverager(model)  # "equal"
    snaps = train(model, 9, [avg, ref.update_parameters])
    value = avg.value
    ref64 = fold64(snaps, schedules.equal(), value)
    for name, t in ref.module.state_dict().items():
        if t.is_floating_point():
            torch.testing.assert_close(value[name], t, rtol=1e-6, atol=1e-7, msg=name)
            np.testing.assert_allclose(value[name].double(), ref64[name], rtol=1e-5, atol=1e-6)


def test_int_average_saturates_at_the_int64_range():
    # float64 cannot hold 2**63 - 1: a clamp in float then a cast wraps to -2**63.
    class Counter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))
            self.register_buffer("n", torch.tensor([2**63 - 1, -(2**63)]))

    model = Counter()
    avg = pt.ModelAverager(model, "equal", int_policy="average")
    online = polyak.Averager("equal", int_policy="average")
    for _ in range(3):
        avg.update()
        online.update({"n": model.n})
    expected = [2**63 - 1, -(2**63)]
    assert avg.value["n"].tolist() == expected
    assert online.value["n"].tolist() == expected
    copy_ = Counter()
    copy_.n.zero_()
    avg.copy_to(copy_)
    assert copy_.n.tolist() == expected


def test_int_buffers_follow_int_policy():
    model = make_model()
    last = pt.ModelAverager(model, "linear")
    first = pt.ModelAverager(model, "linear", int_policy="first")
    mean = pt.ModelAverager(model, "linear", int_policy="average")
    snaps = train(model, 6, [last, first, mean])
    key = "1.num_batches_tracked"
    assert last.value[key].item() == 6 and last.value[key].dtype == torch.int64
    assert first.value[key].item() == 1
    # linear weights 1..6 over counts 1..6: sum(k*k)/21 = 91/21 = 4.33 -> 4
    expected = round(float(np.dot(schedules.linear().weights(6), np.arange(1, 7))))
    assert mean.value[key].item() == expected == 4
    ref = fold64(snaps, schedules.linear(), ["0.weight"])["0.weight"]
    np.testing.assert_allclose(mean.value["0.weight"].double(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(polyak.DtypeError, match="1.num_batches_tracked"):
        pt.ModelAverager(model, int_policy="error")
    pt.ModelAverager(model, int_policy="error", buffers="copy")  # buffers are copied
    with pytest.raises(polyak.PolyakError, match="int_policy"):
        pt.ModelAverager(model, int_policy="mean")


def test_buffers_copy_takes_the_newest_buffers():
    model = make_model()
    avg = pt.ModelAverager(model, schedules.ema(0.5), buffers="copy")
    snaps = train(model, 4, [avg])
    value = avg.value
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(value[name], snaps[-1][name]), name
    ref = fold64(snaps, schedules.ema(0.5), ["1.weight"])["1.weight"]
    np.testing.assert_allclose(value["1.weight"].double(), ref, rtol=1e-6, atol=1e-7)


def test_every_k_folds_only_calls_k_2k_3k():
    model = make_model()
    avg = pt.ModelAverager(model, "equal", every=3)
    snaps = train(model, 10, [avg])
    assert avg.count == 3
    ref = fold64([snaps[2], snaps[5], snaps[8]], schedules.equal(), ["0.weight", "1.running_var"])
    for k, r in ref.items():
        np.testing.assert_allclose(avg.value[k].double(), r, rtol=1e-6, atol=1e-7)
    with pytest.raises(polyak.PolyakError, match="every"):
        pt.ModelAverager(model, every=0)


def test_bf16_model_gets_a_float32_average_close_to_the_float64_fold():
    model = make_model(torch.bfloat16)
    schedule = schedules.ema_warmup(decay=0.99, power=0.75)
    avg = pt.ModelAverager(model, schedule)
    wide = pt.ModelAverager(model, schedule, dtype=torch.float64)
    snaps = train(model, 30, [avg, wide])
    assert avg.state_dict()["average"]["0.weight"].dtype == torch.float32
    assert wide.state_dict()["average"]["0.weight"].dtype == torch.float64
    ref = fold64(snaps, schedule, ["0.weight", "3.bias", "1.running_mean"])
    for k, r in ref.items():
        acc = avg.state_dict()["average"][k]
        np.testing.assert_allclose(acc.double(), r, rtol=2e-6, atol=1e-7, err_msg=k)
        np.testing.assert_allclose(wide.state_dict()["average"][k], r, rtol=1e-12, atol=1e-14)
        # The value is rounded once, to the model's dtype.
        assert avg.value[k].dtype == torch.bfloat16
        assert torch.equal(avg.value[k], acc.to(torch.bfloat16))


def test_average_lives_on_the_requested_device_and_dtype():
    model = make_model()
    avg = pt.ModelAverager(model, "equal", device="cpu", dtype=torch.float64)
    train(model, 2, [avg])
    for t in avg.state_dict()["average"].values():
        assert t.device == torch.device("cpu")
    assert avg.state_dict()["average"]["0.weight"].dtype == torch.float64
    assert avg.value["0.weight"].dtype == torch.float32
    with pytest.raises(polyak.DtypeError, match="dtype"):
        pt.ModelAverager(model, dtype=torch.int32)


def test_storage_is_allocated_at_construction():
    model = make_model()
    avg = pt.ModelAverager(model, schedules.ema(0.9))
    sd = avg.state_dict()
    ptrs = {k: t.data_ptr() for k, t in sd["average"].items()}
    assert set(ptrs) == set(model.state_dict())
    train(model, 2, [avg])
    assert {k: t.data_ptr() for k, t in avg.state_dict()["average"].items()} == ptrs


def test_applied_restores_the_model_bit_for_bit_even_when_the_block_raises():
    model = make_model()
    avg = pt.ModelAverager(model, schedules.ema(0.7))
    train(model, 5, [avg])
    before = copy.deepcopy(model.state_dict())
    with avg.applied() as m:
        assert m is model
        for k, v in avg.value.items():
            assert torch.equal(model.state_dict()[k], v), k
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(KeyError, match="boom"):
        with avg.applied():
            raise KeyError("boom")
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    # The average differs from the weights (0.bias before BatchNorm gets no gradient).
    for k in ("0.weight", "1.running_mean", "3.weight"):
        assert not torch.equal(before[k], avg.value[k]), k


def test_copy_to_and_averaged_model():
    model = make_model(torch.bfloat16)
    avg = pt.ModelAverager(model, "equal")
    train(model, 4, [avg])
    exported = avg.averaged_model()
    assert exported is not model
    other = make_model(torch.bfloat16)
    avg.copy_to(other)
    for k, v in avg.value.items():
        assert torch.equal(exported.state_dict()[k], v), k
        assert torch.equal(other.state_dict()[k], v), k
    assert not torch.equal(model[0].weight, exported[0].weight)


def test_tied_weights_are_folded_once_and_keyed_twice():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(5, 4)
    head = torch.nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    avg = pt.ModelAverager(model, schedules.ema(0.5))
    snaps = []
    for _ in range(3):
        with torch.no_grad():
            emb.weight.add_(1.0)
        snaps.append(emb.weight.detach().clone())
        avg.update()
    ref = sum(w * s.double() for w, s in zip(schedules.ema(0.5).weights(3), snaps))
    value = avg.value
    assert list(value) == ["emb.weight", "head.weight"]
    assert value["head.weight"] is value["emb.weight"]
    assert list(avg.state_dict()["average"]) == ["emb.weight"]  # one accumulator
    np.testing.assert_allclose(value["emb.weight"].double(), ref, rtol=1e-6)


def test_resume_matches_an_uninterrupted_run_bit_for_bit(tmp_path):
    schedule = schedules.ema_warmup(decay=0.95, power=1.0)
    snaps_model = make_model()
    snaps = train(snaps_model, 9, [])

    def feed(avg, model, steps):
        for s in steps:
            model.load_state_dict(s)
            avg.update()

    model = make_model()
    straight = pt.ModelAverager(model, schedule, every=2, int_policy="average")
    feed(straight, model, snaps)

    model = make_model()
    first = pt.ModelAverager(model, schedule, every=2, int_policy="average")
    feed(first, model, snaps[:5])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model = make_model()
    resumed = pt.ModelAverager(model, schedule, every=2, int_policy="average")
    resumed.load_state_dict(state)
    feed(resumed, model, snaps[5:])
    assert resumed.count == straight.count == 4
    for k, v in straight.state_dict()["average"].items():
        assert torch.equal(resumed.state_dict()["average"][k], v), k


def test_load_state_dict_refuses_other_settings_and_shapes():
    model = make_model()
    avg = pt.ModelAverager(model, schedules.ema(0.9))
    avg.update()
    state = avg.state_dict()
    with pytest.raises(polyak.ScheduleError, match=r"ema\(decay=0.9\)"):
        pt.ModelAverager(model, schedules.ema(0.5)).load_state_dict(state)
    with pytest.raises(polyak.PolyakError, match="every=1"):
        pt.ModelAverager(model, schedules.ema(0.9), every=2).load_state_dict(state)
    bigger = torch.nn.Sequential(
        torch.nn.Linear(3, 9), torch.nn.BatchNorm1d(9), torch.nn.ReLU(), torch.nn.Linear(9, 2)
    )
    with pytest.raises(polyak.ShapeError, match=r"0.weight: shape \(8, 3\), expected \(9, 3\)"):
        pt.ModelAverager(bigger, schedules.ema(0.9)).load_state_dict(state)
    broken = {**state, "average": {k: v for k, v in state["average"].items() if k != "3.bias"}}
    with pytest.raises(polyak.StructureError, match=r"missing \['3.bias'\]"):
        pt.ModelAverager(model, schedules.ema(0.9)).load_state_dict(broken)


def test_a_model_that_differs_raises_naming_the_parameters():
    model = make_model()
    avg = pt.ModelAverager(model, "equal")
    avg.update()
    other = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    with pytest.raises(polyak.ShapeError, match=r"3.weight: shape \(3, 8\), expected \(2, 8\)"):
        avg.update(other)
    with pytest.raises(polyak.StructureError, match=r"missing \['1.bias', '1.num_batches"):
        avg.update(torch.nn.Sequential(torch.nn.Linear(3, 8)))
    with pytest.raises(polyak.DtypeError, match="0.weight: tensor torch.float64"):
        avg.copy_to(make_model(torch.float64))
    # The construction model itself, with a parameter swapped for another shape.
    model[3].weight = torch.nn.Parameter(torch.zeros(5, 8))
    with pytest.raises(polyak.ShapeError, match=r"3.weight: shape \(5, 8\)"):
        avg.update()
    assert avg.count == 1
    with pytest.raises(polyak.PolyakError, match="torch.nn.Module"):
        pt.ModelAverager({"w": torch.zeros(2)})


def test_update_with_another_model_of_the_same_layout():
    a, b = make_model(), make_model()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    avg = pt.ModelAverager(a, "equal")
    avg.update()
    avg.update(b)
    ref = (a[0].weight.double() + b[0].weight.double()) / 2
    np.testing.assert_allclose(avg.value["0.weight"].double(), ref.detach(), rtol=1e-6)


def test_schedules_without_online_form_and_empty_reads_raise():
    model = make_model()
    with pytest.raises(polyak.NoOnlineFormError, match="tail"):
        pt.ModelAverager(model, schedules.tail(3))
    avg = pt.ModelAverager(model)
    for read in (lambda: avg.value, avg.copy_to, avg.averaged_model):
        with pytest.raises(polyak.EmptyInputError, match="update"):
            read()


def test_import_polyak_torch_is_explicit():
    import subprocess
    import sys

    code = "import sys, polyak; assert 'torch' not in sys.modules; import polyak.torch"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parameters_replaced_after_construction_are_seen():
    model = make_model()
    avg = pt.ModelAverager(model, "equal")
    avg.update()
    old = model[0].weight.detach().clone()
    new = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(new, assign=True)  # new Parameter objects
    assert model[0].weight is not None
    avg.update()
    np.testing.assert_allclose(avg.value["0.weight"].double(), old.double() + 0.5, rtol=1e-6)
