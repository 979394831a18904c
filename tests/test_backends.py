"""Backend dispatch: resolution at construction, arrays that stay on their device, the kernel seam."""

from __future__ import annotations

import importlib.util

import array_api_compat
import numpy as np
import pytest

import xbn
from xbn import backends
from xbn._arrays import to_host


def _host(a):
    return to_host(a, "array")


def _assert_owned(b: backends.Backend, a, what: str) -> None:
    assert array_api_compat.array_namespace(a) is b.xp, f"{what} left the {b.name} namespace"
    assert array_api_compat.device(a) == b.device, f"{what} left device {b.device!r}"


# -- resolve ------------------------------------------------------------------------------------


def test_resolve_names_modules_and_example_arrays():
    import array_api_strict

    assert backends.resolve("numpy").name == "numpy"
    assert backends.resolve(np).name == "numpy"
    assert backends.resolve(np.zeros(3)).name == "numpy"
    assert backends.resolve("array_api_strict").xp is array_api_strict
    assert backends.resolve(array_api_strict).name == "array_api_strict"
    strict_example = array_api_strict.asarray([1.0], device=array_api_strict.Device("device1"))
    b = backends.resolve(strict_example)
    assert b.name == "array_api_strict" and b.device == array_api_strict.Device("device1")
    again = backends.resolve(b)
    assert again is b


def test_resolve_auto_is_numpy_without_a_usable_gpu():
    if backends._cuda_usable():
        assert backends.resolve("auto").name == "cupy"
    else:
        assert backends.resolve("auto").name == "numpy"


@pytest.mark.parametrize("bad", ["jax-but-misspelled", 3, object()])
def test_resolve_unknown_backend_is_a_value_error_naming_the_choices(bad):
    with pytest.raises(ValueError, match=r"unknown backend .*expected 'auto'"):
        backends.resolve(bad)
    with pytest.raises(ValueError, match="unknown backend"):
        xbn.BatchNorm2d(3, backend=bad)


def test_cupy_unavailable_says_what_to_install_or_why():
    if backends._cuda_usable():
        pytest.skip("a CUDA device is usable here, so the cupy backend is available")
    with pytest.raises(backends.BackendUnavailableError) as info:
        xbn.BatchNorm2d(3, backend="cupy")
    msg = str(info.value)
    if importlib.util.find_spec("cupy") is None:
        assert "pip install" in msg and "cuda12" in msg
    else:
        assert "CUDA device" in msg


def test_bad_device_is_a_value_error():
    with pytest.raises(ValueError, match=r"device .* is not usable with backend 'array_api_strict'"):
        backends.resolve("array_api_strict", device="no-such-device")


# -- arrays stay in the layer's namespace and on its device -------------------------------------


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_every_public_method_keeps_arrays_on_the_layer_backend(backend, layout):
    b, xp = backend, backend.xp
    rng = np.random.default_rng(0)
    shape, axis = ((4, 3, 5, 5), 1) if layout == "NCHW" else ((4, 5, 5, 3), -1)
    bn = xbn.BatchNorm(3, axis=axis, backend=b.name, device=b.device)
    assert bn.backend == b.name and bn.xp is xp and bn.device == b.device
    for name, a in (
        ("weight", bn.weight.data),
        ("bias", bn.bias.data),
        ("running_mean", bn.running_mean),
        ("running_var", bn.running_var),
    ):
        _assert_owned(b, a, name)
    x = xp.asarray(rng.normal(size=shape).astype(np.float32), device=b.device)
    y = bn(x)
    _assert_owned(b, y, "forward output")
    dx = bn.backward(xp.ones_like(y))
    _assert_owned(b, dx, "dx")
    _assert_owned(b, bn.weight.grad, "weight.grad")
    _assert_owned(b, bn.bias.grad, "bias.grad")
    _assert_owned(b, bn.running_mean, "running_mean after training")
    xbn.optim.SGD(bn.parameters(), lr=0.1, momentum=0.9).step()
    _assert_owned(b, bn.weight.data, "weight after SGD step")
    sd = bn.state_dict()
    for k, v in sd.items():
        _assert_owned(b, v, f"state_dict[{k!r}]")
    assert sd["num_batches_tracked"].dtype == xp.int64 and sd["num_batches_tracked"].shape == ()
    bn.load_state_dict({k: _host(v) for k, v in sd.items()})  # from NumPy, e.g. a torch state_dict
    for k, v in bn.state_dict().items():
        _assert_owned(b, v, f"state_dict[{k!r}] after load_state_dict")
    y_eval = bn.eval()(x)
    _assert_owned(b, y_eval, "eval output")
    _assert_owned(b, bn.backward(xp.ones_like(y_eval)), "eval dx")


