"""The pre-registered comparison of methods: presets and runs (runs), the plan and its claims, the statistics,
the report with its plots, and the quick comparison of a few runs (compare)."""
