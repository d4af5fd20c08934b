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
* :mod:`~harness.quality.evaluate`: ``python -m salad_bench.harness.quality.evaluate``, cells (a method at a
  sparsity with a fine-tuning recipe) measured into rows of kind ``"quality"``; under torchrun its cells
  are dealt out over the ranks (:mod:`~harness.quality.parallel` is the shorthand launcher).
* :mod:`~harness.quality.study`: ``python -m salad_bench.harness.quality.study``, issue #25's study from
  its experiment config (:mod:`~harness.quality.study_config`, ``harness/experiments/quality_study.toml``):
  learning-rate sweep, seeds, the fine-tuned full control, resumable.
* :mod:`~harness.quality.stats`: hierarchical bootstrap intervals and the config's hypotheses.

Modules import diffusers and torchmetrics lazily where they can; see docs/QUALITY.md.
"""