def test_input_of_another_backend_is_a_type_error_naming_both(backend):
    other = np.ones((4, 3), dtype=np.float32)
    if backend.name == "numpy":
        import array_api_strict

        other = array_api_strict.ones((4, 3))
    bn = xbn.BatchNorm1d(3, backend=backend.name)
    before = {k: _host(v).tobytes() for k, v in bn.state_dict().items()}
    with pytest.raises(
        TypeError, match=rf"backend '{backend.name}'.*got .*{type(other).__module__.split('.')[0]}"
    ):
        bn(other)
    assert {k: _host(v).tobytes() for k, v in bn.state_dict().items()} == before
    bn(
        backend.xp.ones((4, 3), dtype=backend.xp.float32, device=backend.device)
        + backend.xp.reshape(backend.xp.arange(4, dtype=backend.xp.float32, device=backend.device), (4, 1))
    )
    with pytest.raises(TypeError, match="dy must be an array of the layer's backend"):
        bn.backward(other)


def test_array_api_strict_device_propagation_and_device_mismatch():
    import array_api_strict as xps

    dev1 = xps.Device("device1")
    bn = xbn.BatchNorm2d(2, backend="array_api_strict", device="device1")
    b = backends.resolve("array_api_strict", device=dev1)
    x = xps.reshape(xps.arange(2 * 2 * 3 * 3, dtype=xps.float32, device=dev1), (2, 2, 3, 3))
    y = bn(x)
    dx = bn.backward(xps.ones_like(y))
    for what, a in (("y", y), ("dx", dx), ("weight.grad", bn.weight.grad), ("running_var", bn.running_var)):
        _assert_owned(b, a, what)
    on_cpu = xps.asarray(_host(x))
    assert on_cpu.device != dev1
    with pytest.raises(TypeError, match=r"device .*CPU_DEVICE.*layer lives on device .*device1"):
        bn(on_cpu)


# -- moving a layer -----------------------------------------------------------------------------


def test_to_moves_all_state_and_keeps_values():
    pytest.importorskip("torch", reason="the round trip passes through the torch backend")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 3, 4)).astype(np.float32)
    bn = xbn.BatchNorm1d(3, backend="numpy", momentum=None)
    bn(x)
    bn.backward(np.ones_like(x))
    ref = {k: _host(v) for k, v in bn.state_dict().items()}
    grad = _host(bn.weight.grad)
    for target, device in (("array_api_strict", "device1"), ("torch", None), ("numpy", None)):
        assert bn.to(target, device=device) is bn
        b = backends.resolve(target, device)
        assert bn.backend == target and bn.device == b.device
        for k, v in bn.state_dict().items():
            _assert_owned(b, v, k)
            np.testing.assert_array_equal(_host(v), ref[k])
        _assert_owned(b, bn.weight.grad, "weight.grad")
        np.testing.assert_array_equal(_host(bn.weight.grad), grad)
        assert bn.dtype == b.xp.float32
    with pytest.raises(xbn.BackwardBeforeForwardError):
        bn.backward(np.ones_like(x))  # the cached forward does not survive a move
    y = bn(x)
    assert isinstance(y, np.ndarray)


# -- the kernel seam ----------------------------------------------------------------------------


def test_registered_fast_path_is_used_and_generic_forcing_skips_it(monkeypatch):
    monkeypatch.delenv("XBN_FORCE_GENERIC", raising=False)
    calls = []

    def spy_forward(x, *args, **kwargs):  # the op a training forward calls
        calls.append(x.shape)
        return xbn.functional.batch_norm_forward(x, *args, **kwargs)

    backends.registered_kernels("numpy")  # load the real table first, then add the spy to it
    monkeypatch.setitem(
        backends._KERNELS, "numpy", {**backends._KERNELS.get("numpy", {}), "batch_norm_forward": spy_forward}
    )
    x = np.ones((4, 2), dtype=np.float32) + np.arange(4, dtype=np.float32)[:, None]
    bn = xbn.BatchNorm1d(2, backend="numpy")
    assert "batch_norm_forward" in bn._backend.ops.fast
    bn(x)
    assert calls == [(4, 2)]

    monkeypatch.setenv("XBN_FORCE_GENERIC", "1")
    generic = xbn.BatchNorm1d(2, backend="numpy")
    assert generic._backend.ops.fast == ()
    generic(x)
    assert calls == [(4, 2)]
    assert backends.resolve("numpy", generic=False).ops.fast != ()


