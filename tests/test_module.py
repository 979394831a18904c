"""xbn.Module: registration, the tree, state_dict interchange with torch, atomic load/to, copies."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import xbn
from xbn.nn import Linear, ReLU, Sequential

from reference import snapshot, to_backend, to_numpy


def _model(backend, seed=0):
    rng = np.random.default_rng(seed)
    return Sequential(
        Linear(6, 8, backend=backend.xp, rng=rng),
        xbn.BatchNorm1d(8, backend=backend.xp),
        ReLU(),
        Linear(8, 3, backend=backend.xp, rng=rng),
    )


def _x(backend, shape=(16, 6), seed=1):
    return to_backend(backend, np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _trained(backend):
    model = _model(backend)
    opt = xbn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(3):
        y = model(_x(backend, seed=i))
        opt.zero_grad()
        model.backward(backend.xp.ones_like(y))
        opt.step()
    return model


def _state(model):
    return {k: to_numpy(v) for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    sa, sb = _state(a), _state(b)
    assert list(sa) == list(sb)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_package_exports_module_and_nn():
    assert xbn.nn.Sequential is Sequential
    assert issubclass(xbn.BatchNorm, xbn.Module)
    assert all(issubclass(c, xbn.Module) for c in (Linear, ReLU, Sequential))


def test_registration_order_and_prefixed_keys(backend):
    model = _model(backend)
    assert list(model.state_dict()) == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "3.weight",
        "3.bias",
    ]
    assert [n for n, _ in model.named_parameters()] == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
    ]
    assert [n for n, _ in model.named_modules()] == ["", "0", "1", "2", "3"]
    nbt = model.state_dict()["1.num_batches_tracked"]
    assert nbt.shape == () and "int64" in str(nbt.dtype)


def test_a_shared_parameter_is_listed_once(backend):
    lin = Linear(3, 3, backend=backend.xp, seed=0)
    model = Sequential(lin, ReLU(), lin)
    assert len(model.parameters()) == 2
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias"]


def test_train_eval_recurse(backend):
    model = _model(backend)
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    with pytest.raises(TypeError, match="mode must be a bool"):
        model.train("no")
    assert all(m.training for m in model.modules())


def test_call_passes_training_through_the_tree(backend):
    model = _model(backend)
    model(_x(backend), training=False)
    assert model[1].num_batches_tracked == 0
    model(_x(backend))
    assert model[1].num_batches_tracked == 1


def test_zero_grad_set_to_none_false_gives_exact_zeros(backend):
    model = _model(backend)
    for p in model.parameters():
        p.grad = backend.xp.full(p.shape, float("nan"), dtype=p.data.dtype, device=backend.device)
    model.zero_grad(set_to_none=False)
    for p in model.parameters():
        np.testing.assert_array_equal(to_numpy(p.grad), np.zeros(p.shape))
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_load_state_dict_strict_and_not(backend):
    src, dst = _trained(backend), _model(backend, seed=5)
    assert dst.load_state_dict(src.state_dict()) == ([], [])
    _assert_same_state(src, dst)

    sd = src.state_dict()
    del sd["3.bias"]
    sd["extra.weight"] = sd["0.bias"]
    with pytest.raises(ValueError, match=r"missing \['3.bias'\], unexpected \['extra.weight'\]"):
        _model(backend).load_state_dict(sd)
    fresh = _model(backend, seed=5)
    keys = fresh.load_state_dict(sd, strict=False)
    assert keys.missing_keys == ["3.bias"] and keys.unexpected_keys == ["extra.weight"]
    np.testing.assert_array_equal(to_numpy(fresh[0].weight.data), to_numpy(src[0].weight.data))
    np.testing.assert_array_equal(
        to_numpy(fresh[3].bias.data), to_numpy(_model(backend, seed=5)[3].bias.data)
    )


def test_load_state_dict_is_atomic_over_the_tree(backend):
    model = _trained(backend)
    before = [snapshot(m) for m in (model[1],)] + [_state(model)]
    sd = _model(backend, seed=9).state_dict()
    sd["3.weight"] = np.zeros((3, 7), np.float32)  # the last module's entry is bad
    with pytest.raises(ValueError, match=r"3.weight must have shape \(3, 8\)"):
        model.load_state_dict(sd)
    after = [snapshot(m) for m in (model[1],)] + [_state(model)]
    assert before[0] == after[0]
    for k in before[1]:
        np.testing.assert_array_equal(before[1][k], after[1][k])


def test_load_keeps_the_parameter_objects(backend):
    model = _model(backend)
    params = model.parameters()
    model.load_state_dict(_trained(backend).state_dict())
    assert all(a is b for a, b in zip(params, model.parameters()))


def test_failed_forward_in_a_sequential_changes_no_module(backend):
    model = Sequential(xbn.BatchNorm1d(6, backend=backend.xp), Linear(5, 2, backend=backend.xp, seed=0))
    before = snapshot(model[0])
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        model(_x(backend))  # BatchNorm accepts 6 features, Linear then refuses them
    assert snapshot(model[0]) == before


def test_to_is_atomic(backend, monkeypatch):
    model = _trained(backend)
    before = _state(model)
    backends_before = [m._backend for m in model.modules()]
    calls = {"n": 0}
    real = xbn._arrays.move_array

    def failing(a, target, dtype):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("out of device memory")
        return real(a, target, dtype)

    monkeypatch.setattr(xbn._arrays, "move_array", failing)
    with pytest.raises(RuntimeError, match="out of device memory"):
        model.to(backend="numpy")
    assert [m._backend for m in model.modules()] == backends_before
    after = _state(model)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_to_numpy_and_back_moves_the_whole_tree(backend):
    model = _trained(backend)
    ref = _state(model)
    model.to(backend="numpy")
    assert all(m.backend in (None, "numpy") for m in model.modules())
    assert all(isinstance(p.data, np.ndarray) for p in model.parameters())
    model.to(backend=backend.xp, device=backend.device)
    for k, v in _state(model).items():
        np.testing.assert_array_equal(v, ref[k])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_are_independent_and_equal(backend, how):
    model = _trained(backend)
    model[1].eval()
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert clone[1]._backend == model[1]._backend
    _assert_same_state(model, clone)
    x = _x(backend, seed=7)
    np.testing.assert_array_equal(to_numpy(clone(x)), to_numpy(model(x)))
    # The copy trains on its own: the original is untouched.
    before = _state(model)
    clone.train()
    y = clone(x)
    clone.backward(backend.xp.ones_like(y))
    xbn.optim.SGD(clone.parameters(), lr=0.5).step()
    for k, v in _state(model).items():
        np.testing.assert_array_equal(v, before[k])
    assert not np.array_equal(to_numpy(clone[0].weight.data), before["0.weight"])


def test_a_copy_has_no_saved_forward(backend):
    bn = xbn.BatchNorm1d(6, backend=backend.xp)
    bn(_x(backend))
    clone = copy.deepcopy(bn)
    with pytest.raises(xbn.BackwardBeforeForwardError, match="none was run"):
        clone.backward(_x(backend))


def test_repr_prints_the_tree():
    model = Sequential(Linear(6, 8, backend="numpy", seed=0), xbn.BatchNorm1d(8, backend="numpy"), ReLU())
    assert repr(model) == (
        "Sequential(\n"
        "  (0): Linear(in_features=6, out_features=8, bias=True, backend='numpy')\n"
        "  (1): BatchNorm1d(8, axis=1, eps=1e-05, momentum=0.1, affine=True, "
        "track_running_stats=True, backend='numpy')\n"
        "  (2): ReLU()\n"
        ")"
    )
    nested = Sequential(model, ReLU())
    assert "  (0): Sequential(\n    (0): Linear(" in repr(nested)


def test_registry_rejects_wrong_assignments():
    lin = Linear(2, 2, backend="numpy", seed=0)
    with pytest.raises(TypeError, match="parameter 'weight'"):
        lin.weight = np.zeros((2, 2), np.float32)
    lin.bias = None
    assert list(lin.state_dict()) == ["weight"]


# -- interchange with torch ----------------------------------------------------------------------


def _torch_model():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    return torch, torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )


def test_state_dict_loads_strictly_into_torch_with_equal_eval_outputs(backend):
    torch, tmodel = _torch_model()
    model = _trained(backend).eval()
    sd = model.state_dict()
    tmodel.load_state_dict({k: torch.as_tensor(to_numpy(v)) for k, v in sd.items()}, strict=True)
    tmodel.eval()
    x = np.random.default_rng(3).normal(size=(10, 6)).astype(np.float32)
    with torch.no_grad():
        want = tmodel(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(to_numpy(model(to_backend(backend, x))), want, rtol=1e-5, atol=1e-6)


def test_torch_state_dict_loads_strictly_into_xbn(backend):
    torch, tmodel = _torch_model()
    tmodel.train()
    opt = torch.optim.SGD(tmodel.parameters(), lr=0.1)
    for i in range(3):
        x = torch.as_tensor(np.random.default_rng(i).normal(size=(16, 6)).astype(np.float32))
        opt.zero_grad()
        tmodel(x).sum().backward()
        opt.step()
    tmodel.eval()
    model = _model(backend)
    model.load_state_dict(tmodel.state_dict(), strict=True)
    assert model[1].num_batches_tracked == 3
    model.eval()
    x = np.random.default_rng(3).normal(size=(10, 6)).astype(np.float32)
    with torch.no_grad():
        want = tmodel(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(to_numpy(model(to_backend(backend, x))), want, rtol=1e-5, atol=1e-6)


def test_replacing_a_registered_name_keeps_its_place():
    model = Sequential(ReLU(), Linear(2, 2, backend="numpy", seed=0), ReLU())
    model.add_module("0", Linear(2, 2, backend="numpy", seed=1))
    assert [n for n, _ in model.named_children()] == ["0", "1", "2"]
    assert isinstance(model[0], Linear)
    assert list(model.state_dict())[:2] == ["0.weight", "0.bias"]


def test_failed_forward_in_a_sequential_leaves_a_lazy_layer_lazy(backend):
    model = Sequential(xbn.LazyBatchNorm1d(backend=backend.xp), Linear(5, 2, backend=backend.xp, seed=0))
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        model(_x(backend))  # the lazy layer takes 6 channels, then Linear refuses them
    assert type(model[0]) is xbn.LazyBatchNorm1d
    with pytest.raises(xbn.lazy.UninitializedError):
        model.parameters()
