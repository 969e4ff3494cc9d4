"""Parallelism: the device mesh and its logical-axis rules (`mesh`), and multi-process start-up (`distributed`)."""
