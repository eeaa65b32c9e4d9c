"""The registered model in use: its pyfunc (shipped inside every version), digit images made
into MNIST digits, and predictions on them."""
