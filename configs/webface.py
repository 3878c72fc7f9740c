"""WebFace4M / 12M / 42M with Partial FC; CosFace (m3 = 0.4).

    python -m pfc_jax.train --config configs/webface.py:42m_r100 --workdir /ckpt/wf42m_r100 \
        --config.data.path=/data/WebFace42M

``arg`` is ``{4m,12m,42m}_{r50,r100,vit_t,vit_s,vit_b,vit_l}``:

- 4M: 205,990 ids / 4,235,242 images; 12M: 617,970 / 12,720,066;
  42M: 2,059,906 / 42,474,557.
- ResNets: SGD lr 0.1 momentum 0.9 wd 5e-4, poly decay, 20 epochs, global
  batch 1024, sample rate 0.3 (4M, 12M) or 0.2 (42M).
- ViTs: AdamW lr 1e-3 wd 0.1, 40 epochs with 4 of warm-up, global batch
  3072 (384 x 8), sample rate 0.3, bf16 compute.

Mesh: one ``data`` axis over every device of every host, the class table
split over all of them (see ``pfc_jax/config.py``); same command on each host.
"""

from pfc_jax.config import adamw_recipe, sgd_recipe

SIZES = {"4m": (205_990, 4_235_242), "12m": (617_970, 12_720_066),
         "42m": (2_059_906, 42_474_557)}


def get_config(arg: str = "4m_r50"):
    size, _, backbone = arg.partition("_")
    if size not in SIZES or not backbone:
        raise ValueError(f"webface recipe {arg!r}: use {{4m,12m,42m}}_BACKBONE, e.g. 42m_r100")
    classes, images = SIZES[size]
    if backbone.startswith("vit"):
        return adamw_recipe(backbone, num_classes=classes, num_images=images, sample_rate=0.3)
    rate = 0.2 if size == "42m" else 0.3
    return sgd_recipe(backbone, num_classes=classes, num_images=images, sample_rate=rate,
                      margins=(1.0, 0.0, 0.4))
