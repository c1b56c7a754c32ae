"""Training-loop adapters: the framework-free monitor, the Lightning callback, plain PyTorch."""
