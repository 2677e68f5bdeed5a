"""The library's ``nn.Module``s, at the paths the documentation names."""
