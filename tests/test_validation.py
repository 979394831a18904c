"""One test per bad input: the exception type, a message naming what was expected and what came,
and every parameter, gradient, running statistic and num_batches_tracked byte-identical after."""

from __future__ import annotations

import re

import numpy as np
import pytest

import xbn

from reference import snapshot, to_backend, to_numpy


def _used(layer, backend, shape):
    """``layer`` after one training forward/backward, so its state is not the defaults, and a
    second forward whose backward is still to come (the backward tests need one pending)."""
    rng = np.random.default_rng(0)
    x = to_backend(backend, rng.normal(1.0, 2.0, shape).astype(np.float32))
    layer(x)
    layer.backward(to_backend(backend, rng.normal(size=shape).astype(np.float32)))
    layer(x)
    return layer


@pytest.fixture
def bn2d(backend):
    return _used(xbn.BatchNorm2d(3, backend=backend.name), backend, (2, 3, 2, 2))


def _arr(backend, shape, dtype=np.float32):
    return to_backend(backend, np.ones(shape, dtype))


def _raises_unchanged(layer, exc, match, fn, *args, **kwargs):
    before = snapshot(layer)
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)
    assert snapshot(layer) == before, "a failed call changed the layer's state"


def _still_works(layer, backend, shape):
    x = to_backend(backend, np.arange(np.prod(shape), dtype=np.float32).reshape(shape))
    layer.backward(layer(x))


# -- forward input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,shape,expected",
    [
        (xbn.BatchNorm1d, (3,), "2-D or 3-D input"),
        (xbn.BatchNorm1d, (2, 3, 2, 2), "2-D or 3-D input"),
        (xbn.BatchNorm2d, (2, 3, 4), "4-D input"),
        (xbn.BatchNorm2d, (2, 3, 2, 2, 2), "4-D input"),
        (xbn.BatchNorm3d, (2, 3, 2, 2), "5-D input"),
    ],
)
def test_wrong_rank(backend, cls, shape, expected):
    layer = cls(3, backend=backend.name)
    got = f"got {len(shape)}-D input of shape {tuple(shape)}".replace("(", r"\(").replace(")", r"\)")
    _raises_unchanged(
        layer, ValueError, f"{cls.__name__} expected {expected}, {got}", layer, _arr(backend, shape)
    )


def test_rank_below_two_for_generic_layer(backend):
    layer = xbn.BatchNorm(3, axis=0, backend=backend.name)
    _raises_unchanged(
        layer,
        ValueError,
        r"expected input of rank >= 2, got 1-D input of shape \(3,\)",
        layer,
        _arr(backend, (3,)),
    )


@pytest.mark.parametrize("training", [True, False])
def test_channel_count_mismatch(backend, bn2d, training):
    _raises_unchanged(
        bn2d,
        ValueError,
        r"expected 3 channels on axis 1, got 4 \(input shape \(2, 4, 2, 2\)\)",
        bn2d.forward,
        _arr(backend, (2, 4, 2, 2)),
        training=training,
    )
    _still_works(bn2d, backend, (2, 3, 2, 2))


def test_channels_last_count_mismatch(backend):
    layer = _used(xbn.BatchNorm(3, axis=-1, backend=backend.name), backend, (2, 2, 3))
    _raises_unchanged(
        layer, ValueError, r"expected 3 channels on axis -1, got 2", layer, _arr(backend, (2, 3, 2))
    )


@pytest.mark.parametrize("axis", [4, -5])
def test_channel_axis_out_of_range(backend, axis):
    layer = xbn.BatchNorm(3, axis=axis, backend=backend.name)
    _raises_unchanged(
        layer,
        ValueError,
        rf"channel axis {axis} is out of range for 4-D input of shape \(2, 3, 2, 2\)",
        layer,
        _arr(backend, (2, 3, 2, 2)),
    )


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, np.complex128])
def test_non_floating_input(backend, bn2d, dtype):
    if np.dtype(dtype).kind == "c" and not hasattr(backend.xp, "complex64"):
        pytest.skip(f"backend {backend.name} has no complex dtype")
    x = _arr(backend, (2, 3, 2, 2), dtype)
    _raises_unchanged(
        bn2d, TypeError, rf"input must have a real floating dtype, got \S*{np.dtype(dtype).name}", bn2d, x
    )


