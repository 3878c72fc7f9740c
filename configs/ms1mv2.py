"""MS1MV2 (faces_emore): 85,742 identities, 5,822,653 images; ArcFace.

    python -m pfc_jax.train --config configs/ms1mv2.py:r100 --workdir /ckpt/ms1mv2_r100 \
        --config.data.path=/data/faces_emore

Backbones: r50 (default), r100, mbf. Global batch 1024, SGD lr 0.1 momentum
0.9 wd 5e-4 (mbf: wd 1e-4, 40 epochs), poly decay, 20 epochs, full softmax.

Mesh: one ``data`` axis over every device of every host, the class table
split over all of them (see ``pfc_jax/config.py``); same command on each host.
"""

from pfc_jax.config import sgd_recipe


def get_config(arg: str = "r50"):
    return sgd_recipe(arg, num_classes=85_742, num_images=5_822_653)
