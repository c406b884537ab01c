"""Fleet: federated LoRA fine-tuning on Flower, each device training with edgeft's engines on its own data."""
