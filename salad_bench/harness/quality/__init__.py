"""Quality on a model trained here: no pretrained video DiT can be downloaded, so the study trains one.

* :mod:`~harness.quality.data`: a procedural, seeded video dataset (16 classes = the prompts).
* :mod:`~harness.quality.model`: the mini Wan (a small diffusers ``WanTransformer3DModel``) and its
  sharded safetensors checkpoint format.
* :mod:`~harness.quality.train`: flow-matching training (base model and method fine-tuning), DDP under
  torchrun; ``python -m salad_bench.harness.quality.train_base`` trains the base model.
* :mod:`~harness.quality.fsdp`: FSDP2 sharding of a Wan transformer for a full fine-tune
  (docs/SCALE_OUT.md).
* :mod:`~harness.quality.sampler`: a seeded Euler sampler.
* :mod:`~harness.quality.metrics`: validation loss, PSNR/SSIM/LPIPS against the full model's videos,
  VBench's temporal flickering.
* :mod:`~harness.quality.vbench`: the adapter to VBench in its own environment.
* :mod:`~harness.quality.evaluate`: ``python -m salad_bench.harness.quality.evaluate``, the whole study, rows of
  kind ``"quality"``; under torchrun its methods are dealt out over the ranks
  (:mod:`~harness.quality.parallel` is the shorthand launcher).

Modules import diffusers and torchmetrics lazily where they can; see docs/QUALITY.md.
"""
