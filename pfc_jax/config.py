"""Config defaults shared by the recipes in ``configs/``, and start-up validation.

A recipe is ``configs/NAME.py`` with ``get_config(arg=None) -> ConfigDict``
that starts from ``base_config()`` and sets the numbers that define it
(classes, images, batch, optimizer, epochs, margins, sample rate, mesh).
Every field can be overridden on the command line:
``--config.head.sample_rate=0.2``.

Mesh across hosts: by default one ``data`` axis spans every device of every
host. The batch is split over all of them (each host loads only its own
slice) and so is the class table; a recipe whose ``mesh`` names more axes can
keep the table on some of them with ``head_axes`` (replicated over the rest).
The same command runs on every host (``launch/``).
"""

from __future__ import annotations

import math

import ml_collections

from pfc_jax.margins import ARCFACE


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        name="r50", embedding_dim=512, dropout=0.0,
        dtype="float32",       # compute dtype: float32 | bfloat16 (params stay float32)
        # mbf's grouped convs: auto (tap by tap on the CPU, XLA's grouped conv
        # elsewhere) | conv | shifted; the same parameters and outputs
        conv_impl="auto",
        attention=False,       # perceptibility attention on the last feature map (r*, mbf)
        attention_gate="softmax",  # its form: softmax over positions | sigmoid per position
    ))

    c.head = ml_collections.ConfigDict(dict(
        num_classes=ml_collections.FieldReference(None, field_type=int),
        sample_rate=1.0, scale=64.0, margins=ARCFACE, num_subcenters=1,
        grad_mode="exact", filter_threshold=0.0, filter_mode="mask",
        matmul_dtype="float32", row_update="lazy", sampler="select", init_std=0.01,
        # the shard's softmax: with lazy updates in blocks, the rows updated inside
        # its backward; unfused, whole until [batch, sampled] logits pass the budget
        softmax="auto", block_size=0, logits_budget_mib=32.0, fused_update=True,
        cosine_stash_mib=256.0,  # fused: the forward's cosines kept for the backward
        block_budget_mib=0.0,  # one block's logits; 0 = logits budget / 4, <= 2 MiB on CPU
    ))

    c.data = ml_collections.ConfigDict(dict(
        kind="recordio",       # recordio | folder | arrayrecord | tfds | synthetic
        path=ml_collections.FieldReference(None, field_type=str),
        tfds_split="train",
        num_images=ml_collections.FieldReference(None, field_type=int),  # for epochs -> steps
        skip_corrupt=False,
        worker_count=4,
        worker_buffer_size=2,
        # global batches placed on the devices ahead of the step (a thread); 0: none
        device_prefetch=2,
        # synthetic identities (kind = synthetic)
        synthetic_identities=1000, synthetic_images_per_identity=20,
        # the identities' seed; None: the run's seed (a second seed, same faces: set it)
        synthetic_seed=ml_collections.FieldReference(None, field_type=int),
        # augmentations beyond the flip (the reference's optional "dali_aug" set)
        flip=True, lowres_prob=0.0, blur_prob=0.0, color_jitter=0.0, grayscale_prob=0.0,
        # random resized crop (the contrastive views' crop/scale): probability, area range
        crop_prob=0.0, crop_scale=(0.5, 1.0),
        # very low resolution (pfc_jax.data.degrade): with probability degrade_prob down
        # to a side in degrade_sides px and back, optional blur first and JPEG between
        degrade_prob=0.0, degrade_sides=(8, 32), degrade_method="bicubic",
        degrade_blur_prob=0.0, degrade_jpeg_prob=0.0,
        # injected label noise for experiments (pfc_jax.data.noise): flipped fraction
        # of records, fraction of identities split in two (duplicate identities)
        noise=ml_collections.ConfigDict(dict(flip=0.0, conflict=0.0, seed=0)),
        # a keep-list written by pfc-clean (pfc_jax.data.keep): train on its records
        keep_list=ml_collections.FieldReference(None, field_type=str),
    ))

    # contrastive self-supervised learning (pfc_jax.ssl), off by default. mode:
    # off | pretrain (no head, labels unused: two views, projector, loss) | aux
    # (Partial FC on the first view plus weight x the contrastive loss)
    c.ssl = ml_collections.ConfigDict(dict(
        mode="off", loss="infonce",   # infonce | barlow
        temperature=0.1, barlow_lambda=5e-3,
        projector=(512, 128),         # hidden widths (Dense-BN-ReLU), then the output width
        weight=1.0,                   # the contrastive loss's weight beside Partial FC (aux)
    ))

    # recognizability (pfc_jax.recognizability): the UI centre, the index, index
    # diversion and the quality head, beside Partial FC; off by default
    c.recognizability = ml_collections.ConfigDict(dict(
        enabled=False,
        ui_every=4,            # one unrecognisable image per 4 batch images, made on device
        ui_side=3,             # ... degraded to 3 px and back (bicubic)
        noise_fraction=0.25,   # ... a quarter of them smooth colour noise instead
        ema=0.99,              # the UI centre's moving average, per step
        margin_weight=1.0,     # xi = (theta_UI + margin_weight (theta_N - theta_P)) / pi
        hard_below=0.5,        # diversion pushes samples with xi below this ...
        diversion_margin=90.0,  # ... to at least this angle (degrees) from the UI centre
        diversion_weight=1.0,
        regression_weight=1.0,  # the quality head's smooth-L1 (beta 0.75)
        dropout=0.2,           # before the quality head's Dense
        detach=True,           # the quality loss does not reach the backbone
    ))

    c.batch_size = 128 * 8     # global batch
    c.grad_accum_steps = 1     # micro-batches per step; they share one sampled class set
    c.num_epochs = 20
    c.max_steps = ml_collections.FieldReference(None, field_type=int)  # overrides epochs
    # start the backbone from a pfc_jax export (pfc-export, pfc-import) with a fresh head
    c.init_from = ml_collections.FieldReference(None, field_type=str)

    c.optimizer = ml_collections.ConfigDict(dict(
        name="sgd",            # sgd | adamw
        lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False,
        b1=0.9, b2=0.999, eps=1e-8,
        schedule="poly",       # poly (power 2, with warm-up) | cosine | constant
        warmup_epochs=0.0, power=2.0,
        grad_clip=5.0,         # global-norm clip of the backbone gradient; 0 = off
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1))
    c.mesh_devices = ml_collections.FieldReference(None, field_type=int)  # None = all devices
    c.head_axes = ml_collections.FieldReference(None, field_type=tuple)

    c.eval = ml_collections.ConfigDict(dict(
        every_steps=2000,
        bins=(),               # names under data.path (lfw -> lfw.bin) or full paths
        # images per embedding call, split over every device; None: the smallest
        # multiple of the device count >= 64
        batch_size=ml_collections.FieldReference(None, field_type=int),
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=2000, keep=3, async_save=True))
    c.log_every_steps = 50
    return c


