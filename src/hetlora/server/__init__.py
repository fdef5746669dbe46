"""What runs on the server: the federation's rounds (federation), a run from start to summary (runner),
the round's report, crash-safe checkpoints, the run directory's files (outputs, plots) and the DP accountant's
view of what leaves the server (privacy). Engines (in process, Flower) drive :func:`hetlora.server.runner.run`."""
