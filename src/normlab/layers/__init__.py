"""nn.Module normalizers, one family per file."""