def recognizability_on(c) -> bool:
    """``recognizability.enabled`` (False for a config from before it existed)."""
    r = c.get("recognizability")
    return bool(r is not None and r.enabled)


def ssl_mode_of(c) -> str:
    """``ssl.mode`` (``"off"`` for a config from before the SSL branch existed)."""
    ssl = c.get("ssl")
    return "off" if ssl is None else str(ssl.mode)


def total_steps(c) -> int:
    if c.max_steps:
        return int(c.max_steps)
    if not c.data.num_images:
        raise ValueError("config: set data.num_images (to turn epochs into steps) or max_steps")
    return max(1, int(math.ceil(c.data.num_images * c.num_epochs / c.batch_size)))


def steps_per_epoch(c) -> float:
    return (c.data.num_images or c.batch_size * total_steps(c)) / c.batch_size


def eval_batch_size(batch_size: int | None, num_devices: int) -> int:
    """``eval.batch_size``, or when unset the smallest multiple of the devices >= 64."""
    if batch_size is not None:
        return int(batch_size)
    return num_devices * max(1, -(-64 // num_devices))


def validate(c, num_devices: int) -> None:
    """Clear errors for what would otherwise fail deep inside a compile or a run."""
    from pfc_jax import models  # local: models import flax

    def need(ok, msg):
        if not ok:
            raise ValueError(f"config: {msg}")

    ssl_mode = ssl_mode_of(c)
    if ssl_mode != "off":
        from pfc_jax import ssl
        ssl.check_config(c.ssl)
    need(ssl_mode == "pretrain" or (c.head.num_classes is not None and c.head.num_classes >= 1),
         f"head.num_classes must be >= 1, got {c.head.num_classes}")
    need(ssl_mode != "aux" or c.grad_accum_steps == 1,
         "ssl.mode='aux' takes grad_accum_steps = 1 (the two views share one forward)")
    if recognizability_on(c):
        from pfc_jax import recognizability
        need(ssl_mode == "off", "recognizability and ssl.mode are not combined; pick one")
        need(c.grad_accum_steps == 1, "recognizability takes grad_accum_steps = 1")
        recognizability.check_config(c.recognizability, c.batch_size // num_devices)
    need(c.batch_size >= 1 and c.batch_size % num_devices == 0,
         f"batch_size {c.batch_size} is not divisible by the {num_devices} data-parallel devices")
    need(c.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {c.grad_accum_steps}")
    need((c.batch_size // num_devices) % c.grad_accum_steps == 0,
         f"per-device batch {c.batch_size // num_devices} is not divisible by "
         f"grad_accum_steps {c.grad_accum_steps}")
    need(c.model.name in models.ALL_NAMES,
         f"unknown backbone model.name={c.model.name!r}; choose one of {models.ALL_NAMES}")
    need(c.model.dtype in ("float32", "bfloat16"), f"model.dtype {c.model.dtype!r}")
    need(c.optimizer.name in ("sgd", "adamw"), f"unknown optimizer {c.optimizer.name!r}")
    need(c.optimizer.schedule in ("poly", "cosine", "constant"),
         f"unknown schedule {c.optimizer.schedule!r}")
    need(isinstance(c.data.device_prefetch, int) and c.data.device_prefetch >= 0,
         f"data.device_prefetch must be an integer >= 0, got {c.data.device_prefetch!r}")
    kinds = ("recordio", "folder", "arrayrecord", "tfds", "synthetic")
    need(c.data.kind in kinds, f"data.kind {c.data.kind!r} is not one of {kinds}")
    b = c.eval.batch_size
    need(b is None or (b >= 1 and b % num_devices == 0),
         f"eval.batch_size {b} is not divisible by the {num_devices} devices that embed each "
         f"evaluation batch (try --config.eval.batch_size={eval_batch_size(None, num_devices)}, "
         "or leave it unset)")
    need(c.data.kind == "synthetic" or c.data.path,
         f"data.path is required for data.kind={c.data.kind!r} "
         "(pass --config.data.path=/path/to/dataset)")
    total_steps(c)


def tiny_cpu(c: ml_collections.ConfigDict, steps: int = 900) -> ml_collections.ConfigDict:
    """``c`` at the CPU size of ``configs/tiny_cpu.py``: r_tiny (D = 128, float32) on
    400 synthetic identities x 24 images, batch 64, ``steps`` steps, evaluation and
    checkpoints every 300 (the recipes' ``tiny`` variants share it)."""
    c.model.update(name="r_tiny", embedding_dim=128, dtype="float32")
    c.data.update(kind="synthetic", synthetic_identities=400,
                  synthetic_images_per_identity=24, num_images=400 * 24, worker_count=0)
    c.batch_size = 64
    c.max_steps = steps
    c.eval.bins = ()
    c.eval.every_steps = 300
    c.eval.batch_size = 64
    c.checkpoint.every_steps = 300
    c.log_every_steps = 25
    return c


VERIFICATION_SETS = ("lfw", "cfp_fp", "agedb_30")


def sgd_recipe(backbone: str, *, num_classes: int, num_images: int, sample_rate: float = 1.0,
               margins=ARCFACE, epochs: int = 20, batch_size: int = 1024,
               lr: float = 0.1) -> ml_collections.ConfigDict:
    """An SGD recipe as the published ResNet/MobileFaceNet runs use it."""
    c = base_config()
    c.model.name = backbone
    c.model.dtype = "bfloat16"
    c.head.num_classes = num_classes
    c.head.sample_rate = sample_rate
    c.head.margins = tuple(margins)
    c.data.num_images = num_images
    c.batch_size = batch_size
    c.num_epochs = epochs
    c.optimizer.update(name="sgd", lr=lr, momentum=0.9, weight_decay=5e-4, schedule="poly",
                       warmup_epochs=0.0)
    if backbone == "mbf":
        c.optimizer.weight_decay = 1e-4
        c.num_epochs = 40
    c.eval.bins = VERIFICATION_SETS
    return c


def adamw_recipe(backbone: str, *, num_classes: int, num_images: int, sample_rate: float = 0.3,
                 margins=(1.0, 0.0, 0.4), epochs: int = 40,
                 batch_size: int = 3072) -> ml_collections.ConfigDict:
    """The ViT recipe: AdamW lr 1e-3 wd 0.1, a tenth of the epochs as warm-up."""
    c = sgd_recipe(backbone, num_classes=num_classes, num_images=num_images,
                   sample_rate=sample_rate, margins=margins, epochs=epochs,
                   batch_size=batch_size)
    c.optimizer.update(name="adamw", lr=1e-3, weight_decay=0.1, warmup_epochs=epochs / 10,
                       grad_clip=5.0)
    c.eval.bins = ()
    return c


def load_recipe(path: str, arg: str | None = None,
                overrides: dict | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a recipe file, with ``{"a.b": value}`` overrides applied.

    The programmatic twin of ``--config path[:arg] --config.a.b=value``.
    """
    import importlib.util
    import os

    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"pfc_recipe_{name}", path)
    if spec is None or not os.path.exists(path):
        raise FileNotFoundError(f"recipe {path} does not exist")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg) if arg is not None else module.get_config()
    c.update_from_flattened_dict(dict(overrides or {}))
    return c
