"""cerebellumd: a cerebellum-first power manager for a vehicle gateway's AI accelerator."""

__version__ = "0.1.0"
