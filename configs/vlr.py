"""Very low-resolution faces: Partial FC with recognizability (pfc_jax.recognizability).

    pfc-train --config configs/vlr.py --workdir /ckpt/vlr_r50 \
        --config.data.path=/data/ms1m-retinaface-t1
    pfc-eval --workdir /ckpt/vlr_r50 --bin /data/lfw.bin --lowres 16 --quality --edc plots/
    pfc-attention --workdir /ckpt/vlr_r50 --images faces/ --out heat/ --lowres 16

    pfc-train --config configs/vlr.py:tiny --workdir /tmp/pfc_vlr   # CPU size, synthetic

MS1MV3's recipe (r50, ArcFace, SGD, 20 epochs, Partial FC 0.3) with:

* low-resolution augmentation: half of the images down to 8-32 px and back
  (bicubic), a fifth of those blurred first, a fifth through JPEG at the
  small size (``data.degrade_*``);
* the recognizability branch: the UI centre from on-device unrecognisable
  images, the index, index diversion (hard samples to >= 90 degrees from the
  UI centre) and the quality head;
* perceptibility attention on the backbone's last feature map.

The argument is a comma list: a backbone (r50 default, r100, mbf), ``tiny``
for the CPU size of configs/tiny_cpu.py, and the ablation switches
``nodiv`` (diversion weight 0) and ``noatt`` (no attention), and ``sigmoid``
(the attention gated per position instead of a softmax over positions,
``model.attention_gate``); ``nodiv,noatt``
is plain Partial FC with the same augmentation (the quality head's loss is
detached, so it leaves the backbone as it is).
"""

from pfc_jax.config import sgd_recipe, tiny_cpu


def get_config(arg: str | None = None):
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    known = {"tiny", "nodiv", "noatt", "sigmoid", "r50", "r100", "mbf"}
    bad = [p for p in parts if p not in known]
    if bad:
        raise ValueError(f"configs/vlr.py: unknown argument {bad[0]!r} (expected a backbone, "
                         "'tiny', 'nodiv', 'noatt', 'sigmoid')")
    backbone = next((p for p in parts if p in ("r50", "r100", "mbf")), "r50")
    c = sgd_recipe(backbone, num_classes=93_431, num_images=5_179_510, sample_rate=0.3)
    c.data.update(degrade_prob=0.5, degrade_sides=(8, 32), degrade_method="bicubic",
                  degrade_blur_prob=0.2, degrade_jpeg_prob=0.2)
    c.recognizability.enabled = True
    c.model.attention = "noatt" not in parts
    if "sigmoid" in parts:
        c.model.attention_gate = "sigmoid"
    if "nodiv" in parts:
        c.recognizability.diversion_weight = 0.0
    if "tiny" in parts:
        tiny_cpu(c)
        c.head.num_classes = 400
        c.head.sample_rate = 1.0
        c.head.scale = 32.0
        c.head.margins = (1.0, 0.0, 0.35)  # CosFace, as configs/tiny_cpu.py
        c.optimizer.update(lr=0.1, weight_decay=5e-4, warmup_epochs=0.2)
    return c