@pytest.mark.parametrize(
    "cls,shape",
    [
        (xbn.BatchNorm1d, (1, 3)),
        (xbn.BatchNorm1d, (1, 3, 1)),
        (xbn.BatchNorm2d, (1, 3, 1, 1)),
        (xbn.BatchNorm3d, (1, 3, 1, 1, 1)),
    ],
)
def test_one_value_per_channel_in_training(backend, cls, shape):
    layer = cls(3, backend=backend.name)
    pattern = r"Expected more than 1 value per channel when training, got input size " + re.escape(str(shape))
    _raises_unchanged(layer, ValueError, pattern, layer, _arr(backend, shape))
    # also via the per-call flag on an eval layer, and in eval without tracked statistics
    layer.eval()
    _raises_unchanged(layer, ValueError, pattern, layer.forward, _arr(backend, shape), training=True)
    untracked = cls(3, track_running_stats=False, backend=backend.name).eval()
    _raises_unchanged(untracked, ValueError, pattern, untracked, _arr(backend, shape))


def _foreign(backend, shape):
    """An array of another library than ``backend``'s."""
    if backend.name == "array_api_strict":
        return np.ones(shape, np.float32)
    import array_api_strict

    return array_api_strict.ones(shape, dtype=array_api_strict.float32)


def test_input_from_another_backend(backend, bn2d):
    x = _foreign(backend, (2, 3, 2, 2))
    _raises_unchanged(
        bn2d,
        TypeError,
        rf"input must be an array of the layer's backend '{backend.name}', got "
        rf"{type(x).__module__}\.\S+ of shape \(2, 3, 2, 2\)",
        bn2d,
        x,
    )


def test_input_not_an_array(backend, bn2d):
    _raises_unchanged(
        bn2d,
        TypeError,
        rf"input must be an array of the layer's backend "
        rf"'{backend.name}', got builtins\.list",
        bn2d,
        [[1.0, 2.0, 3.0]] * 2,
    )


def test_numpy_input_to_strict_layer():
    pytest.importorskip("array_api_strict")
    layer = xbn.BatchNorm1d(3, backend="array_api_strict")
    _raises_unchanged(
        layer,
        TypeError,
        r"backend 'array_api_strict', got numpy\.ndarray",
        layer,
        np.ones((4, 3), np.float32),
    )


def test_bad_training_flag(backend, bn2d):
    _raises_unchanged(
        bn2d,
        TypeError,
        "training must be a bool or None, got str",
        bn2d.forward,
        _arr(backend, (2, 3, 2, 2)),
        training="yes",
    )
    _raises_unchanged(bn2d, TypeError, "mode must be a bool, got int", bn2d.train, 1)


# -- backward -----------------------------------------------------------------------------------


def test_backward_before_forward(backend):
    layer = xbn.BatchNorm2d(3, backend=backend.name)
    for exc in (xbn.BackwardBeforeForwardError, RuntimeError, ValueError):
        _raises_unchanged(
            layer,
            exc,
            r"backward\(\) needs a preceding forward\(\); none was run",
            layer.backward,
            _arr(backend, (2, 3, 2, 2)),
        )


def test_backward_after_failed_forward_is_still_before_forward(backend):
    layer = xbn.BatchNorm2d(3, backend=backend.name)
    with pytest.raises(ValueError):
        layer(_arr(backend, (2, 4, 2, 2)))
    _raises_unchanged(
        layer,
        xbn.BackwardBeforeForwardError,
        "needs a preceding forward",
        layer.backward,
        _arr(backend, (2, 4, 2, 2)),
    )


