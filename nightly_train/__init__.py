"""Nightly training: on-policy distillation of the LoRA adapter, its IFEval evaluator and promotion gate."""
