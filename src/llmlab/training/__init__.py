"""Training: the parts every stage shares (`trainer`, `checkpoints`, `mfu`), then one module per training
stage in pipeline order: `pretraining`, `sft`, `reward`, `ppo`, `dpo`."""