def _seam_ops(monkeypatch, kernels, *, generic=False):
    """Ops built for a made-up backend whose registry table is ``kernels``, on NumPy."""
    import array_api_compat.numpy as xnp

    monkeypatch.setitem(backends._KERNELS, "seam_test", kernels)
    return backends.Ops.build("seam_test", xnp, generic=generic)


def _rows(n=6, c=3, dtype=np.float64):
    return np.random.default_rng(0).normal(2.0, 3.0, size=(n, c)).astype(dtype)


def test_seam_runs_the_generic_function_where_a_fast_path_declines(monkeypatch):
    calls = []

    def declines(x, /, *, axis, xp=None):
        calls.append((x.shape, axis, xp))
        return NotImplemented

    import array_api_compat.numpy as xnp

    ops = _seam_ops(monkeypatch, {"batch_stats": declines})
    assert ops.fast == ("batch_stats",)
    x = _rows()
    got = ops.batch_stats(x, axis=1)
    want = xbn.functional.batch_stats(x, axis=1)
    assert calls == [((6, 3), 1, xnp)]  # the namespace the ops were bound to
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    # xp= given by the caller (as the generic compositions do) reaches both functions
    got = ops.batch_stats(x, axis=1, xp=np)
    assert calls[-1] == ((6, 3), 1, np)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_seam_uses_what_a_fast_path_returns(monkeypatch):
    sentinel = (np.zeros(3), np.ones(3))
    ops = _seam_ops(monkeypatch, {"batch_stats": lambda x, /, *, axis, xp=None: sentinel})
    assert ops.batch_stats(_rows(), axis=1) is sentinel
    generic = _seam_ops(monkeypatch, {"batch_stats": lambda x, /, *, axis, xp=None: sentinel}, generic=True)
    assert generic.fast == ()
    assert generic.batch_stats(_rows(), axis=1) is not sentinel


def test_generic_step_ops_compose_the_fast_passes(monkeypatch):
    """A step op without a fast path, or whose fast path declines, is the generic composition
    of the pass ops the registry bound: fast where registered, with their own fallback."""
    calls = []

    def spy(op, answer):
        def fast(*args, **kwargs):
            calls.append(op)
            return answer(*args, **kwargs)

        return fast

    generic = {op: getattr(xbn.functional, op) for op in backends.PASS_OPS}
    kernels = {
        "batch_stats": spy("batch_stats", generic["batch_stats"]),
        "scale_shift": spy("scale_shift", lambda *a, **k: NotImplemented),
        "backward_reduce": spy("backward_reduce", generic["backward_reduce"]),
        "backward_apply": spy("backward_apply", generic["backward_apply"]),
    }
    x, dy = _rows(), _rows(n=6) - 1.0
    w, b = np.linspace(0.5, 1.5, 3), np.linspace(-1.0, 1.0, 3)
    want_f = xbn.functional.batch_norm_forward(x, w, b, np.zeros(3), np.ones(3), axis=1)
    want_b = xbn.functional.batch_norm_backward(dy, x, want_f[1], want_f[2], w, axis=1)
    for steps in (
        {},
        {
            "batch_norm_forward": spy("batch_norm_forward", lambda *a, **k: NotImplemented),
            "batch_norm_backward": spy("batch_norm_backward", lambda *a, **k: NotImplemented),
        },
    ):
        calls.clear()
        ops = _seam_ops(monkeypatch, {**kernels, **steps})
        got_f = ops.batch_norm_forward(x, w, b, np.zeros(3), np.ones(3), axis=1)
        got_b = ops.batch_norm_backward(dy, x, got_f[1], got_f[2], w, axis=1)
        first = ["batch_norm_forward"] if steps else []
        assert calls[: len(first) + 2] == [*first, "batch_stats", "scale_shift"]
        assert calls[len(first) + 2 :] == (["batch_norm_backward"] if steps else []) + [
            "backward_reduce",
            "backward_apply",
        ]
        for g, v in zip((*got_f, *got_b), (*want_f, *want_b)):
            np.testing.assert_array_equal(g, v)


