"""Flower engine: a ServerApp/ClientApp pair that run the same core and client code.

``hetlora run --engine flower`` uses Flower's simulation engine; ``flwr run .`` and a
SuperLink with SuperNodes run the same apps (see the README, "Running on Flower").
"""
