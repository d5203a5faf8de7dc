"""SAPT continual-learning platform: one frozen backbone, a growing pool of PET blocks."""

__version__ = "0.1.0"
