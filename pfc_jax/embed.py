"""Images to embeddings on a mesh: the one embedding function of pfc_jax.

``Embedder(model, mesh)`` jits ``model.apply(variables, normalize(images),
train=False)`` once. ``apply(variables, images)`` takes and returns device
arrays (for passes that keep the embeddings on the devices); ``host_fn(
variables)`` returns a function of uint8 host images ``[b, 112, 112, 3]`` to
a NumPy ``[b, D]``, which the verification helpers call. With several
processes every one of them calls it with the same images (each places the
rows of its own devices) and gets all the embeddings.
"""

from __future__ import annotations

import jax
import numpy as np

from pfc_jax import mesh as mesh_lib
from pfc_jax.data.augment import normalize


class Embedder:
    def __init__(self, model, mesh):
        self.model = model
        self.mesh = mesh
        self._repl = mesh_lib.replicated(mesh)
        self._batch = mesh_lib.batch_sharding(mesh)

        def apply(variables, images):
            return model.apply(variables, normalize(images), train=False)

        self.apply = jax.jit(apply)
        # Replicated out: every process reads the whole batch of embeddings.
        self._apply_host = jax.jit(apply, in_shardings=(self._repl, self._batch),
                                   out_shardings=self._repl)

    def place(self, variables):
        """The variables replicated on the mesh (a no-op when they already are)."""
        return jax.device_put(variables, self._repl)

    def host_fn(self, variables):
        variables = self.place(variables)

        def fn(images):
            images = np.asarray(images)
            x = jax.make_array_from_callback(images.shape, self._batch,
                                             lambda index: images[index])
            return np.asarray(self._apply_host(variables, x))

        return fn


def batch_mesh(batch_size: int, devices=None):
    """A data-parallel mesh of the most devices that split ``batch_size``."""
    devices = list(devices if devices is not None else jax.devices())
    n = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)
    return mesh_lib.make_mesh({"data": n}, devices[:n])
