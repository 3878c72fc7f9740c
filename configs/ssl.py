"""Self-supervised pre-training of a backbone on unlabelled faces (pfc_jax.ssl).

    pfc-train --config configs/ssl.py --workdir /ckpt/ssl_r50 \
        --config.data.path=/data/faces --config.data.num_images=5000000
    pfc-train --config configs/ms1mv3.py --workdir /ckpt/ms1mv3_r50 \
        --config.init_from=/ckpt/ssl_r50            # Partial FC from that backbone

    pfc-train --config configs/ssl.py:tiny --workdir /tmp/pfc_ssl   # CPU size, synthetic

Two views of every image (random resized crop, flip, colour jitter, grayscale,
blur, low-resolution round trip), the backbone, a projection head and the
InfoNCE loss over the whole global batch; the labels of the source are not
read (any source works). ``--config.ssl.loss=barlow`` trains Barlow Twins
instead (λ = 5e-3). The projection head is dropped afterwards:
``--config.init_from`` and ``pfc-export`` take the backbone only.

The argument is a comma list: ``tiny`` (the CPU size of configs/tiny_cpu.py)
and ``strength=S`` (default 1): the augmentation strength that the
generalisation experiment (bench/contrastive.py) varies
(``pfc_jax.ssl.view_augmentation``: at strength S the crop keeps an area
fraction in [1 - 0.6 S, 1], colour jitter is 0.4 S, grayscale and
low-resolution each have probability 0.2 S, blur 0.5 S).
"""

from pfc_jax.config import base_config, tiny_cpu
from pfc_jax.ssl import view_augmentation


def parse(arg: str | None) -> dict:
    out = dict(tiny=False, strength=1.0)
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        if part == "tiny":
            out["tiny"] = True
        elif part.startswith("strength="):
            out["strength"] = float(part.split("=", 1)[1])
        else:
            raise ValueError(f"configs/ssl.py: unknown argument {part!r} "
                             "(expected 'tiny' and/or 'strength=S')")
    if not 0.0 <= out["strength"] <= 1.5:
        raise ValueError(f"configs/ssl.py: strength {out['strength']} outside [0, 1.5]")
    return out


def get_config(arg: str | None = None):
    a = parse(arg)
    c = base_config()
    c.ssl.mode = "pretrain"
    c.ssl.loss = "infonce"
    c.ssl.temperature = 0.1
    c.model.name = "r50"
    c.model.dtype = "bfloat16"
    c.ssl.projector = (2048, 256)
    c.batch_size = 1024
    c.num_epochs = 40
    c.optimizer.update(name="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine",
                       warmup_epochs=2.0, grad_clip=5.0)
    c.eval.bins = ("lfw", "cfp_fp", "agedb_30")
    c.data.update(view_augmentation(a["strength"]))
    if a["tiny"]:
        tiny_cpu(c, steps=600)
        c.ssl.projector = (256, 64)
        c.optimizer.update(lr=2e-3, weight_decay=1e-4, warmup_epochs=0.2)
    return c
