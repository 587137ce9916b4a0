"""Training drafters for a target model: self-distillation data, head/feature drafter training (medusa,
hydra, falcon), TVD++ draft-model distillation, checkpoints bound to the target."""
