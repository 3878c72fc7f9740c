"""MS1MV3 (ms1m-retinaface-t1): 93,431 identities, 5,179,510 images; ArcFace.

    python -m pfc_jax.train --config configs/ms1mv3.py:r50 --workdir /ckpt/ms1mv3_r50 \
        --config.data.path=/data/ms1m-retinaface-t1

Backbones: r50 (default), r100, mbf. Global batch 1024 (128 per device on 8),
SGD lr 0.1 momentum 0.9 wd 5e-4 (mbf: wd 1e-4, 40 epochs), poly decay, 20
epochs, full softmax (sample_rate 1.0); verification on lfw, cfp_fp, agedb_30
(.bin files in data.path).

Mesh: one ``data`` axis over every device of every host, the class table
split over all of them (see ``pfc_jax/config.py``); same command on each host.
"""

from pfc_jax.config import sgd_recipe


def get_config(arg: str = "r50"):
    return sgd_recipe(arg, num_classes=93_431, num_images=5_179_510)
