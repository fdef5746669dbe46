"""The algorithm core: pure functions over PEFT-format adapters.

Nothing in here does I/O or imports transformers, peft or flwr; runners are thin
shells over these functions so a method is written once and runs everywhere.
"""
