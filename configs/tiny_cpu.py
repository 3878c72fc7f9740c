"""A few-minute CPU run on synthetic identities: `make demo`, and the trainer tests.

    python -m pfc_jax.train --config configs/tiny_cpu.py --workdir /tmp/pfc_tiny

Synthetic face-like identities (pfc_jax.data.synthetic), a small IResNet
(r_tiny), CosFace with Partial FC 0.5 on 8 emulated CPU devices;
verification on held-out synthetic identities every 300 steps.
"""

from pfc_jax.config import base_config, tiny_cpu


def get_config(arg: str | None = None):
    c = tiny_cpu(base_config())  # r_tiny, 400 synthetic ids x 24, batch 64, 900 steps
    c.head.num_classes = 400
    c.head.sample_rate = 0.5
    c.head.scale = 32.0
    c.head.margins = (1.0, 0.0, 0.35)  # CosFace: trains from scratch more easily
    c.optimizer.update(name="sgd", lr=0.1, weight_decay=5e-4, schedule="poly",
                       warmup_epochs=0.2)
    if arg == "test":  # the trainer tests: a handful of steps, no evaluation
        c.max_steps = 4
        c.batch_size = 16
        c.data.synthetic_identities = c.head.num_classes = 64
        c.data.synthetic_images_per_identity = 4
        c.data.num_images = 256
        c.eval.every_steps = 0
        c.checkpoint.every_steps = 2
        c.log_every_steps = 1
    return c
