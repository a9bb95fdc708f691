"""The proxy world's trained models, with their shipped weights and config-hash checks.

- `base`: the tiny pixel-space proxy base model (tokenizer, pretraining, `assets/proxy_base`);
- `analyzers`: evaluators (segnet, depthnet), ControlNet++ reward nets and the classical-CV detector;
- `recognizers`: the identity world's proxy encoders (instance_embed, image_encoder, id_evaluator);
- `rewards`: the differentiable reward models ControlNet++ trains against.

Layering: this package imports core `bench` modules and `bench.datasets` (the worlds the models
are trained on); `bench.methods` and `bench.metrics` import it. Import the submodules directly:
this file stays free of heavy imports.
"""
