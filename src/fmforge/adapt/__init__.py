"""Adaptation methods; the method names live here so the CLI lists them without importing torch."""

METHODS = [
    "majority",
    "full",
    "freeze",
    "linear-probe",
    "lora",
    "prompt-tuning",
    "pet",
    "icl",
    "ensemble",
]
