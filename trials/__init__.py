"""The science of one alignment trial: pure PyTorch, no Ray."""
