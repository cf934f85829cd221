"""The PyTorch backend: state_dict, pickled-module, TorchScript and torch.export files, and modules."""
