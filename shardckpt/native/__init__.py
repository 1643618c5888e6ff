"""The kernels behind the data path: the compiled module's loader and backend choice (kernels), its
pure-Python twin (twin), and their one contract (kernels.pyi). May import: errors, config."""
