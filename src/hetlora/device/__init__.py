"""What runs on a device: the client host (a base model, its LoRA bank and the client's data), local training,
evaluation, memory tricks, and the footprint model that says which rank a device's memory affords."""
