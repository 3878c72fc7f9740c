"""Glint360K: 360,232 identities, 17,091,657 images; CosFace (m3 = 0.4).

    python -m pfc_jax.train --config configs/glint360k.py:r100 --workdir /ckpt/glint_r100 \
        --config.data.path=/data/glint360k

Backbones: r50 (default), r100. Global batch 1024, SGD lr 0.1 momentum 0.9
wd 5e-4, poly decay, 20 epochs, full softmax (set --config.head.sample_rate=0.1
for Partial FC 0.1: the published accuracy is unchanged at a fraction of the
head's cost).

Mesh: one ``data`` axis over every device of every host, the class table
split over all of them (see ``pfc_jax/config.py``); same command on each host.
"""

from pfc_jax.config import sgd_recipe
from pfc_jax.margins import COSFACE


def get_config(arg: str = "r50"):
    return sgd_recipe(arg, num_classes=360_232, num_images=17_091_657, margins=COSFACE)