def test_dy_wrong_shape(backend, bn2d):
    _raises_unchanged(
        bn2d,
        ValueError,
        r"dy must match the forward input: expected shape \(2, 3, 2, 2\) and dtype "
        r"\S*float32, got shape \(2, 3, 2, 1\)",
        bn2d.backward,
        _arr(backend, (2, 3, 2, 1)),
    )
    bn2d.backward(_arr(backend, (2, 3, 2, 2)))  # the cached forward survived


def test_dy_wrong_dtype(backend, bn2d):
    _raises_unchanged(
        bn2d,
        ValueError,
        r"expected shape \(2, 3, 2, 2\) and dtype \S*float32, got shape \(2, 3, 2, 2\) "
        r"and dtype \S*float64",
        bn2d.backward,
        _arr(backend, (2, 3, 2, 2), np.float64),
    )


def test_dy_from_another_backend(backend, bn2d):
    dy = _foreign(backend, (2, 3, 2, 2))
    _raises_unchanged(
        bn2d,
        TypeError,
        rf"dy must be an array of the layer's backend '{backend.name}', got "
        rf"{type(dy).__module__}",
        bn2d.backward,
        dy,
    )


# -- load_state_dict ----------------------------------------------------------------------------


def _good_sd(c=3):
    return {
        "weight": np.full(c, 2.0, np.float32),
        "bias": np.full(c, 0.5, np.float32),
        "running_mean": np.full(c, 1.5, np.float32),
        "running_var": np.full(c, 3.0, np.float32),
        "num_batches_tracked": np.array(5, np.int64),
    }


def test_load_good_state_dict_works(backend, bn2d):
    bn2d.load_state_dict(_good_sd())
    assert bn2d.num_batches_tracked == 5
    np.testing.assert_array_equal(to_numpy(bn2d.running_var), np.full(3, 3.0, np.float32))


@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"])
def test_load_state_dict_missing_key(backend, bn2d, key):
    sd = _good_sd()
    del sd[key]
    _raises_unchanged(
        bn2d,
        ValueError,
        rf"state_dict keys do not match: expected \[.*'{key}'.*\]; "
        rf"missing \['{key}'\], unexpected \[\]",
        bn2d.load_state_dict,
        sd,
    )


def test_load_state_dict_extra_key(backend, bn2d):
    sd = _good_sd()
    sd["momentum_buffer"] = np.zeros(3, np.float32)
    _raises_unchanged(
        bn2d, ValueError, r"missing \[\], unexpected \['momentum_buffer'\]", bn2d.load_state_dict, sd
    )


def test_load_state_dict_keys_follow_options(backend):
    untracked = xbn.BatchNorm1d(3, track_running_stats=False, backend=backend.name)
    _raises_unchanged(
        untracked,
        ValueError,
        r"expected \['weight', 'bias'\]; missing \[\], unexpected \['running_mean', "
        r"'running_var', 'num_batches_tracked'\]",
        untracked.load_state_dict,
        _good_sd(),
    )
    plain = xbn.BatchNorm1d(3, affine=False, backend=backend.name)
    _raises_unchanged(
        plain, ValueError, r"unexpected \['weight', 'bias'\]", plain.load_state_dict, _good_sd()
    )


@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("shape", [(4,), (3, 1), ()])
def test_load_state_dict_wrong_shape(backend, bn2d, key, shape):
    sd = _good_sd()
    sd[key] = np.ones(shape, np.float32)
    # the bad value is last in validation order for running_var: nothing before it may be applied
    _raises_unchanged(
        bn2d,
        ValueError,
        rf"{key} must have shape \(3,\), got {re.escape(str(shape))}",
        bn2d.load_state_dict,
        sd,
    )


@pytest.mark.parametrize("key", ["weight", "running_var"])
@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex64])
def test_load_state_dict_wrong_dtype(backend, bn2d, key, dtype):
    sd = _good_sd()
    sd[key] = np.ones(3, dtype)
    _raises_unchanged(
        bn2d,
        TypeError,
        rf"{key} must have a real floating dtype, got {np.dtype(dtype).name}",
        bn2d.load_state_dict,
        sd,
    )


