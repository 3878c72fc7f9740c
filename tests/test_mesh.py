"""Mesh construction, head axes and the host-local -> global batch helper."""

import jax
import numpy as np
import pytest

from pfc_jax import mesh as mesh_lib


def test_default_mesh_uses_every_device_on_one_data_axis():
    mesh = mesh_lib.make_mesh()
    assert dict(mesh.shape) == {"data": 8}
    assert mesh_lib.resolve_head_axes(mesh) == ("data",)


def test_minus_one_fills_the_rest_and_head_axes_keep_mesh_order():
    mesh = mesh_lib.make_mesh({"data": -1, "model": 4})
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert mesh_lib.resolve_head_axes(mesh, ["model", "data"]) == ("data", "model")
    assert mesh_lib.resolve_head_axes(mesh, ["model"]) == ("model",)
    assert mesh_lib.axes_size(mesh, ("model",)) == 4


@pytest.mark.parametrize("shape,match", [
    ({"data": 3}, "needs 3 devices"),
    ({"data": -1, "model": 3}, "not divisible"),
    ({"data": -1, "model": -1}, "at most one"),
    ({"data": 0}, "positive"),
])
def test_bad_mesh_shapes_are_explained(shape, match):
    with pytest.raises(ValueError, match=match):
        mesh_lib.make_mesh(shape)


def test_unknown_head_axis_is_rejected():
    with pytest.raises(ValueError, match="subset of the mesh axes"):
        mesh_lib.resolve_head_axes(mesh_lib.make_mesh(), ["model"])


def test_batch_size_check_names_the_numbers():
    mesh = mesh_lib.make_mesh()
    mesh_lib.check_batch_size(16, mesh)
    with pytest.raises(ValueError, match="global batch size 12 .* 8 data-parallel"):
        mesh_lib.check_batch_size(12, mesh)


def test_host_local_to_global_single_process_is_the_whole_batch():
    mesh = mesh_lib.make_mesh()
    batch = {"x": np.arange(32, dtype=np.float32).reshape(16, 2),
             "y": np.arange(16, dtype=np.int32)}
    out = mesh_lib.host_local_to_global(batch, mesh)
    assert out["x"].shape == (16, 2) and out["x"].sharding == mesh_lib.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
    assert [s.data.shape for s in out["y"].addressable_shards] == [(2,)] * 8
    assert jax.process_count() == 1