def test_force_generic_turns_every_fast_path_off(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a fast path ran with the generic path forced")

    monkeypatch.setitem(backends._KERNELS, "seam_test", dict.fromkeys(backends.OP_NAMES, boom))
    import array_api_compat.numpy as xnp

    assert backends.Ops.build("seam_test", xnp, generic=False).fast == tuple(sorted(backends.OP_NAMES))
    monkeypatch.setenv("XBN_FORCE_GENERIC", "1")
    b = backends.resolve("numpy")
    assert b.generic and b.ops.fast == ()
    x = _rows(dtype=np.float32)
    y, mean, inv, _, _ = b.ops.batch_norm_forward(x, None, None, None, None, axis=1)
    assert b.ops.batch_norm_backward(x, x, mean, inv, None, axis=1)[0].shape == x.shape
    # a Backend resolved while forced stays generic when passed to resolve again
    monkeypatch.delenv("XBN_FORCE_GENERIC")
    assert backends.resolve(b) is b
    assert backends.resolve(b, generic=False) is b
    assert backends.resolve("numpy").ops.fast != ()


def test_op_protocols_have_the_generic_signatures():
    """Each field of Ops is typed by a Protocol whose call has exactly the signature of the
    generic function (and so of every fast path: tests/test_cupy_launch.py checks those)."""
    import dataclasses
    import inspect

    names = [f.name for f in dataclasses.fields(backends.Ops) if f.metadata.get("op", True)]
    assert tuple(names) == backends.OP_NAMES == backends.PASS_OPS + backends.STEP_OPS
    for f in dataclasses.fields(backends.Ops):
        if f.name not in names:
            continue
        protocol = getattr(backends, f.type)
        sig = inspect.signature(protocol.__call__)
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])  # without self
        assert sig == inspect.signature(getattr(xbn.functional, f.name)), f.name


# -- copies and pickles -------------------------------------------------------------------------


def _pickle_cases():
    cases = [
        ("numpy", None, False),
        ("numpy", None, True),
        ("array_api_strict", None, False),
        ("array_api_strict", "device1", False),
        ("array_api_strict", "device1", True),
    ]
    if importlib.util.find_spec("torch") is not None:
        cases += [("torch", None, False), ("torch", "cpu", True)]
    return cases


@pytest.mark.parametrize(("name", "device", "generic"), _pickle_cases(), ids=lambda v: str(v))
def test_backend_survives_deepcopy_and_pickle(name, device, generic, monkeypatch):
    import copy
    import pickle

    monkeypatch.delenv("XBN_FORCE_GENERIC", raising=False)
    b = backends.resolve(name, device, generic=generic)
    assert copy.deepcopy(b) is b and copy.copy(b) is b
    blob = pickle.dumps(b)
    assert len(blob) < 300, "a Backend pickles as its name, device and flag, nothing more"
    again = pickle.loads(blob)
    assert again == b and hash(again) == hash(b)
    assert (again.name, again.xp, again.device, again.generic) == (b.name, b.xp, b.device, generic)
    assert again.ops.fast == b.ops.fast
    xp = again.xp
    x = xp.asarray(_rows(dtype=np.float32), device=again.device)
    mean, var = again.ops.batch_stats(x, axis=1)
    _assert_owned(again, mean, "batch_stats after a pickle round trip")
    want = xbn.functional.batch_stats(_rows(dtype=np.float32), axis=1)
    np.testing.assert_allclose(_host(mean), want[0], rtol=1e-6)
    np.testing.assert_allclose(_host(var), want[1], rtol=1e-5)
    # in a container, as a layer's state holds it
    assert pickle.loads(pickle.dumps({"backend": b}))["backend"] == b


def test_unpickled_backend_obeys_force_generic(monkeypatch):
    import pickle

    monkeypatch.delenv("XBN_FORCE_GENERIC", raising=False)
    blob = pickle.dumps(backends.resolve("numpy"))
    monkeypatch.setenv("XBN_FORCE_GENERIC", "1")
    again = pickle.loads(blob)
    assert again.generic and again.ops.fast == ()


def test_register_kernel_rejects_unknown_ops():
    with pytest.raises(ValueError, match="unknown op 'fused_everything'"):
        backends.register_kernel("numpy", "fused_everything")


def test_load_state_dict_takes_torch_parameters_directly():
    torch = pytest.importorskip("torch", reason="needs torch tensors")
    tbn = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        tbn.weight.mul_(2.0)
    bn = xbn.BatchNorm1d(3, backend="numpy")
    sd = dict(tbn.state_dict(keep_vars=True))  # weight/bias are Parameters that require grad
    assert sd["weight"].requires_grad
    bn.load_state_dict(sd)
    np.testing.assert_array_equal(bn.weight.data, np.full(3, 2.0, dtype=np.float32))