@pytest.mark.parametrize(
    "value,exc,match",
    [
        (
            np.array(2.0),
            ValueError,
            r"num_batches_tracked must be a 0-d integer array or int, got shape "
            r"\(\) and dtype float64",
        ),
        (np.array([2], np.int64), ValueError, r"got shape \(1,\) and dtype int64"),
        (np.array(-1, np.int64), ValueError, "num_batches_tracked must be >= 0, got -1"),
        (True, TypeError, "num_batches_tracked must be an array, got bool"),
        ("5", TypeError, "num_batches_tracked must be an array, got str"),
    ],
)
def test_load_state_dict_bad_num_batches_tracked(backend, bn2d, value, exc, match):
    sd = _good_sd()
    sd["num_batches_tracked"] = value
    _raises_unchanged(bn2d, exc, match, bn2d.load_state_dict, sd)


def test_load_state_dict_not_a_mapping(backend, bn2d):
    _raises_unchanged(
        bn2d,
        TypeError,
        "state_dict must be a mapping, got list",
        bn2d.load_state_dict,
        list(_good_sd().items()),
    )


# -- constructor --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"num_features": 0}, ValueError, "num_features must be a positive int, got 0"),
        ({"num_features": -2}, ValueError, "num_features must be a positive int, got -2"),
        ({"num_features": 3.0}, TypeError, "num_features must be an int, got float"),
        ({"num_features": "3"}, TypeError, "num_features must be an int, got str"),
        ({"num_features": True}, TypeError, "num_features must be an int, got bool"),
        ({"eps": 0.0}, ValueError, "eps must be a finite number > 0, got 0.0"),
        ({"eps": -1e-5}, ValueError, "eps must be a finite number > 0, got -1e-05"),
        ({"eps": float("nan")}, ValueError, "eps must be a finite number > 0, got nan"),
        ({"eps": float("inf")}, ValueError, "eps must be a finite number > 0, got inf"),
        ({"eps": "1e-5"}, TypeError, "eps must be a real number, got str"),
        ({"momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\] or None, got -0.1"),
        ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\] or None, got 1.5"),
        ({"momentum": "0.1"}, TypeError, "momentum must be a real number or None, got str"),
        ({"momentum": True}, TypeError, "momentum must be a real number or None, got bool"),
        ({"affine": "yes"}, TypeError, "affine must be a bool, got str"),
        ({"track_running_stats": 1}, TypeError, "track_running_stats must be a bool, got int"),
        ({"axis": 1.0}, TypeError, "axis must be an int, got float"),
        ({"backend": "jax"}, ValueError, r"unknown backend 'jax'; expected 'auto', one of \("),
        ({"backend": object()}, ValueError, r"unknown backend <object .*> \(type object\); expected"),
        (
            {"backend": "numpy", "device": "cuda:7"},
            ValueError,
            "device 'cuda:7' is not usable with backend 'numpy'",
        ),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    kwargs = {"num_features": 3, "backend": "numpy", **kwargs}
    with pytest.raises(exc, match=match):
        xbn.BatchNorm(**kwargs)


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", "complex64"])
def test_non_floating_parameter_dtype(backend, dtype):
    xp = backend.xp
    if not hasattr(xp, dtype):
        pytest.skip(f"backend {backend.name} has no {dtype}")
    for d in (dtype, getattr(xp, dtype)):
        with pytest.raises(
            TypeError,
            match=rf"dtype must be a real floating dtype such as 'float32', "
            rf"got .*{dtype}",
        ):
            xbn.BatchNorm1d(3, backend=backend.name, dtype=d)


def test_unknown_dtype_name(backend):
    with pytest.raises(ValueError, match=rf"dtype 'float8' is not a dtype of backend '{backend.name}'"):
        xbn.BatchNorm1d(3, backend=backend.name, dtype="float8")


def test_subclasses_take_no_axis():
    with pytest.raises(TypeError):
        xbn.BatchNorm2d(3, axis=-1, backend="numpy")  # NCHW classes fix the channel axis at 1
    with pytest.raises(TypeError):
        xbn.BatchNorm2d(3, 1e-5, backend="numpy")  # options are keyword-only
