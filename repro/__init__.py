"""repro: reproduce the DiC and DiCo tables against DiT, end to end."""

__version__ = "0.1.0"
